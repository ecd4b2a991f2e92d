"""The operator against a real kube-apiserver (and controller-manager, for GC).

The operator runs as a subprocess, as the `tidegate operator` CLI, with a ServiceAccount
token bound to exactly the Helm chart's operator ClusterRole, so a missing permission
fails here. The tests share one operator and run in file order, like a user's session.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fixtures_kube import ControlPlane
from kubehelpers import (
    REPO,
    OperatorProcess,
    events_for,
    gateway_namespace_args,
    get,
    install_crds,
    items,
    operator_kubeconfig,
    ready,
    wait_for,
)

from tidegate.gateway.bundle import load_bundle
from tidegate.gateway.documents import parse_gateway
from tidegate.gateway.kubeaccess import load_access
from tidegate.operator.binding import make_entry
from tidegate.operator.kubeapi import ApiError, KubeClient
from tidegate.operator.reconcile import Reconciler, Views
from tidegate.operator.render import Names, Owner

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

NS = "tidegate-system"


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> ControlPlane:
    install_crds(control_plane)
    for ns in ("ci", "data", NS):
        control_plane.ensure_namespace(ns)
    return control_plane


@pytest.fixture(scope="module")
def operator(
    cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(
        cluster, operator_kubeconfig(cluster, NS), log, *gateway_namespace_args(NS)
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


def _gateway_published(cp: ControlPlane, name: str = "default", generation: int = 1) -> Any:
    gw = get(cp, "egressgateway", name, NS)
    bundle = ((gw or {}).get("status") or {}).get("bundle") or {}
    return gw if bundle.get("generation", 0) >= generation else None


def _bundle(cp: ControlPlane, name: str = "default") -> Any:
    cm = get(cp, "configmap", f"{name}-bundle", NS)
    assert cm is not None
    return cm, load_bundle(cm["data"]["bundle.json"].encode())


def test_examples_render_everything(cluster: ControlPlane, operator: OperatorProcess) -> None:
    # -R: the standalone folder's EgressGateway too (this cluster has no chart to own it)
    cluster.kubectl("apply", "-R", "-f", str(REPO / "examples"))
    gw = wait_for("the default gateway's bundle", lambda: _gateway_published(cluster), op=operator)

    # every example policy lands in the bundle and says so
    for kind, ns, name in (
        ("egp", "ci", "ci-runners"),
        ("cegp", None, "peered-vpc-discovery"),
        ("cegp", None, "package-registries"),
    ):
        policy = wait_for(
            f"{kind} {ns}/{name} Ready",
            lambda kind=kind, ns=ns, name=name: (
                p if ready(p := get(cluster, kind, name, ns)).get("status") == "True" else None
            ),
            op=operator,
        )
        cond = ready(policy)
        assert cond["reason"] == "Accepted"
        assert cond["message"].endswith("rules bound to tidegate-system/default")
        assert policy["status"]["gateway"] == "tidegate-system/default"
        assert policy["status"]["observedGeneration"] == policy["metadata"]["generation"]
    ci = get(cluster, "egp", "ci-runners", "ci")
    assert ready(ci)["message"] == "5 rules bound to tidegate-system/default"
    assert ci is not None and ci["status"]["rules"] == 5

    cm, bundle = _bundle(cluster)
    assert sorted(p.key for p in bundle.policies) == [
        "ci/ci-runners",
        "package-registries",
        "peered-vpc-discovery",
    ]
    annotations = cm["metadata"]["annotations"]
    assert annotations["tidegate.io/bundle-sha256"] == bundle.sha256
    assert annotations["tidegate.io/bundle-generation"] == str(bundle.generation)
    assert gw["status"]["bundle"]["sha256"] == bundle.sha256
    assert gw["status"]["policies"] == 3
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "EgressGateway"

    dep = wait_for("Deployment", lambda: get(cluster, "deployment", "default-gateway", NS))
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:2] == ["tidegate", "gateway"]
    assert "tidegate-system/default-bundle" in container["command"]
    assert container["image"] == "tidegate:0.1.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["serviceAccountName"] == "default-gateway"
    assert dep["spec"]["replicas"] == 2
    assert "checksum" not in json.dumps(dep["spec"]["template"]["metadata"])

    svc = wait_for("Service", lambda: get(cluster, "service", "default-gateway", NS))
    assert svc["spec"]["type"] == "LoadBalancer"
    assert (
        svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-type"]
        == "external"
    )
    assert not any("eip" in k for k in svc["metadata"]["annotations"])
    # safe defaults: internal, IP targets that keep client addresses, no NodePorts
    lb = "service.beta.kubernetes.io/aws-load-balancer-"
    assert svc["metadata"]["annotations"][f"{lb}scheme"] == "internal"
    assert (
        svc["metadata"]["annotations"][f"{lb}target-group-attributes"]
        == "preserve_client_ip.enabled=true"
    )
    assert svc["spec"]["allocateLoadBalancerNodePorts"] is False
    assert not any(p.get("nodePort") for p in svc["spec"]["ports"])
    # the in-cluster Service beside it, same pods, no load balancer
    internal = wait_for("ClusterIP Service", lambda: get(cluster, "service", "default-proxy", NS))
    assert internal["spec"]["type"] == "ClusterIP"
    assert internal["spec"]["clusterIP"]
    assert internal["spec"]["selector"] == svc["spec"]["selector"]
    assert internal["metadata"]["ownerReferences"][0]["name"] == "default"
    # the proxy variables for workloads' envFrom point at it
    env = wait_for("proxy-env", lambda: get(cluster, "configmap", "default-proxy-env", NS))
    proxy_url = "http://default-proxy.tidegate-system.svc.cluster.local:3128"
    assert env["data"]["HTTPS_PROXY"] == proxy_url and env["data"]["http_proxy"] == proxy_url
    assert ".cluster.local" in env["data"]["NO_PROXY"].split(",")
    assert env["metadata"]["ownerReferences"][0]["kind"] == "EgressGateway"
    # a workload can load it with envFrom: the API server accepts such a pod
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "uses-proxy-env", "namespace": NS},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": "app:1",
                            "envFrom": [{"configMapRef": {"name": "default-proxy-env"}}],
                            "env": [
                                {
                                    "name": "JAVA_TOOL_OPTIONS",
                                    "value": "$(TIDEGATE_JAVA_OPTIONS)",
                                }
                            ],
                        }
                    ]
                },
            }
        ]
    )
    cluster.kubectl("delete", "pod", "uses-proxy-env", "-n", NS, "--wait=false")
    identified = wait_for(
        "ClientsIdentified condition",
        lambda: next(
            (
                c
                for c in ((get(cluster, "egw", "default", NS) or {}).get("status") or {}).get(
                    "conditions"
                )
                or []
                if c["type"] == "ClientsIdentified"
            ),
            None,
        ),
        op=operator,
    )
    assert (identified["status"], identified["reason"]) == ("True", "ClientAddressPreserved")
    assert get(cluster, "pdb", "default-gateway", NS) is not None
    role = get(cluster, "role", "default-gateway", NS)
    assert role is not None and role["rules"][0]["resourceNames"][:2] == [
        "default-bundle",
        "default-identities",
    ]
    identities = wait_for(
        "the identities ConfigMap", lambda: get(cluster, "configmap", "default-identities", NS)
    )
    assert identities["metadata"]["ownerReferences"][0]["kind"] == "EgressGateway"
    assert get(cluster, "rolebinding", "default-gateway", NS) is not None
    assert get(cluster, "serviceaccount", "default-gateway", NS) is not None
    assert get(cluster, "hpa", "default-gateway", NS) is None

    # printer columns
    table = cluster.kubectl("get", "egp", "-A").stdout
    assert "ci-runners" in table and "True" in table
    # Events on the policy
    wait_for(
        "Accepted Event on ci/ci-runners",
        lambda: [
            e
            for e in events_for(cluster, "ci", "ci-runners")
            if e["reason"] == "Accepted" and e["type"] == "Normal"
        ],
        op=operator,
    )
    # metrics
    text = requests.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).text
    assert 'tidegate_operator_reconciles_total{kind="EgressGateway",result="ok"}' in text
    assert 'tidegate_operator_bundle_bytes{gateway="tidegate-system/default"}' in text
    assert requests.get(f"http://127.0.0.1:{operator.liveness_port}/healthz", timeout=5).ok


def test_load_balancer_address_and_status(cluster: ControlPlane, operator: OperatorProcess) -> None:
    gw = get(cluster, "egw", "default", NS)
    assert ready(gw)["status"] == "False"  # no kubelet: no pod is ever ready
    assert ready(gw)["reason"] == "Progressing"
    cluster.kubectl(
        "patch",
        "service",
        "default-gateway",
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "status": {
                    "loadBalancer": {
                        "ingress": [{"ip": "203.0.113.10"}, {"hostname": "gw.example.test"}]
                    }
                }
            }
        ),
    )
    gw = wait_for(
        "addresses in the gateway status",
        lambda: (
            g
            if ((g := get(cluster, "egw", "default", NS)) or {}).get("status", {}).get("addresses")
            else None
        ),
        op=operator,
    )
    assert gw["status"]["addresses"] == ["203.0.113.10", "gw.example.test"]
    assert "203.0.113.10" in cluster.kubectl("get", "egw", "-n", NS).stdout


def _ready_reason(cp: ControlPlane, ns: str, name: str, reason: str) -> Any:
    def probe() -> Any:
        policy = get(cp, "egp", name, ns)
        return policy if ready(policy).get("reason") == reason else None

    return probe


def test_invalid_policy_is_rejected_and_others_keep_working(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    _, before = _bundle(cluster)
    cluster.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressPolicy",
                "metadata": {"name": "broken", "namespace": "ci"},
                "spec": {"allow": [{"host": "-bad-.example.com"}]},
            }
        ]
    )
    policy = wait_for(
        "broken policy Invalid", _ready_reason(cluster, "ci", "broken", "Invalid"), op=operator
    )
    cond = ready(policy)
    assert cond["status"] == "False"
    assert "spec.allow[0].host" in cond["message"] and "-bad-" in cond["message"]
    wait_for(
        "Warning Event",
        lambda: [
            e
            for e in events_for(cluster, "ci", "broken")
            if e["type"] == "Warning" and e["reason"] == "Invalid"
        ],
        op=operator,
    )
    _, after = _bundle(cluster)
    assert after.sha256 == before.sha256  # nothing else changed

    # An accepted policy that becomes invalid keeps its last good version in force.
    ci = get(cluster, "egp", "ci-runners", "ci")
    assert ci is not None
    cluster.kubectl(
        "patch",
        "egp",
        "ci-runners",
        "-n",
        "ci",
        "--type=json",
        "-p",
        json.dumps(
            [{"op": "add", "path": "/spec/allow/-", "value": {"host": "x" * 64 + ".example.com"}}]
        ),
    )
    policy = wait_for(
        "ci-runners Invalid", _ready_reason(cluster, "ci", "ci-runners", "Invalid"), op=operator
    )
    assert "last accepted version stays in force" in ready(policy)["message"]
    _, kept = _bundle(cluster)
    assert "ci/ci-runners" in {p.key for p in kept.policies}
    assert kept.sha256 == before.sha256
    cluster.kubectl(
        "patch",
        "egp",
        "ci-runners",
        "-n",
        "ci",
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/spec/allow/4"}]),
    )
    wait_for(
        "ci-runners Accepted again",
        _ready_reason(cluster, "ci", "ci-runners", "Accepted"),
        op=operator,
    )
    cluster.kubectl("delete", "egp", "broken", "-n", "ci")


def test_gateway_not_found_and_not_allowed(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    cluster.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressPolicy",
                "metadata": {"name": "lost", "namespace": "ci"},
                "spec": {
                    "gatewayRef": {"name": "nowhere", "namespace": NS},
                    "allow": [{"host": "example.com"}],
                },
            },
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "private", "namespace": NS},
                "spec": {
                    "replicas": 1,
                    "service": {"type": "ClusterIP"},
                    "allowedPolicyNamespaces": {
                        "from": "Selector",
                        "selector": {"matchLabels": {"egress": "private"}},
                    },
                },
            },
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressPolicy",
                "metadata": {"name": "wants-private", "namespace": "data"},
                "spec": {
                    "gatewayRef": {"name": "private", "namespace": NS},
                    "allow": [{"host": "internal.example.com"}],
                },
            },
        ]
    )
    lost = wait_for(
        "GatewayNotFound", _ready_reason(cluster, "ci", "lost", "GatewayNotFound"), op=operator
    )
    assert "tidegate-system/nowhere" in ready(lost)["message"]
    refused = wait_for(
        "NotAllowed", _ready_reason(cluster, "data", "wants-private", "NotAllowed"), op=operator
    )
    assert "namespace data" in ready(refused)["message"]
    # labelling the namespace admits it
    cluster.kubectl("label", "namespace", "data", "egress=private")
    wait_for(
        "Accepted after labelling",
        _ready_reason(cluster, "data", "wants-private", "Accepted"),
        op=operator,
    )
    gw = wait_for(
        "private gateway bundle", lambda: _gateway_published(cluster, "private"), op=operator
    )
    assert gw["status"]["policies"] == 1
    svc = get(cluster, "service", "private-gateway", NS)
    assert svc is not None and svc["spec"]["type"] == "ClusterIP"
    assert "annotations" not in svc["metadata"] or not any(
        "aws" in k for k in svc["metadata"]["annotations"]
    )
    # creating the missing gateway binds the lost policy
    cluster.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "nowhere", "namespace": NS},
                "spec": {"replicas": 1},
            }
        ]
    )
    wait_for(
        "lost policy found its gateway",
        _ready_reason(cluster, "ci", "lost", "Accepted"),
        op=operator,
    )


def test_gateway_outside_gateway_namespaces_is_not_allowed(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    """The operator holds write permissions only in gatewayNamespaces: a gateway elsewhere
    gets NotAllowed and an Event, nothing is rendered, its policies say why."""
    cluster.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "rogue", "namespace": "data"},
                "spec": {"service": {"type": "ClusterIP"}},
            },
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressPolicy",
                "metadata": {"name": "wants-rogue", "namespace": "data"},
                "spec": {"gatewayRef": {"name": "rogue"}, "allow": [{"host": "example.com"}]},
            },
        ]
    )
    gw = wait_for(
        "rogue NotAllowed",
        lambda: (
            g
            if ready(g := get(cluster, "egw", "rogue", "data")).get("reason") == "NotAllowed"
            else None
        ),
        op=operator,
    )
    cond = ready(gw)
    assert cond["status"] == "False"
    assert "may only live in tidegate-system" in cond["message"]
    wait_for(
        "NotAllowed Event on the gateway",
        lambda: [
            e
            for e in events_for(cluster, "data", "rogue")
            if e["reason"] == "NotAllowed" and e["type"] == "Warning"
        ],
        op=operator,
    )
    policy = wait_for(
        "its policy says why",
        _ready_reason(cluster, "data", "wants-rogue", "GatewayInvalid"),
        op=operator,
    )
    assert "may only live in tidegate-system" in ready(policy)["message"]
    for kind, name in (
        ("deployment", "rogue-gateway"),
        ("service", "rogue-proxy"),
        ("configmap", "rogue-bundle"),
        ("serviceaccount", "rogue-gateway"),
    ):
        assert get(cluster, kind, name, "data") is None, kind
    cluster.kubectl("delete", "egw", "rogue", "-n", "data")
    cluster.kubectl("delete", "egp", "wants-rogue", "-n", "data")


def test_hand_edits_are_put_back(cluster: ControlPlane, operator: OperatorProcess) -> None:
    cluster.kubectl(
        "patch",
        "deployment",
        "default-gateway",
        "-n",
        NS,
        "--type=json",
        "-p",
        json.dumps(
            [
                {
                    "op": "replace",
                    "path": "/spec/template/spec/containers/0/image",
                    "value": "evil:latest",
                }
            ]
        ),
    )
    cluster.kubectl(
        "annotate",
        "service",
        "default-gateway",
        "-n",
        NS,
        "service.beta.kubernetes.io/aws-load-balancer-scheme=internet-facing",
        "--overwrite",
    )

    def reverted() -> bool:
        dep = get(cluster, "deployment", "default-gateway", NS) or {}
        svc = get(cluster, "service", "default-gateway", NS) or {}
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        scheme = svc["metadata"]["annotations"][
            "service.beta.kubernetes.io/aws-load-balancer-scheme"
        ]
        return image == "tidegate:0.1.0" and scheme == "internal"

    wait_for("hand edits reverted", reverted, op=operator)


def _identified(cp: ControlPlane) -> dict[str, Any]:
    gw = get(cp, "egw", "default", NS) or {}
    for cond in (gw.get("status") or {}).get("conditions") or []:
        if cond["type"] == "ClientsIdentified":
            return dict(cond)
    return {}


def test_unidentified_clients_are_reported(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    """What CEL cannot see (an annotation turning client-IP preservation off) becomes a
    False condition and a Warning Event; undoing it clears both."""
    attrs = "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"
    patch = {"spec": {"service": {"annotations": {attrs: "preserve_client_ip.enabled=false"}}}}
    cluster.kubectl("patch", "egw", "default", "-n", NS, "--type=merge", "-p", json.dumps(patch))
    cond = wait_for(
        "ClientsIdentified False",
        lambda: c if (c := _identified(cluster)).get("status") == "False" else None,
        op=operator,
    )
    assert cond["reason"] == "ClientAddressHidden"
    assert "load balancer's private addresses" in cond["message"]
    assert ready(get(cluster, "egw", "default", NS))["reason"] != "ClientAddressHidden"
    wait_for(
        "Warning Event ClientAddressHidden",
        lambda: [
            e
            for e in events_for(cluster, NS, "default")
            if e["reason"] == "ClientAddressHidden" and e["type"] == "Warning"
        ],
        op=operator,
    )
    cluster.kubectl(
        "patch",
        "egw",
        "default",
        "-n",
        NS,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/spec/service/annotations"}]),
    )
    wait_for(
        "ClientsIdentified True again",
        lambda: _identified(cluster).get("reason") == "ClientAddressPreserved",
        op=operator,
    )


def test_proxy_protocol_through_the_operator(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    """spec.service.proxyProtocol reaches the gateway's command and the Service; removing it
    takes both away again (client-IP preservation comes back)."""
    pp = "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"
    attrs = "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"
    patch = {"spec": {"service": {"proxyProtocol": {"trustedCIDRs": ["10.0.64.0/24"]}}}}
    cluster.kubectl("patch", "egw", "default", "-n", NS, "--type=merge", "-p", json.dumps(patch))

    def command() -> list[str]:
        dep = get(cluster, "deployment", "default-gateway", NS) or {}
        containers = ((dep.get("spec") or {}).get("template") or {}).get("spec", {})
        return list((containers.get("containers") or [{}])[0].get("command") or [])

    def annotations() -> dict[str, str]:
        svc = get(cluster, "service", "default-gateway", NS) or {}
        return dict(svc.get("metadata", {}).get("annotations") or {})

    args = wait_for("gateway flags", lambda: c if "--proxy-protocol" in (c := command()) else None)
    i = args.index("--proxy-protocol")
    assert args[i + 1 : i + 3] == ["--proxy-protocol-from", "10.0.64.0/24"]
    ann = wait_for("annotation", lambda: a if pp in (a := annotations()) else None, op=operator)
    assert ann[pp] == "*" and ann[attrs] == "preserve_client_ip.enabled=false"
    wait_for(
        "ClientsIdentified ProxyProtocol",
        lambda: _identified(cluster).get("reason") == "ProxyProtocol",
        op=operator,
    )

    cluster.kubectl(
        "patch",
        "egw",
        "default",
        "-n",
        NS,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/spec/service/proxyProtocol"}]),
    )
    wait_for("flags gone", lambda: "--proxy-protocol" not in command(), op=operator)
    ann = wait_for("annotation gone", lambda: a if pp not in (a := annotations()) else None)
    assert ann[attrs] == "preserve_client_ip.enabled=true"
    wait_for(
        "ClientsIdentified preserved again",
        lambda: _identified(cluster).get("reason") == "ClientAddressPreserved",
        op=operator,
    )


def test_hand_edit_of_a_service_port_is_put_back_and_nothing_jams(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    """3128 -> 8080 by hand: a plain re-apply would add 3128 next to it, both named "proxy",
    and be refused (422) on every retry while statuses stay unset."""
    patch = [{"op": "replace", "path": "/spec/ports/0/port", "value": 8080}]
    cluster.kubectl(
        "patch", "service", "default-gateway", "-n", NS, "--type=json", "-p", json.dumps(patch)
    )

    def ports() -> list[tuple[str, int]]:
        svc = get(cluster, "service", "default-gateway", NS) or {}
        return [(p.get("name", ""), p["port"]) for p in svc["spec"]["ports"]]

    wait_for("the Service port put back", lambda: ports() == [("proxy", 3128)], op=operator)
    # A port added by hand (here: the admin port, out through the load balancer) goes too.
    extra = [{"op": "add", "path": "/spec/ports/-", "value": {"name": "admin", "port": 9090}}]
    cluster.kubectl(
        "patch", "service", "default-gateway", "-n", NS, "--type=json", "-p", json.dumps(extra)
    )
    wait_for("the hand-added port removed", lambda: ports() == [("proxy", 3128)], op=operator)
    cluster.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressPolicy",
                "metadata": {"name": "after-port-edit", "namespace": NS},
                "spec": {"allow": [{"host": "after-port-edit.example.com"}]},
            }
        ]
    )
    wait_for(
        "a new policy's status after the edit",
        lambda: ready(get(cluster, "egp", "after-port-edit", NS)).get("reason") == "Accepted",
        op=operator,
    )
    assert "a hand edit is in the way" in operator.log.read_text()
    cluster.kubectl("delete", "egp", "after-port-edit", "-n", NS)


def test_policy_change_bumps_bundle_without_rollout(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    dep = get(cluster, "deployment", "default-gateway", NS)
    assert dep is not None
    template_before = dep["spec"]["template"]
    gw = get(cluster, "egw", "default", NS)
    assert gw is not None
    generation = gw["status"]["bundle"]["generation"]
    cluster.kubectl(
        "patch",
        "cegp",
        "package-registries",
        "--type=json",
        "-p",
        json.dumps(
            [{"op": "add", "path": "/spec/allow/-", "value": {"host": "mirror.example.org"}}]
        ),
    )
    wait_for(
        "bundle generation +1",
        lambda: _gateway_published(cluster, "default", generation + 1),
        op=operator,
    )
    _, bundle = _bundle(cluster)
    assert bundle.generation == generation + 1
    dep = get(cluster, "deployment", "default-gateway", NS)
    assert dep is not None and dep["spec"]["template"] == template_before


def test_autoscaling_and_eips(cluster: ControlPlane, operator: OperatorProcess) -> None:
    patch = {
        "spec": {
            "autoscaling": {"minReplicas": 3, "maxReplicas": 6},
            "service": {
                "scheme": "internet-facing",
                "eipAllocations": ["eipalloc-0a1", "eipalloc-0b2"],
                "subnets": ["subnet-1", "subnet-2"],
                "loadBalancerSourceRanges": ["198.51.100.0/24"],
                "annotations": {"example.test/extra": "yes"},
            },
        }
    }
    cluster.kubectl("patch", "egw", "default", "-n", NS, "--type=merge", "-p", json.dumps(patch))
    hpa = wait_for("HPA", lambda: get(cluster, "hpa", "default-gateway", NS), op=operator)
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 6

    def service_ready() -> Any:
        svc = get(cluster, "service", "default-gateway", NS) or {}
        ann = svc.get("metadata", {}).get("annotations") or {}
        return (
            svc if "service.beta.kubernetes.io/aws-load-balancer-eip-allocations" in ann else None
        )

    svc = wait_for("EIP annotations", service_ready, op=operator)
    ann = svc["metadata"]["annotations"]
    assert (
        ann["service.beta.kubernetes.io/aws-load-balancer-eip-allocations"]
        == "eipalloc-0a1,eipalloc-0b2"
    )
    assert ann["service.beta.kubernetes.io/aws-load-balancer-subnets"] == "subnet-1,subnet-2"
    assert ann["example.test/extra"] == "yes"
    assert svc["spec"]["loadBalancerSourceRanges"] == ["198.51.100.0/24"]

    cluster.kubectl(
        "patch",
        "egw",
        "default",
        "-n",
        NS,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/spec/autoscaling"}]),
    )
    wait_for("HPA removed", lambda: get(cluster, "hpa", "default-gateway", NS) is None, op=operator)


def test_restart_converges_without_duplicates(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    gw = get(cluster, "egw", "default", NS)
    assert gw is not None
    generation = gw["status"]["bundle"]["generation"]
    operator.stop()
    # while it is down: a new policy, a deleted owned object, a hand edit
    cluster.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressPolicy",
                "metadata": {"name": "while-down", "namespace": "data"},
                "spec": {"allow": [{"host": "example.org"}]},
            }
        ]
    )
    cluster.kubectl("delete", "pdb", "default-gateway", "-n", NS)
    cluster.kubectl("scale", "deployment", "default-gateway", "-n", NS, "--replicas=7")
    operator.start()
    wait_for(
        "while-down Accepted", _ready_reason(cluster, "data", "while-down", "Accepted"), op=operator
    )
    wait_for("PDB recreated", lambda: get(cluster, "pdb", "default-gateway", NS), op=operator)
    wait_for(
        "replicas put back",
        lambda: (get(cluster, "deployment", "default-gateway", NS) or {})["spec"]["replicas"] == 2,
        op=operator,
    )
    gw = wait_for(
        "bundle generation +1",
        lambda: _gateway_published(cluster, "default", generation + 1),
        op=operator,
    )
    assert gw["status"]["bundle"]["generation"] == generation + 1  # exactly one change
    selector = "-l=tidegate.io/gateway=default"
    for kind, count in (
        ("deployment", 1),
        ("service", 2),  # the load balancer and the in-cluster ClusterIP Service
        ("configmap", 4),  # the bundle, the proxy-env, the identities index and its shard
        ("pdb", 1),
        ("role", 1),
        ("rolebinding", 1),
        ("serviceaccount", 1),
    ):
        assert len(items(cluster, kind, NS, selector)) == count, kind


def test_gateway_delete_cleans_up(cluster: ControlPlane, operator: OperatorProcess) -> None:
    cluster.kubectl("delete", "egw", "private", "-n", NS)
    wait_for(
        "wants-private GatewayNotFound",
        _ready_reason(cluster, "data", "wants-private", "GatewayNotFound"),
        op=operator,
    )
    if not cluster.has_controller_manager:
        dep = get(cluster, "deployment", "private-gateway", NS)
        assert dep is not None and dep["metadata"]["ownerReferences"][0]["name"] == "private"
        return
    for kind, name in (
        ("deployment", "private-gateway"),
        ("service", "private-gateway"),
        ("service", "private-proxy"),
        ("configmap", "private-bundle"),
        ("configmap", "private-proxy-env"),
        ("pdb", "private-gateway"),
        ("role", "private-gateway"),
        ("rolebinding", "private-gateway"),
        ("serviceaccount", "private-gateway"),
    ):
        wait_for(
            f"{kind}/{name} garbage-collected",
            lambda kind=kind, name=name: get(cluster, kind, name, NS) is None,
            timeout=60,
        )


class _ConflictingClient(KubeClient):
    """Changes the ConfigMap behind the reconciler's back right before its first write."""

    def __init__(self, cp: ControlPlane, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cp = cp
        self.conflicts = 0
        self.replaced = 0

    async def replace(self, obj: Any) -> dict[str, Any]:
        if self.replaced == 0:
            self.cp.kubectl(
                "annotate",
                "configmap",
                obj["metadata"]["name"],
                "-n",
                obj["metadata"]["namespace"],
                "someone-else=was-here",
                "--overwrite",
            )
        self.replaced += 1
        try:
            return await super().replace(obj)
        except ApiError as exc:
            if exc.status == 409:
                self.conflicts += 1
            raise


def test_conflicting_write_is_retried(cluster: ControlPlane) -> None:
    ns = "conflict"
    cluster.ensure_namespace(ns)
    body = {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": "gw", "namespace": ns, "uid": "00000000-0000-0000-0000-000000000000"},
        "spec": {},
    }
    policy = {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "p", "namespace": ns, "generation": 1},
        "spec": {"gatewayRef": {"name": "gw"}, "allow": [{"host": "example.com"}]},
    }
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "gw-bundle", "namespace": ns},
                "data": {},
            }
        ]
    )

    # A real owner, so the garbage collector leaves the ConfigMap alone (no operator runs
    # for a Namespace owner, unlike for an EgressGateway).
    ns_obj = get(cluster, "namespace", ns)
    assert ns_obj is not None
    owner = Owner(ns, ns_obj["metadata"]["uid"], api_version="v1", kind="Namespace")

    async def scenario() -> _ConflictingClient:
        client = _ConflictingClient(cluster, await load_access(cluster.kubeconfig))
        try:
            reconciler = Reconciler(client)
            reconciler.views = Views(policies={f"{ns}/gw": [make_entry(policy)]})
            gateway = parse_gateway(body)
            compiled, verdicts, too_large = await reconciler._publish_bundle(
                gateway, Names("gw", ns), owner, {}
            )
            assert compiled is not None and too_large is None
            assert [v.reason for v in verdicts] == ["Accepted"]
        finally:
            await client.close()
        return client

    client = asyncio.run(scenario())
    assert client.conflicts == 1 and client.replaced == 2
    cm = get(cluster, "configmap", "gw-bundle", ns)
    assert cm is not None
    assert cm["metadata"]["annotations"]["someone-else"] == "was-here"  # re-read, not clobbered
    assert load_bundle(cm["data"]["bundle.json"].encode()).policies[0].key == f"{ns}/p"


def test_cli_help_lists_settings() -> None:
    from tidegate.operator.main import build_parser

    text = build_parser().format_help()
    for flag in (
        "--namespace",
        "--all-namespaces",
        "--peering",
        "--standalone",
        "--liveness",
        "--metrics-listen",
        "--gateway-image",
        "--kubeconfig",
    ):
        assert flag in text


_ = Path
