"""Pure tests of the operator's renderers, binding, bundle storage and status builders."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import pytest

from tidegate.gateway.bundle import load_bundle
from tidegate.gateway.documents import parse_gateway, parse_policy
from tidegate.operator.binding import admits, bind, gateway_key_of, make_entry, selector_matches
from tidegate.operator.bundlemap import (
    EMPTY,
    BundleTooLarge,
    compile_for_store,
    read_stored,
    render_bundle_configmap,
)
from tidegate.operator.main import build_parser
from tidegate.operator.render import (
    Names,
    Owner,
    render_deployment,
    render_hpa,
    render_pdb,
    render_role,
    render_service,
    render_workload,
)
from tidegate.operator.status import (
    addresses_of,
    gateway_readiness,
    gateway_status,
    policy_status,
    ready_condition,
)

NAMES = Names("default", "tidegate-system")
OWNER = Owner("default", "uid-1")
AWS = "service.beta.kubernetes.io/aws-load-balancer-"


def gw(spec: dict[str, Any] | None = None, name: str = "default", ns: str = "tidegate-system"):
    return parse_gateway({"metadata": {"name": name, "namespace": ns}, "spec": spec or {}})


def policy_body(name: str, ns: str, spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": ns, "generation": generation, "uid": name},
        "spec": spec,
    }


# --- workload -----------------------------------------------------------------------------


def test_deployment_is_secure_and_bundle_independent() -> None:
    dep = render_deployment(gw(), NAMES, owner=OWNER)
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "tidegate",
        "gateway",
        "--bundle",
        "/etc/tidegate/bundle/bundle.json",
        "--configmap",
        "tidegate-system/default-bundle",
        "--identities",
        "/etc/tidegate/identities",
        "--identities-configmap",
        "tidegate-system/default-identities",
        "--listen",
        "0.0.0.0:3128",
        "--metrics-listen",
        "0.0.0.0:9090",
    ]
    assert {p["containerPort"] for p in container["ports"]} == {3128, 9090}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    sc = container["securityContext"]
    assert sc["runAsUser"] == 65532 and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["allowPrivilegeEscalation"] is False
    items = pod["volumes"][0]["configMap"]["items"]
    assert {i["key"] for i in items} == {"bundle.json", "bundle.json.gz"}
    assert pod["volumes"][0]["configMap"]["optional"] is True
    assert dep["spec"]["replicas"] == 2
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # Only static annotations (Prometheus scraping): nothing that changes with the bundle.
    assert dep["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
    }
    # zone spread by default
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"


def test_deployment_passthrough_and_image() -> None:
    spec = {
        "replicas": 3,
        "image": "registry.invalid/tidegate:9",
        "resources": {"requests": {"cpu": "1"}},
        "nodeSelector": {"pool": "egress"},
        "tolerations": [{"key": "egress", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "topologySpread": "none",
    }
    dep = render_deployment(gw(spec), NAMES, image="ignored:1")
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.invalid/tidegate:9"
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "1"}}
    assert pod["nodeSelector"] == {"pool": "egress"}
    assert pod["tolerations"][0]["key"] == "egress"
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert "topologySpreadConstraints" not in pod
    assert dep["spec"]["replicas"] == 3
    assert (
        render_deployment(gw(), NAMES, image="mine:2")["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        == "mine:2"
    )


def test_autoscaling_gives_hpa_and_hands_replicas_over() -> None:
    g = gw(
        {"autoscaling": {"minReplicas": 3, "maxReplicas": 9, "targetCPUUtilizationPercentage": 60}}
    )
    hpa = render_hpa(g, NAMES)
    assert hpa is not None
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert hpa["spec"]["scaleTargetRef"]["name"] == "default-gateway"
    # first creation starts at minReplicas; afterwards the live (HPA-chosen) count stays
    assert render_deployment(g, NAMES)["spec"]["replicas"] == 3
    assert render_deployment(g, NAMES, current_replicas=7)["spec"]["replicas"] == 7
    assert render_hpa(gw(), NAMES) is None
    kinds = [o["kind"] for o in render_workload(g, NAMES)]
    assert kinds[-1] == "HorizontalPodAutoscaler"
    assert "HorizontalPodAutoscaler" not in [o["kind"] for o in render_workload(gw(), NAMES)]


def test_service_with_eips() -> None:
    g = gw(
        {
            "service": {
                "scheme": "internet-facing",
                "eipAllocations": ["eipalloc-0a1", "eipalloc-0b2"],
                "subnets": ["subnet-1", "subnet-2"],
                "loadBalancerSourceRanges": ["198.51.100.0/24"],
                "annotations": {"x/extra": "1", f"{AWS}type": "nlb-ip"},
            }
        }
    )
    svc = render_service(g, NAMES)
    ann = svc["metadata"]["annotations"]
    assert ann[f"{AWS}type"] == "nlb-ip"  # extra annotations win
    assert ann[f"{AWS}nlb-target-type"] == "ip"
    assert ann[f"{AWS}eip-allocations"] == "eipalloc-0a1,eipalloc-0b2"
    assert ann[f"{AWS}subnets"] == "subnet-1,subnet-2"
    assert ann[f"{AWS}scheme"] == "internet-facing"
    assert ann["x/extra"] == "1"
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["loadBalancerSourceRanges"] == ["198.51.100.0/24"]
    assert svc["spec"]["ports"] == [
        {"name": "proxy", "port": 3128, "targetPort": "proxy", "protocol": "TCP"}
    ]


def test_service_defaults_are_internal_and_keep_client_addresses() -> None:
    svc = render_service(gw(), NAMES)
    ann = svc["metadata"]["annotations"]
    assert not any("eip" in k or "subnets" in k for k in ann)
    assert ann[f"{AWS}scheme"] == "internal"
    assert ann[f"{AWS}nlb-target-type"] == "ip"
    assert ann[f"{AWS}target-group-attributes"] == "preserve_client_ip.enabled=true"
    # ip targets: no NodePort on every node (reached there, clients would arrive SNATed)
    assert svc["spec"]["allocateLoadBalancerNodePorts"] is False
    assert "externalTrafficPolicy" not in svc["spec"]
    assert "loadBalancerSourceRanges" not in svc["spec"]
    svc = render_service(gw({"service": {"type": "ClusterIP"}}), NAMES)
    assert "annotations" not in svc["metadata"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert "allocateLoadBalancerNodePorts" not in svc["spec"]


def test_pdb_and_role() -> None:
    assert render_pdb(gw(), NAMES)["spec"]["maxUnavailable"] == 1
    role = render_role(NAMES)
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [
                "default-bundle",
                "default-identities",
                *(f"default-identities-{i}" for i in range(32)),
            ],
            "verbs": ["get", "list", "watch"],
        }
    ]


# --- binding ------------------------------------------------------------------------------


def test_gateway_key_defaults() -> None:
    assert gateway_key_of({}, "ci", "tidegate-system/default") == "tidegate-system/default"
    assert gateway_key_of({"gatewayRef": {"name": "gw"}}, "ci", "x/y") == "ci/gw"
    assert gateway_key_of({"gatewayRef": {"name": "gw", "namespace": "n"}}, "ci", "x/y") == "n/gw"


def test_selector_and_admission() -> None:
    same = gw({"allowedPolicyNamespaces": {"from": "Same"}})
    assert admits(same, "tidegate-system", {}) and not admits(same, "ci", {})
    sel = gw(
        {
            "allowedPolicyNamespaces": {
                "from": "Selector",
                "selector": {
                    "matchLabels": {"team": "a"},
                    "matchExpressions": [
                        {"key": "env", "operator": "In", "values": ["prod"]},
                        {"key": "legacy", "operator": "DoesNotExist"},
                    ],
                },
            }
        }
    )
    assert admits(sel, "x", {"team": "a", "env": "prod"})
    assert not admits(sel, "x", {"team": "a", "env": "dev"})
    assert not admits(sel, "x", {"team": "a", "env": "prod", "legacy": "1"})
    assert not admits(sel, "x", None)  # unknown namespace: fail closed
    s = sel.allowed_policy_namespaces
    assert selector_matches(
        type(s)("Selector", {}, ({"key": "k", "operator": "NotIn", "values": ["v"]},)), {}
    )
    assert not selector_matches(type(s)("Selector", {}, ({"key": "k", "operator": "Bogus"},)), {})


def test_bind_verdicts_and_last_good() -> None:
    g = gw({"allowedPolicyNamespaces": {"from": "Same"}})
    good = make_entry(policy_body("good", "tidegate-system", {"allow": [{"host": "a.com"}]}))
    other_ns = make_entry(
        policy_body(
            "far",
            "ci",
            {
                "gatewayRef": {"name": "default", "namespace": "tidegate-system"},
                "allow": [{"host": "b.com"}],
            },
        )
    )
    bad = make_entry(policy_body("bad", "tidegate-system", {"allow": [{"host": "-x-.com"}]}))
    elsewhere = make_entry(policy_body("e", "ci", {"gatewayRef": {"name": "other"}}))
    previous = parse_policy(policy_body("bad", "tidegate-system", {"allow": [{"host": "ok.com"}]}))
    binding = bind(g, [good, other_ns, bad, elsewhere], {}, last_good={previous.key: previous})
    reasons = {v.entry.name: v.reason for v in binding.verdicts}
    assert reasons == {"good": "Accepted", "far": "NotAllowed", "bad": "Invalid"}
    assert {p.key for p in binding.policies} == {"tidegate-system/good", "tidegate-system/bad"}
    bad_verdict = next(v for v in binding.verdicts if v.entry.name == "bad")
    assert "last accepted version stays in force" in bad_verdict.message
    assert "spec.allow[0].host" in bad_verdict.message
    good_verdict = next(v for v in binding.verdicts if v.entry.name == "good")
    assert good_verdict.message == "1 rules bound to tidegate-system/default"
    # without a previous version the invalid policy is simply left out
    binding = bind(g, [bad], {})
    assert binding.policies == [] and "not in the bundle" in binding.verdicts[0].message


# --- bundle storage -------------------------------------------------------------------------


def test_bundle_generation_bumps_only_on_change() -> None:
    g = gw()
    p = [parse_policy(policy_body("a", "ci", {"allow": [{"host": "a.com"}]}))]
    first = compile_for_store(g, p, EMPTY)
    assert first.changed and first.generation == 1 and not first.compressed
    cm = render_bundle_configmap(NAMES, first, OWNER)
    assert cm["metadata"]["name"] == "default-bundle"
    assert cm["metadata"]["annotations"]["tidegate.io/bundle-generation"] == "1"
    stored = read_stored(cm)
    again = compile_for_store(g, p, stored)
    assert not again.changed and again.generation == 1
    # a status that remembers a later generation wins over a recreated ConfigMap
    assert compile_for_store(g, p, EMPTY, known_generation=5).generation == 6
    # a hand-edited payload is rewritten even though the sha annotation still matches
    cm["data"]["bundle.json"] = cm["data"]["bundle.json"].replace("a.com", "evil.com")
    assert compile_for_store(g, p, read_stored(cm)).changed
    changed = compile_for_store(g, [], stored)
    assert changed.changed and changed.generation == 2
    assert load_bundle(changed.raw).generation == 2


def _many_policies(n: int, hosts: int, *, random: bool = False) -> list[Any]:
    import os

    out = []
    for i in range(n):
        allow = [
            {"host": (os.urandom(20).hex() if random else f"h{j}-{i}") + ".example.com"}
            for j in range(hosts)
        ]
        out.append(parse_policy(policy_body(f"p{i}", "ci", {"allow": allow})))
    return out


def test_large_bundle_is_gzipped_and_huge_one_refused() -> None:
    g = gw()
    big = compile_for_store(g, _many_policies(60, 600), EMPTY)
    assert big.compressed and big.bytes > 900 * 1024
    cm = render_bundle_configmap(NAMES, big)
    assert "data" not in cm
    packed = base64.b64decode(cm["binaryData"]["bundle.json.gz"])
    assert json.loads(gzip.decompress(packed))["sha256"] == big.sha256
    assert read_stored(cm).raw == big.raw
    with pytest.raises(BundleTooLarge, match="previous bundle stays in force"):
        compile_for_store(g, _many_policies(100, 600, random=True), EMPTY)


# --- status --------------------------------------------------------------------------------


def test_condition_transition_time_preserved() -> None:
    first = ready_condition(ready=True, reason="Accepted", message="m", generation=1, now="T1")
    again = ready_condition(
        ready=True, reason="Accepted", message="m2", generation=2, previous=[first], now="T2"
    )
    assert again["lastTransitionTime"] == "T1" and again["observedGeneration"] == 2
    flipped = ready_condition(
        ready=False, reason="Invalid", message="x", generation=3, previous=[again], now="T3"
    )
    assert flipped["lastTransitionTime"] == "T3" and flipped["status"] == "False"


def test_policy_and_gateway_status() -> None:
    st = policy_status("Accepted", "5 rules bound to a/b", generation=4, gateway="a/b", rules=5)
    assert st["observedGeneration"] == 4 and st["rules"] == 5 and st["gateway"] == "a/b"
    assert st["conditions"][0]["reason"] == "Accepted"
    prev = {"policies": 3, "addresses": ["1.2.3.4"], "bundle": {"generation": 2}}
    gs = gateway_status(generation=7, previous=prev, reason="Invalid", message="x", ready=False)
    assert gs["policies"] == 3 and gs["bundle"] == {"generation": 2}  # kept
    assert gs["observedGeneration"] == 7


def test_addresses_and_readiness() -> None:
    svc = {
        "status": {
            "loadBalancer": {
                "ingress": [
                    {"ip": "203.0.113.1"},
                    {"hostname": "lb.example"},
                    {"ip": "203.0.113.1"},
                ]
            }
        }
    }
    assert addresses_of(svc) == ["203.0.113.1", "lb.example"]
    assert addresses_of(None) == []
    assert (
        gateway_readiness(
            wanted_replicas=2, ready_replicas=0, service_type="ClusterIP", addresses=[]
        )[1]
        == "Progressing"
    )
    assert (
        gateway_readiness(
            wanted_replicas=2, ready_replicas=2, service_type="LoadBalancer", addresses=[]
        )[1]
        == "AwaitingAddress"
    )
    ok, reason, message = gateway_readiness(
        wanted_replicas=2, ready_replicas=1, service_type="LoadBalancer", addresses=["1.1.1.1"]
    )
    assert ok and reason == "Available" and "1/2" in message
    assert (
        gateway_readiness(
            wanted_replicas=0, ready_replicas=0, service_type="ClusterIP", addresses=[]
        )[1]
        == "ScaledToZero"
    )


def test_cli_defaults() -> None:
    args = build_parser().parse_args([])
    assert args.peering == "tidegate" and not args.standalone
    assert args.metrics_listen == ("0.0.0.0", 9090)
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.default_gateway == "tidegate-system/default"
    args = build_parser().parse_args(["-n", "a", "-n", "b", "--standalone"])
    assert args.namespaces == ["a", "b"] and args.standalone
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--namespace", "a", "--all-namespaces"])


def test_resync_daemon_puts_no_finalizer_on_gateways() -> None:
    """kopf gives daemons a finalizer; ours must not have one (it outlived the operator on
    ``helm uninstall``). Fails loudly if kopf's registry changes shape."""
    import kopf

    from tidegate.operator import handlers

    daemons = [
        h
        for h in kopf.get_default_registry()._spawning.get_all_handlers()
        if getattr(h, "fn", None) is handlers.gateway_resync
    ]
    assert len(daemons) == 1
    assert daemons[0].requires_finalizer is False


