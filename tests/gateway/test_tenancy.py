"""Per-workload policies as pure tables: selectors, identity lookup, who governs whom."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

from tidegate.gateway.documents import PolicyError, parse_documents, parse_gateway, parse_policy
from tidegate.gateway.engine import Engine
from tidegate.gateway.hosts import normalize_host
from tidegate.gateway.identity import (
    HOST_NETWORK,
    ClientIdentity,
    IdentityTable,
    build_table,
    load_identity_text,
    parse_identities,
    pod_identity,
    shard_of,
)
from tidegate.gateway.selectors import SelectorError, parse_labels, parse_selector

API = "tidegate.io/v1alpha1"

# --- selector matching ---------------------------------------------------------------------

WEB = {"app": "web", "tier": "front"}
SELECTOR_CASES: list[tuple[dict[str, Any], dict[str, str], bool]] = [
    ({}, {}, True),
    ({}, WEB, True),
    ({"matchLabels": {"app": "web"}}, WEB, True),
    ({"matchLabels": {"app": "web"}}, {"app": "db"}, False),
    ({"matchLabels": {"app": "web"}}, {}, False),
    ({"matchLabels": {"app": "web", "tier": "back"}}, WEB, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]}, WEB, True),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]}, WEB, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}, {}, False),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, WEB, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, {}, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, WEB, False),
    ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, WEB, True),
    ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"app": "web"}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, WEB, False),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {}, True),
    (
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}],
        },
        WEB,
        True,
    ),
    (
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["back"]}],
        },
        WEB,
        False,
    ),
    # the label value "" is a value, not an absence
    ({"matchLabels": {"flag": ""}}, {"flag": ""}, True),
    ({"matchLabels": {"flag": ""}}, {}, False),
]


@pytest.mark.parametrize(("selector", "labels", "expected"), SELECTOR_CASES)
def test_selector_matches(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector).matches(labels) is expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"matchLabel": {"a": "b"}}, "unknown field"),
        ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "needs at least one value"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "no values"),
        ({"matchExpressions": [{"key": "a", "operator": "Has"}]}, "is not one of"),
        ({"matchLabels": {"a": 1}}, "must be a string"),
        ("app=web", "must be a mapping"),
    ],
)
def test_bad_selectors_are_rejected(selector: Any, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        parse_selector(selector)


def test_labels_flag() -> None:
    assert parse_labels("app=web, tier=front") == {"app": "web", "tier": "front"}
    assert parse_labels("") == {}
    with pytest.raises(SelectorError):
        parse_labels("app")


# --- API: who a policy may govern ----------------------------------------------------------


def test_egress_policy_sources_are_refused_with_the_migration() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(
            {
                "metadata": {"name": "p", "namespace": "team-b"},
                "spec": {"sources": {"cidrs": ["0.0.0.0/0"]}, "allow": [{"host": "x.example"}]},
            }
        )
    assert "spec.sources" in str(info.value) and "ClusterEgressPolicy" in str(info.value)


def test_cluster_policy_must_select_someone() -> None:
    with pytest.raises(PolicyError, match="selects no clients"):
        parse_policy({"kind": "ClusterEgressPolicy", "metadata": {"name": "x"}, "spec": {}})
    with pytest.raises(PolicyError, match=r"spec\.podSelector\.matchExpressions\[0\]"):
        parse_policy(
            {
                "kind": "ClusterEgressPolicy",
                "metadata": {"name": "x"},
                "spec": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
            }
        )


def test_cluster_policy_gateway_ref_needs_a_namespace() -> None:
    with pytest.raises(PolicyError, match=r"gatewayRef\.namespace"):
        parse_policy(
            {
                "kind": "ClusterEgressPolicy",
                "metadata": {"name": "x"},
                "spec": {"namespaceSelector": {}, "gatewayRef": {"name": "default"}},
            }
        )


# --- identities ----------------------------------------------------------------------------

IDENTITIES = """
apiVersion: tidegate.io/v1alpha1
kind: ClientIdentities
namespaces:
  team-a: {labels: {team: a, env: prod}}
  team-b: {labels: {team: b}}
