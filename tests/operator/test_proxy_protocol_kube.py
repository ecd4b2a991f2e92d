"""spec.service.proxyProtocol on a real kube-apiserver: the CRD accepts the field and
refuses its mistakes, and the Deployment and Service rendered from the *stored* object (with
the server's defaults) are accepted and keep the gateway flags and the AWS annotation.

What this cannot test: that an AWS load balancer then sends the header (no AWS here); the
gateway's side of the header is tested through the real proxy in
tests/gateway/test_proxy_protocol_listener.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fixtures_kube import ControlPlane
from kubehelpers import get, install_crds

from tidegate.gateway.documents import parse_gateway
from tidegate.operator.render import Names, render_deployment, render_service

pytestmark = [pytest.mark.kube, pytest.mark.timeout(120)]

NS = "pp-test"
ANN = "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> ControlPlane:
    install_crds(control_plane)
    control_plane.ensure_namespace(NS)
    return control_plane


def gateway(name: str, service: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": name, "namespace": NS},
        # scheme internal: the field under test does not depend on it, and it stays valid
        # whatever the CRD's rules for internet-facing load balancers are.
        "spec": {"service": {"scheme": "internal", **service}},
    }


def create(cp: ControlPlane, obj: dict[str, Any], *, dry_run: bool = False) -> Any:
    args = ["create", "-o", "json", "-f", "-"]
    if dry_run:
        args.insert(1, "--dry-run=server")
    return cp.kubectl(*args, input=json.dumps(obj), check=False)


@pytest.mark.parametrize(
    ("service", "fragment"),
    [
        pytest.param({"proxyProtocol": {}}, "trustedCIDRs: Required value", id="no-ranges"),
        pytest.param(
            {"proxyProtocol": {"trustedCIDRs": []}}, "should have at least 1 items", id="empty"
        ),
        pytest.param({"proxyProtocol": {"trustedCIDRs": ["10.0.0.0/33"]}}, "cidr", id="bad-cidr"),
        pytest.param(
            {"annotations": {ANN: "*"}},
            "turn the PROXY protocol on with service.proxyProtocol",
            id="annotation-by-hand",
        ),
    ],
)
def test_crd_refuses_mistakes(
    cluster: ControlPlane, service: dict[str, Any], fragment: str
) -> None:
    proc = create(cluster, gateway("bad", service), dry_run=True)
    assert proc.returncode != 0
    assert fragment in proc.stderr, proc.stderr


def test_rendered_objects_from_the_stored_gateway_are_accepted(cluster: ControlPlane) -> None:
    trusted = ["10.0.64.0/24", "10.0.65.17/32", "fd00:10::/64"]
    proc = create(cluster, gateway("edge", {"proxyProtocol": {"trustedCIDRs": trusted}}))
    assert proc.returncode == 0, proc.stderr
    stored = json.loads(proc.stdout)
    assert stored["spec"]["service"]["proxyProtocol"] == {"trustedCIDRs": trusted}

    model = parse_gateway(stored)
    names = Names("edge", NS)
    for obj in (render_deployment(model, names), render_service(model, names)):
        proc = cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(obj))
        assert proc.returncode == 0, proc.stderr

    dep = get(cluster, "deployment", names.workload, NS)
    assert dep is not None
    args = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    i = args.index("--proxy-protocol")
    assert args[i + 1 : i + 2 + len(trusted)] == ["--proxy-protocol-from", *trusted]
    svc = get(cluster, "service", names.workload, NS)
    assert svc is not None
    annotations = svc["metadata"]["annotations"]
    assert annotations[ANN] == "*"
    target_group = annotations[
        "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"
    ]
    assert "preserve_client_ip.enabled=false" in target_group.split(",")


def test_without_the_field_nothing_is_rendered(cluster: ControlPlane) -> None:
    proc = create(cluster, gateway("plain", {}))
    assert proc.returncode == 0, proc.stderr
    model = parse_gateway(json.loads(proc.stdout))
    names = Names("plain", NS)
    args = render_deployment(model, names)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--proxy-protocol" not in args
    annotations = render_service(model, names)["metadata"].get("annotations") or {}
    assert ANN not in annotations
