"""The operator notices changes to a gateway's own objects through its namespaced watches,
not through the periodic resync (set to ten minutes here), and never watches other
namespaces for them (the RBAC audit test checks the second half)."""

from __future__ import annotations

import json
from collections.abc import Iterator

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

pytestmark = [pytest.mark.kube, pytest.mark.timeout(180)]

NS = "owned-watch"


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crds(control_plane)
    op = OperatorProcess(
        control_plane,
        operator_kubeconfig(control_plane, NS),
        tmp_path_factory.mktemp("ownedwatch") / "op.log",
        *gateway_namespace_args(NS),
        "--resync-seconds",
        "600",  # the periodic resync must not be what puts things back
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


def test_changes_to_owned_objects_are_put_back_without_a_resync(
    control_plane: ControlPlane, operator: OperatorProcess
) -> None:
    cp = control_plane
    cp.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "w", "namespace": NS},
                "spec": {"replicas": 1, "service": {"type": "ClusterIP"}},
            }
        ]
    )
    env = wait_for("proxy-env", lambda: get(cp, "configmap", "w-proxy-env", NS), op=operator)
    # a tampered ConfigMap (its watch)
    cp.kubectl(
        "patch",
        "configmap",
        "w-proxy-env",
        "-n",
        NS,
        "--type=merge",
        "-p",
        json.dumps({"data": {"HTTPS_PROXY": "http://elsewhere.example:3128"}}),
    )
    wait_for(
        "HTTPS_PROXY restored",
        lambda: (
            (get(cp, "configmap", "w-proxy-env", NS) or {}).get("data", {}).get("HTTPS_PROXY")
            == env["data"]["HTTPS_PROXY"]
        ),
        timeout=20,
        op=operator,
    )
    # a deleted Service (the Service watch)
    cp.kubectl("delete", "service", "w-proxy", "-n", NS)
    wait_for(
        "ClusterIP Service recreated",
        lambda: get(cp, "service", "w-proxy", NS),
        timeout=20,
        op=operator,
    )
    # a hand-scaled Deployment (the Deployment watch)
    cp.kubectl("scale", "deployment", "w-gateway", "-n", NS, "--replicas=5")
    wait_for(
        "replicas put back",
        lambda: (get(cp, "deployment", "w-gateway", NS) or {}).get("spec", {}).get("replicas") == 1,
        timeout=20,
        op=operator,
    )
