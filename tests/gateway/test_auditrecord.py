"""The bounded per-policy record of denied and would-deny destinations (pure, no sockets)."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from tidegate.gateway.auditrecord import (
    REPORT_KIND,
    AuditRecord,
    ReportError,
    TopDestinations,
    merge_reports,
    parse_rfc3339,
    rfc3339,
)

NOW = 1_780_000_000.0


def test_exact_counts_while_under_capacity() -> None:
    top = TopDestinations(capacity=10)
    for i in range(5):
        top.add("a.example", 443, verdict="audit", reason="no_rule_matched", now=NOW + i)
    top.add("a.example", 443, verdict="deny", reason="deny_rule", now=NOW + 9)
    top.add("b.example", 8443, verdict="audit", reason="port_not_allowed", now=NOW + 1)
    report = top.report(top=10)
    assert report["total"] == 7 and report["denied"] == 1 and report["wouldDeny"] == 6
    assert report["others"] == 0 and report["evictions"] == 0
    first, second = report["destinations"]
    assert first == {
        "host": "a.example",
        "port": 443,
        "count": 6,
        "denied": 1,
        "wouldDeny": 5,
        "lastSeen": rfc3339(NOW + 9),
        "reason": "deny_rule",
    }
    assert (second["host"], second["port"], second["count"]) == ("b.example", 8443, 1)
    assert report["lastDenied"] == rfc3339(NOW + 9)
    assert report["lastWouldDeny"] == rfc3339(NOW + 4)


def test_same_host_different_ports_are_different_destinations() -> None:
    top = TopDestinations(capacity=10)
    top.add("a.example", 443, verdict="audit", reason="r", now=NOW)
    top.add("a.example", 22, verdict="audit", reason="r", now=NOW)
    assert len(top) == 2


def test_top_n_lists_the_most_requested_and_others_accounts_for_the_rest() -> None:
    top = TopDestinations(capacity=50)
    for i in range(30):
        for _ in range(i + 1):
            top.add(f"h{i}.example", 443, verdict="audit", reason="r", now=NOW)
    report = top.report(top=3)
    assert [d["host"] for d in report["destinations"]] == [
        "h29.example",
        "h28.example",
        "h27.example",
    ]
    listed = sum(d["count"] for d in report["destinations"])
    assert report["others"] == report["total"] - listed == sum(range(1, 28))


def test_a_flood_of_random_names_keeps_memory_bounded_and_the_heavy_hitters() -> None:
    """Ten real destinations hide in 50 000 one-off names: the table never grows past its
    capacity, the ten are all still listed with their exact counts, the flood is others."""
    rng = random.Random(7)
    top = TopDestinations(capacity=100)
    heavy = [f"real{i}.example" for i in range(10)]
    events = [(h, 1000) for h in heavy]
    stream: list[str] = []
    for host, n in events:
        stream += [host] * n
    stream += [f"{rng.getrandbits(64):016x}.flood.example" for _ in range(50_000)]
    rng.shuffle(stream)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, host in enumerate(stream):
        top.add(host, 443, verdict="audit", reason="no_rule_matched", now=NOW + i)
        assert len(top) <= 100
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    report = top.report(top=10)
    listed = {d["host"]: d["count"] for d in report["destinations"]}
    assert set(listed) == set(heavy)
    # Exact once tracked: a heavy hitter may have entered late, so at most its full count.
    assert all(800 <= c <= 1000 for c in listed.values()), listed
    assert report["total"] == 60_000
    assert report["others"] == 60_000 - sum(listed.values())
    assert report["evictions"] > 49_000
    assert grown < 512 * 1024, f"the record grew by {grown} bytes under the flood"


def test_space_saving_invariants_hold_on_a_random_stream() -> None:
    rng = random.Random(11)
    top = TopDestinations(capacity=8)
    truth: dict[str, int] = {}
    for i in range(5000):
        host = f"h{min(int(rng.expovariate(0.3)), 40)}.example"
        truth[host] = truth.get(host, 0) + 1
        top.add(host, 443, verdict="deny", reason="deny_rule", now=NOW + i)
    ranks = sorted((e.rank for e in top), reverse=True)
    assert sum(ranks) == 5000  # space-saving keeps the stream length in the ranks
    for entry in top:
        assert entry.count <= truth[entry.host] <= entry.rank  # exact <= true <= estimate
        assert entry.rank - entry.error <= entry.count
    threshold = 5000 / 8
    for host, n in truth.items():
        if n > threshold:
            assert any(e.host == host for e in top), host


def test_record_keys_by_policy_and_retain_drops_removed_policies() -> None:
    record = AuditRecord(capacity=5)
    record.record(["a/one", "b/two"], "x.example", 443, verdict="audit", reason="r", now=NOW)
    record.record(["a/one"], "y.example", 443, verdict="deny", reason="r", now=NOW)
    report = record.report(now=NOW, generation=3)
    assert report["kind"] == REPORT_KIND and report["generation"] == 3
    assert report["policies"]["a/one"]["total"] == 2
    assert report["policies"]["b/two"]["total"] == 1
    record.retain({"a/one"})
    assert set(record.report(now=NOW)["policies"]) == {"a/one"}


def test_max_policies_is_a_hard_bound() -> None:
    record = AuditRecord(capacity=2, max_policies=3)
    for i in range(10):
        record.record([f"ns/p{i}"], "x.example", 443, verdict="audit", reason="r", now=NOW)
    assert len(record.policies) == 3 and record.dropped == 7


def test_merge_sums_replicas_and_keeps_the_latest_time() -> None:
    one = AuditRecord()
    two = AuditRecord()
    for _ in range(3):
        one.record(["ns/p"], "a.example", 443, verdict="audit", reason="no_rule_matched", now=NOW)
    two.record(["ns/p"], "a.example", 443, verdict="deny", reason="deny_rule", now=NOW + 60)
    two.record(["ns/p"], "b.example", 22, verdict="audit", reason="port_not_allowed", now=NOW)
    two.record(["ns/q"], "c.example", 443, verdict="audit", reason="r", now=NOW)
    merged = merge_reports([one.report(now=NOW), two.report(now=NOW + 60)], top=1, keys={"ns/p"})
    assert set(merged) == {"ns/p"}
    p = merged["ns/p"]
    assert (p["total"], p["denied"], p["wouldDeny"], p["others"]) == (5, 1, 4, 1)
    assert p["destinations"] == [
        {
            "host": "a.example",
            "port": 443,
            "count": 4,
            "denied": 1,
            "wouldDeny": 3,
            "lastSeen": rfc3339(NOW + 60),
            "reason": "deny_rule",
        }
    ]
    assert p["lastWouldDeny"] == rfc3339(NOW) and p["lastDenied"] == rfc3339(NOW + 60)


@pytest.mark.parametrize(
    "report",
    [
        [],
        {"kind": "Other"},
        {"kind": REPORT_KIND, "policies": []},
        {"kind": REPORT_KIND, "policies": {"a/b": {"total": -1}}},
        {"kind": REPORT_KIND, "policies": {"a/b": {"total": True}}},
        {"kind": REPORT_KIND, "policies": {"a/b": {"destinations": {}}}},
        {"kind": REPORT_KIND, "policies": {"a/b": {"destinations": [{"host": 1, "port": 1}]}}},
        {"kind": REPORT_KIND, "policies": {"a/b": {"destinations": [{"host": "x" * 300}]}}},
    ],
)
def test_merge_refuses_malformed_reports(report: object) -> None:
    with pytest.raises(ReportError):
        merge_reports([report])  # type: ignore[list-item]


def test_time_round_trip() -> None:
    assert parse_rfc3339(rfc3339(NOW)) == NOW
    assert parse_rfc3339("yesterday") is None and parse_rfc3339(None) is None


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TopDestinations(capacity=0)