def test_hand_added_entries_of_exclusive_lists() -> None:
    from tidegate.operator.reconcile import hand_added_entries

    rendered = {"kind": "Service", "spec": {"ports": [{"name": "proxy", "port": 3128}]}}
    same = {"spec": {"ports": [{"name": "proxy", "port": 3128, "protocol": "TCP"}]}}
    assert hand_added_entries(rendered, same) is None
    fewer: dict[str, Any] = {"spec": {"ports": []}}
    assert hand_added_entries(rendered, fewer) is None  # apply itself puts ours back
    more = {"spec": {"ports": [*same["spec"]["ports"], {"name": "admin", "port": 9090}]}}
    assert hand_added_entries(rendered, more) == (("spec", "ports"), rendered["spec"]["ports"])
    udp = {"spec": {"ports": [{"port": 3128, "protocol": "UDP"}, {"port": 3128}]}}
    assert hand_added_entries(rendered, udp) is not None
    deployment = {
        "kind": "Deployment",
        "spec": {"template": {"spec": {"containers": [{"name": "gateway"}]}}},
    }
    sidecar = {"spec": {"template": {"spec": {"containers": [{"name": "gateway"}, {"name": "x"}]}}}}
    assert hand_added_entries(deployment, sidecar) is not None
    assert hand_added_entries({"kind": "ConfigMap"}, {}) is None