pods:
  - {namespace: team-a, name: web-1, labels: {app: web}, addresses: [10.1.0.1, "fd00::1"]}
  - {namespace: team-a, name: batch-1, labels: {app: batch}, addresses: [10.1.0.2]}
  - {namespace: team-b, name: web-1, labels: {app: web}, addresses: [10.2.0.1]}
  - {namespace: team-c, name: lone, addresses: [10.3.0.1]}
hostNetwork: [192.168.0.10]
"""


def table() -> IdentityTable:
    return build_table(load_identity_text(IDENTITIES, source="t"))


@pytest.mark.parametrize(
    ("address", "kind", "pod", "labels", "ns_labels"),
    [
        ("10.1.0.1", "pod", "team-a/web-1", {"app": "web"}, {"team": "a", "env": "prod"}),
        ("fd00::1", "pod", "team-a/web-1", {"app": "web"}, {"team": "a", "env": "prod"}),
        (
            "::ffff:10.1.0.2",
            "pod",
            "team-a/batch-1",
            {"app": "batch"},
            {"team": "a", "env": "prod"},
        ),
        ("10.2.0.1", "pod", "team-b/web-1", {"app": "web"}, {"team": "b"}),
        ("10.3.0.1", "pod", "team-c/lone", {}, {}),  # namespace without labels listed
        ("192.168.0.10", "host_network", "", {}, {}),
        ("10.9.9.9", None, None, None, None),
    ],
)
def test_identity_lookup(
    address: str,
    kind: str | None,
    pod: str | None,
    labels: dict[str, str] | None,
    ns_labels: dict[str, str] | None,
) -> None:
    found = table().lookup(ipaddress.ip_address(address))
    if kind is None:
        assert found is None
        return
    assert found is not None
    assert (found.kind, found.pod, dict(found.labels)) == (kind, pod, labels)
    if kind == "pod":
        expected = {**(ns_labels or {}), "kubernetes.io/metadata.name": found.namespace}
        assert dict(found.namespace_labels) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pods: [{namespace: a, name: b, addresses: [10.0.0.1]}]", "apiVersion"),
        (f"apiVersion: {API}\nkind: ClientIdentities\npodz: []", "unknown field"),
        (
            f"apiVersion: {API}\nkind: ClientIdentities\npods: [{{namespace: a, name: b}}]",
            "addresses",
        ),
        (
            f"apiVersion: {API}\nkind: ClientIdentities\npods: [{{namespace: a, name: b, "
            "addresses: [10.0.0.300]}]",
            "not an IP address",
        ),
        (
            f"apiVersion: {API}\nkind: ClientIdentities\npods:\n"
            "- {namespace: a, name: b, addresses: [10.0.0.1]}\n"
            "- {namespace: a, name: c, addresses: [10.0.0.1]}",
            "claimed by both a/b and a/c",
        ),
        (f"apiVersion: {API}\nkind: ClientIdentities\nshard: 3\nshards: 2", "below shards"),
    ],
)
def test_bad_identities_are_rejected(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_identity_text(text, source="f")


def test_an_address_in_the_wrong_shard_is_rejected() -> None:
    address = ipaddress.ip_address("10.0.0.1")
    wrong = 1 - shard_of(address, 2)
    with pytest.raises(PolicyError, match="does not belong in shard"):
        parse_identities(
            {
                "apiVersion": API,
                "kind": "ClientIdentities",
                "shard": wrong,
                "shards": 2,
                "pods": [{"namespace": "a", "name": "b", "addresses": ["10.0.0.1"]}],
            }
        )


def test_an_address_claimed_by_two_shards_is_withdrawn_and_host_network_wins() -> None:
    def doc(pods: list[dict[str, Any]], host: list[str] = []) -> Any:  # noqa: B006
        return parse_identities(
            {"apiVersion": API, "kind": "ClientIdentities", "pods": pods, "hostNetwork": host}
        )

    merged = build_table(
        [
            doc([{"namespace": "a", "name": "x", "addresses": ["10.0.0.1", "10.0.0.2"]}]),
            doc([{"namespace": "b", "name": "y", "addresses": ["10.0.0.1"]}], ["10.0.0.2"]),
        ]
    )
    assert merged.lookup(ipaddress.ip_address("10.0.0.1")) is None
    assert merged.lookup(ipaddress.ip_address("10.0.0.2")) is HOST_NETWORK


def test_shard_of_is_stable() -> None:
    # A fixed value: the operator and every gateway replica must agree, across versions.
    assert shard_of(ipaddress.ip_address("10.0.0.1"), 16) == shard_of(
        ipaddress.ip_address("10.0.0.1"), 16
    )
    assert {shard_of(ipaddress.ip_address(f"10.0.{i // 256}.{i % 256}"), 4) for i in range(64)} == {
        0,
        1,
        2,
        3,
    }
    assert shard_of(ipaddress.ip_address("10.0.0.1"), 1) == 0


# --- who governs whom ----------------------------------------------------------------------

GATEWAY = {
    "metadata": {"name": "shared", "namespace": "tidegate-system"},
    "spec": {"clientCIDRs": ["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"]},
}

POLICIES = """
# team-a's own policy: its web pods may reach the payment API
- metadata: {name: web, namespace: team-a}
  spec:
    podSelector: {matchLabels: {app: web}}
    allow: [{host: api.payments.example}]
