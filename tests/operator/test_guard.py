"""Pure tests of the bypass guard: which namespaces, and the NetworkPolicy each one gets."""

from __future__ import annotations

from typing import Any

from tidegate.operator.guard import (
    guard_label_selector,
    guarded_namespaces,
    policy_name,
    render_guard_policy,
    stale,
)
from tidegate.operator.render import Names

NAMES = Names("egress", "platform")
LABELS = {
    "team-a": {"tidegate.io/guard": "on", "team": "a"},
    "team-b": {"tidegate.io/guard": "on", "team": "b"},
    "team-c": {"team": "c"},
    "platform": {"tidegate.io/guard": "on"},  # the gateway's own namespace
    "kube-system": {"tidegate.io/guard": "on"},
    "kube-public": {"tidegate.io/guard": "on"},
    "dns": {"tidegate.io/guard": "on"},
}


def spec(**extra: Any) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"tidegate.io/guard": "on"}}, **extra}


def test_selection_skips_the_namespaces_that_must_stay_open() -> None:
    assert guarded_namespaces(NAMES, spec(), LABELS) == ["dns", "team-a", "team-b"]
    assert guarded_namespaces(NAMES, spec(dns={"namespace": "dns"}), LABELS) == [
        "team-a",
        "team-b",
    ]
    by_expression = {
        "namespaceSelector": {
            "matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "c"]}]
        }
    }
    assert guarded_namespaces(NAMES, by_expression, LABELS) == ["team-a", "team-c"]
    # an empty selector guards nothing (the CRD refuses it; this is the second fence)
    assert guarded_namespaces(NAMES, {"namespaceSelector": {}}, LABELS) == []
    assert guarded_namespaces(NAMES, {"namespaceSelector": {"matchLabels": {}}}, LABELS) == []


def test_policy_allows_dns_gateway_and_listed_ranges_only() -> None:
    policy = render_guard_policy(
        NAMES, "team-a", spec(allowedCIDRs=["10.244.0.0/16", "10.0.0.1/32"]), proxy_port=3128
    )
    assert policy["metadata"]["namespace"] == "team-a"
    assert policy["metadata"]["name"] == "tidegate-guard-platform-egress"
    assert "ownerReferences" not in policy["metadata"]  # cannot cross namespaces
    body = policy["spec"]
    assert body["podSelector"] == {} and body["policyTypes"] == ["Egress"]
    dns, gateway, cidrs = body["egress"]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert gateway["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "platform"}},
            "podSelector": {"matchLabels": NAMES.selector()},
        }
    ]
    assert gateway["ports"] == [{"protocol": "TCP", "port": 3128}]
    assert cidrs == {
        "to": [{"ipBlock": {"cidr": "10.244.0.0/16"}}, {"ipBlock": {"cidr": "10.0.0.1/32"}}]
    }
    # no ranges: exactly two rules, nothing that allows "anywhere"
    bare = render_guard_policy(NAMES, "team-a", spec(), proxy_port=3128)["spec"]["egress"]
    assert len(bare) == 2 and all(rule.get("to") for rule in bare)


def test_custom_dns_and_long_names() -> None:
    policy = render_guard_policy(
        NAMES,
        "team-a",
        spec(dns={"namespace": "dns", "podLabels": {"app": "coredns"}}),
        proxy_port=3128,
    )
    assert policy["spec"]["egress"][0]["to"][0] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dns"}},
        "podSelector": {"matchLabels": {"app": "coredns"}},
    }
    long = Names("g" * 200, "n" * 63)
    name = policy_name(long)
    assert len(name) <= 253 and name != policy_name(Names("g" * 201, "n" * 63))


def test_stale_and_selector() -> None:
    existing = [
        {"metadata": {"namespace": "team-a", "name": "tidegate-guard-platform-egress"}},
        {"metadata": {"namespace": "team-c", "name": "tidegate-guard-platform-egress"}},
    ]
    assert stale(existing, ["team-a", "team-b"]) == [("team-c", "tidegate-guard-platform-egress")]
    assert stale(existing, []) == sorted(
        (o["metadata"]["namespace"], o["metadata"]["name"]) for o in existing
    )
    selector = guard_label_selector(NAMES)
    assert "tidegate.io/gateway=egress" in selector
    assert "tidegate.io/gateway-namespace=platform" in selector
