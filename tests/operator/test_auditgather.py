"""The operator's side of the audit record as pure functions: which pods to ask, how the
status and the ReadyToEnforce condition follow from what they said."""

from __future__ import annotations

from typing import Any

from tidegate.gateway.auditrecord import AuditRecord, rfc3339
from tidegate.operator.auditgather import (
    Gathered,
    audit_status,
    gather_from,
    same_audit,
    targets,
)

NOW = 1_780_000_000.0
DAY = 86400.0


def pod(name: str, ip: str | None, *, ready: bool = True, port: int | None = None) -> Any:
    ports = [{"name": "proxy", "containerPort": 3128}]
    if port is not None:
        ports.append({"name": "metrics", "containerPort": port})
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "gateway", "ports": ports}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_only_ready_pods_with_an_address_are_asked_on_their_metrics_port() -> None:
    found, total = targets(
        [
            pod("a", "10.0.0.1", port=9191),
            pod("b", "10.0.0.2", ready=False),
            pod("c", None),
            pod("d", "fd00::4"),
        ]
    )
    assert total == 4
    assert [(t.pod, t.ip, t.port) for t in found] == [
        ("a", "10.0.0.1", 9191),
        ("d", "fd00::4", 9090),
    ]
    assert found[1].url.startswith("http://[fd00::4]:9090/audit")


def _gathered(*records: AuditRecord, keys: tuple[str, ...] = ("ns/p",)) -> Gathered:
    reports = [r.report(now=NOW) for r in records]
    return gather_from(
        reports, errors=[], pods_ready=len(reports), pods_total=len(reports), keys=keys
    )


def test_malformed_report_counts_as_a_pod_not_reporting() -> None:
    good = AuditRecord()
    good.record(["ns/p"], "a.example", 443, verdict="audit", reason="r", now=NOW)
    gathered = gather_from(
        [good.report(now=NOW), {"kind": "TidegateAuditRecord", "policies": []}],
        errors=["pod-x (10.0.0.9): HTTP 500"],
        pods_ready=3,
        pods_total=3,
        keys=["ns/p"],
    )
    assert gathered.pods_reporting == 1
    assert len(gathered.errors) == 2
    assert gathered.records["ns/p"]["wouldDeny"] == 1


def test_would_deny_keeps_an_audit_policy_not_ready_and_names_what_would_break() -> None:
    record = AuditRecord()
    for _ in range(3):
        record.record(
            ["ns/p"], "new.example", 443, verdict="audit", reason="no_rule_matched", now=NOW - 60
        )
    status, cond = audit_status(
        key="ns/p",
        mode="Audit",
        gathered=_gathered(record),
        previous_audit={"since": rfc3339(NOW - 2 * DAY)},
        previous_condition={"type": "ReadyToEnforce", "status": "True", "lastTransitionTime": "x"},
        generation=4,
        quiet_seconds=DAY,
        now=NOW,
    )
    assert status["wouldDeny"] == 3 and status["destinations"][0]["host"] == "new.example"
    assert status["lastWouldDeny"] == rfc3339(NOW - 60)
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "WouldDeny")
    assert "new.example:443 (3)" in cond["message"]
    assert cond["lastTransitionTime"] == rfc3339(NOW)


def test_quiet_for_the_configured_time_is_ready_to_enforce() -> None:
    quiet = AuditRecord()
    quiet.record(["ns/p"], "old.example", 443, verdict="deny", reason="deny_rule", now=NOW - 10)
    previous = {"since": rfc3339(NOW - 3 * DAY), "lastWouldDeny": rfc3339(NOW - 2 * DAY)}
    status, cond = audit_status(
        key="ns/p",
        mode="Audit",
        gathered=_gathered(quiet),
        previous_audit=previous,
        previous_condition={"type": "ReadyToEnforce", "status": "False"},
        generation=1,
        quiet_seconds=DAY,
        now=NOW,
    )
    assert cond is not None and (cond["status"], cond["reason"]) == ("True", "NoWouldDeny")
    # A pod restart forgets counts; the last would-deny time never moves back.
    assert status["lastWouldDeny"] == rfc3339(NOW - 2 * DAY)
    # Not yet quiet long enough: observing, with the time it will be ready.
    status, cond = audit_status(
        key="ns/p",
        mode="Audit",
        gathered=_gathered(AuditRecord()),
        previous_audit={"since": rfc3339(NOW - 3600)},
        previous_condition={"type": "ReadyToEnforce", "status": "False"},
        generation=1,
        quiet_seconds=DAY,
        now=NOW,
    )
    assert cond is not None and (cond["status"], cond["reason"]) == ("False", "Observing")
    assert rfc3339(NOW - 3600 + DAY) in cond["message"]


def test_no_report_is_unknown_and_enforce_policies_get_no_condition() -> None:
    empty = gather_from(
        [], errors=["p (10.0.0.1): ClientConnectorError"], pods_ready=1, pods_total=1, keys=["ns/p"]
    )
    _, cond = audit_status(
        key="ns/p",
        mode="Audit",
        gathered=empty,
        previous_audit=None,
        previous_condition=None,
        generation=1,
        quiet_seconds=1,
        now=NOW,
    )
    assert cond is not None and (cond["status"], cond["reason"]) == ("Unknown", "NoGatewayReports")
    assert "ClientConnectorError" in cond["message"]
    status, cond = audit_status(
        key="ns/p",
        mode="Enforce",
        gathered=_gathered(AuditRecord()),
        previous_audit={"since": rfc3339(NOW - DAY)},
        previous_condition=None,
        generation=1,
        quiet_seconds=1,
        now=NOW,
    )
    assert cond is None and "since" not in status


def test_a_fresh_audit_policy_starts_observing_now() -> None:
    status, cond = audit_status(
        key="ns/p",
        mode="Audit",
        gathered=_gathered(AuditRecord()),
        previous_audit=None,
        previous_condition=None,
        generation=1,
        quiet_seconds=DAY,
        now=NOW,
    )
    assert status["since"] == rfc3339(NOW)
    assert cond is not None and cond["reason"] == "Observing"


def test_same_audit_ignores_only_the_observation_time() -> None:
    a = {"observedAt": "t1", "total": 1}
    assert same_audit({"observedAt": "t0", "total": 1}, a)
    assert not same_audit({"observedAt": "t0", "total": 2}, a)
    assert not same_audit(None, a)