# team-b (a hostile tenant) tries to open a host for everyone and to deny team-a's host
- metadata: {name: grab, namespace: team-b}
  spec:
    allow: [{host: exfil.example}]
    deny: [{host: api.payments.example}]
# the platform team: every prod namespace may reach the package mirror
- kind: ClusterEgressPolicy
  metadata: {name: prod-mirror}
  spec:
    namespaceSelector: {matchLabels: {env: prod}}
    allow: [{host: pkgs.example}]
# the platform team: batch pods anywhere must never reach the paste site
- kind: ClusterEgressPolicy
  metadata: {name: no-paste}
  spec:
    podSelector: {matchLabels: {app: batch}}
    deny: [{host: paste.example}]
    allow: [{host: paste.example}]
# the platform team: a peered VPC, by address
- kind: ClusterEgressPolicy
  metadata: {name: peered-vpc}
  spec:
    sources: {cidrs: [10.20.0.0/16, 192.168.0.0/24]}
    allow: [{host: reports.example}]
"""


def engine(policies: str = POLICIES, **gateway_spec: Any) -> Engine:
    gateway = {**GATEWAY, "spec": {**GATEWAY["spec"], **gateway_spec}}
    return Engine(parse_gateway(gateway), tuple(parse_policy(p) for p in yaml.safe_load(policies)))


def decide(
    eng: Engine, client: str, host: str, tbl: IdentityTable | None = None
) -> tuple[str, str, str | None]:
    address = ipaddress.ip_address(client)
    identity = (tbl or table()).lookup(address)
    d = eng.decide(address, normalize_host(host), 443, identity)
    return d.verdict, d.reason, d.policy


GOVERN_CASES = [
    # team-a's web pod: its own policy allows; team-b's deny does not reach it
    ("10.1.0.1", "api.payments.example", ("allow", "allow_rule", "team-a/web")),
    ("fd00::1", "api.payments.example", ("allow", "allow_rule", "team-a/web")),
    # team-b's allow opens nothing for team-a
    ("10.1.0.1", "exfil.example", ("deny", "no_rule_matched", None)),
    # team-a's batch pod: not selected by team-a/web's podSelector
    ("10.1.0.2", "api.payments.example", ("deny", "no_rule_matched", None)),
    # team-b's own pods: its policy governs them (allow and deny)
    ("10.2.0.1", "exfil.example", ("allow", "allow_rule", "team-b/grab")),
    ("10.2.0.1", "api.payments.example", ("deny", "deny_rule", "team-b/grab")),
    # cluster policy by namespaceSelector: team-a is prod, team-b is not
    ("10.1.0.2", "pkgs.example", ("allow", "allow_rule", "prod-mirror")),
    ("10.2.0.1", "pkgs.example", ("deny", "no_rule_matched", None)),
    # cluster policy by podSelector across namespaces; its deny beats its allow
    ("10.1.0.2", "paste.example", ("deny", "deny_rule", "no-paste")),
    ("10.1.0.1", "paste.example", ("deny", "no_rule_matched", None)),
    # peered-VPC cidr clients: only the cidr policy governs them
    ("10.20.3.4", "reports.example", ("allow", "allow_rule", "peered-vpc")),
    ("10.20.3.4", "pkgs.example", ("deny", "no_rule_matched", None)),
    ("10.20.3.4", "exfil.example", ("deny", "no_rule_matched", None)),
    # unknown in-cluster address: governed by no selector, no namespaced policy
    ("10.9.9.9", "api.payments.example", ("deny", "no_rule_matched", None)),
    ("10.9.9.9", "exfil.example", ("deny", "no_rule_matched", None)),
    ("10.9.9.9", "pkgs.example", ("deny", "no_rule_matched", None)),
    # hostNetwork (node) address: only cidr sources (192.168.0.0/24 covers it)
    ("192.168.0.10", "reports.example", ("allow", "allow_rule", "peered-vpc")),
    ("192.168.0.10", "pkgs.example", ("deny", "no_rule_matched", None)),
]


@pytest.mark.parametrize(("client", "host", "expected"), GOVERN_CASES)
def test_who_governs_whom(client: str, host: str, expected: tuple[str, str, str | None]) -> None:
    assert decide(engine(), client, host) == expected


@pytest.mark.parametrize("admission", ["All", "Same", "Selector"])
def test_team_b_can_neither_allow_nor_deny_for_team_a(admission: str) -> None:
    """Whatever allowedPolicyNamespaces admits, team-b's policy stops at team-b's pods."""
    spec: dict[str, Any] = {"from": admission}
    if admission == "Selector":
        spec["selector"] = {"matchLabels": {"team": "b"}}
    eng = engine(allowedPolicyNamespaces=spec)
    assert decide(eng, "10.1.0.1", "exfil.example")[0] == "deny"
    assert decide(eng, "10.1.0.1", "api.payments.example")[0] == "allow"
    # and in Allow-by-default gateways, team-b's deny still cannot block team-a
    eng = engine(defaultAction="Allow")
    assert decide(eng, "10.1.0.1", "api.payments.example")[0] == "allow"
    assert decide(eng, "10.2.0.1", "api.payments.example")[0] == "deny"


def test_a_label_change_moves_a_pod_between_policies() -> None:
    eng = engine()
    before = table()
    assert decide(eng, "10.1.0.2", "api.payments.example", before)[0] == "deny"
    relabelled = build_table(
        load_identity_text(
            IDENTITIES.replace("labels: {app: batch}", "labels: {app: web}"), source="t"
        )
    )
    assert decide(eng, "10.1.0.2", "api.payments.example", relabelled)[0] == "allow"
    assert decide(eng, "10.1.0.2", "paste.example", relabelled)[1] == "no_rule_matched"


def test_default_deny_is_audit_only_when_every_governing_policy_audits() -> None:
    eng = engine(
        """
