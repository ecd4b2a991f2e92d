"""The bypass guard on a real kube-apiserver: the operator (with the chart's RBAC) keeps one
NetworkPolicy per selected namespace, follows namespace labels, and cleans up after itself.

The API server validates and stores the NetworkPolicies; no network plugin runs here, so
whether they are *enforced* is not tested (docs/security.md says so).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fixtures_kube import ControlPlane
from kubehelpers import (
    OperatorProcess,
    gateway_namespace_args,
    get,
    install_crds,
    operator_kubeconfig,
    wait_for,
)

pytestmark = [pytest.mark.kube, pytest.mark.timeout(240)]

NS = "tidegate-system"
GUARD = "tidegate-guard-tidegate-system-guarded"
LABEL = "guard-test.tidegate.io/egress"


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> ControlPlane:
    install_crds(control_plane)
    control_plane.ensure_namespace(NS)
    return control_plane


@pytest.fixture(scope="module")
def operator(
    cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(
        cluster,
        operator_kubeconfig(cluster, NS),
        tmp_path_factory.mktemp("guard") / "op.log",
        *gateway_namespace_args(NS),
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


def _namespace(cp: ControlPlane, name: str, labels: dict[str, str]) -> None:
    cp.apply(
        [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}]
    )


def _guard(cp: ControlPlane, ns: str) -> dict[str, Any] | None:
    return get(cp, "networkpolicy", GUARD, ns)


def test_guard_follows_namespaces_and_is_cleaned_up(
    cluster: ControlPlane, operator: OperatorProcess
) -> None:
    _namespace(cluster, "guard-a", {LABEL: "on"})
    _namespace(cluster, "guard-b", {})
    cluster.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "guarded", "namespace": NS},
                "spec": {
                    "service": {"type": "ClusterIP"},
                    "egressGuard": {
                        "namespaceSelector": {"matchLabels": {LABEL: "on"}},
                        "allowedCIDRs": ["10.244.0.0/16"],
                    },
                },
            }
        ]
    )
    policy = wait_for("guard in guard-a", lambda: _guard(cluster, "guard-a"), op=operator)
    # stored by the real API server as rendered: default-deny egress with three holes
    spec = policy["spec"]
    assert spec["podSelector"] == {} and spec["policyTypes"] == ["Egress"]
    dns, gateway, cidrs = spec["egress"]
    assert dns["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    assert gateway["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": NS
    }
    assert gateway["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "guarded"
    assert gateway["ports"] == [{"protocol": "TCP", "port": 3128}]
    assert cidrs["to"] == [{"ipBlock": {"cidr": "10.244.0.0/16"}}]
    assert policy["metadata"]["labels"]["tidegate.io/gateway-namespace"] == NS
    assert _guard(cluster, "guard-b") is None
    assert _guard(cluster, NS) is None  # never the gateway's own namespace
    wait_for(
        "status.guardedNamespaces",
        lambda: (
            (get(cluster, "egw", "guarded", NS) or {}).get("status", {}).get("guardedNamespaces")
            == ["guard-a"]
        ),
        op=operator,
    )

    # a namespace joins by label, another leaves by label
    cluster.kubectl("label", "namespace", "guard-b", f"{LABEL}=on")
    wait_for("guard in guard-b", lambda: _guard(cluster, "guard-b"), op=operator)
    cluster.kubectl("label", "namespace", "guard-a", f"{LABEL}-")
    wait_for("guard-a released", lambda: _guard(cluster, "guard-a") is None, op=operator)

    # a hand edit that opens the namespace up is put back
    cluster.kubectl(
        "patch",
        "networkpolicy",
        GUARD,
        "-n",
        "guard-b",
        "--type=json",
        "-p",
        json.dumps([{"op": "add", "path": "/spec/egress/-", "value": {}}]),
    )
    wait_for(
        "guard-b restored",
        lambda: len((_guard(cluster, "guard-b") or {}).get("spec", {}).get("egress", [])) == 3,
        op=operator,
    )

    # removing the guard from the spec removes its NetworkPolicies
    cluster.kubectl(
        "patch",
        "egw",
        "guarded",
        "-n",
        NS,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/spec/egressGuard"}]),
    )
    wait_for("guard removed with the spec", lambda: _guard(cluster, "guard-b") is None, op=operator)

    # and deleting the gateway removes them too
    cluster.kubectl(
        "patch",
        "egw",
        "guarded",
        "-n",
        NS,
        "--type=merge",
        "-p",
        json.dumps(
            {"spec": {"egressGuard": {"namespaceSelector": {"matchLabels": {LABEL: "on"}}}}}
        ),
    )
    wait_for("guard back", lambda: _guard(cluster, "guard-b"), op=operator)
    cluster.kubectl("delete", "egw", "guarded", "-n", NS)
    wait_for(
        "guard deleted with the gateway", lambda: _guard(cluster, "guard-b") is None, op=operator
    )