- metadata: {name: learn, namespace: team-a}
  spec: {mode: Audit, allow: [{host: x.example}]}
- kind: ClusterEgressPolicy
  metadata: {name: strict-prod}
  spec: {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: web}}}
"""
    )
    # batch-1 is governed by team-a/learn (Audit) only; web-1 also by strict-prod (Enforce)
    assert decide(eng, "10.1.0.2", "y.example")[0] == "audit"
    assert decide(eng, "10.1.0.1", "y.example")[0] == "deny"
    # an unknown client is governed by nobody: a plain deny
    assert decide(eng, "10.9.9.9", "y.example")[0] == "deny"


def test_client_kinds() -> None:
    eng, tbl = engine(), table()

    def kind(address: str) -> str:
        ip = ipaddress.ip_address(address)
        return eng.client_kind(ip, tbl.lookup(ip))

    assert [kind(a) for a in ("10.1.0.1", "192.168.0.10", "10.20.0.1", "10.9.9.9")] == [
        "pod",
        "host_network",
        "cidr",
        "unknown_client",
    ]


def test_governing_sets_are_memoised_per_label_set() -> None:
    eng = engine()
    a = pod_identity("team-a", "one", {"app": "web"}, {"env": "prod", "team": "a"})
    b = pod_identity("team-a", "two", {"app": "web"}, {"team": "a", "env": "prod"})
    assert eng.governing(a) is eng.governing(b)  # same labels, other pod: one memo entry
    keys = sorted(eng.policies[i].key for i in eng.governing(a).members)
    assert keys == ["prod-mirror", "team-a/web"]
    assert not eng.governing(HOST_NETWORK).members
    assert not eng.governing(None).members


def test_destination_cidr_exception_follows_the_governing_policy() -> None:
    eng = engine(
        """
- metadata: {name: db, namespace: team-a}
  spec: {allow: [{cidr: 10.50.0.0/16, ports: [5432]}]}
"""
    )
    tbl = table()
    dest = ipaddress.ip_address("10.50.0.9")
    for client, blocked in (("10.1.0.1", None), ("10.2.0.1", "private"), ("10.9.9.9", "private")):
        ip = ipaddress.ip_address(client)
        assert eng.destination_blocked(dest, ip, tbl.lookup(ip), port=5432) == blocked


def test_decision_cost_stays_in_microseconds_with_many_policies() -> None:
    """1,000 policies in 200 namespaces, 10,000 pods: one decision is still a few probes."""
    import time

    docs = []
    for i in range(1000):
        docs.append(
            {
                "metadata": {"name": f"p{i}", "namespace": f"ns{i % 200}"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": f"app{i % 7}"}},
                    "allow": [{"host": f"h{i}.example"}, {"host": f"*.s{i}.example"}],
                },
            }
        )
    eng = Engine(parse_gateway(GATEWAY), tuple(parse_policy(d) for d in docs))
    identities: dict[Any, ClientIdentity] = {}
    for j in range(10_000):
        ns = f"ns{j % 200}"
        identities[ipaddress.ip_address(f"10.{j // 65536}.{(j // 256) % 256}.{j % 256}")] = (
            pod_identity(ns, f"pod{j}", {"app": f"app{j % 7}"}, {"team": ns})
        )
    tbl = IdentityTable(identities)
    clients = list(identities)[:500]
    host = normalize_host("h5.example")
    for c in clients:  # warm the memo
        eng.decide(c, host, 443, tbl.lookup(c))
    started = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        for c in clients:
            eng.decide(c, host, 443, tbl.lookup(c))
    per = (time.perf_counter() - started) / (rounds * len(clients))
    assert per < 100e-6, f"{per * 1e6:.1f} us per decision"


def test_documents_accept_cluster_policies_and_name_them_apart() -> None:
    text = f"""
apiVersion: {API}
kind: ClusterEgressPolicy
metadata: {{name: base}}
spec: {{namespaceSelector: {{}}, allow: [{{host: a.example}}]}}
---
apiVersion: {API}
kind: EgressPolicy
metadata: {{name: base, namespace: team-a}}
spec: {{allow: [{{host: b.example}}]}}
"""
    docs = parse_documents(text)
    assert sorted(p.key for p in docs.policies) == ["base", "team-a/base"]


def test_operator_files_are_used_only_as_a_complete_layout() -> None:
    """The projected identities files: index + every shard of its layout, or nothing."""
    from tidegate.gateway.sources import complete_layout

    address = ipaddress.ip_address("10.0.0.1")
    home = shard_of(address, 2)

    def shard(i: int, shards: int, generation: int, pods: list[dict[str, Any]]) -> Any:
        return parse_identities(
            {
                "apiVersion": API,
                "kind": "ClientIdentities",
                "generation": generation,
                "shard": i,
                "shards": shards,
                "pods": pods,
            }
        )

    index = parse_identities(
        {"apiVersion": API, "kind": "ClientIdentities", "generation": 5, "shards": 2}
    )
    pod = [{"namespace": "a", "name": "x", "addresses": ["10.0.0.1"]}]
    first, other = shard(home, 2, 4, pod), shard(1 - home, 2, 3, [])
    stale = shard(0, 1, 2, [])  # a shard of the previous one-shard layout
    assert complete_layout([index, first]) is None
    assert complete_layout([index, first, stale]) is None
    docs = complete_layout([index, stale, first, other])
    assert docs is not None and len(docs) == 3
    assert build_table(docs).lookup(address) is not None
    plain = parse_identities({"apiVersion": API, "kind": "ClientIdentities", "pods": pod})
    assert complete_layout([plain]) == [plain]
