"""The audit record end to end on the real API server: gateway -> operator -> policy status.

A real gateway process (with the token of the ServiceAccount the operator rendered for it)
serves traffic and its ``/audit`` record on loopback. The operator - running with the Helm
chart's ClusterRole - lists the gateway's pods and GETs each Ready one by pod IP. There is
no kubelet here, so the Pod object is a stand-in: created with the gateway's labels and its
metrics port, and its status (Running, Ready, podIP 127.0.0.1) written by the test the way
a kubelet would. What that leaves untested: a pod network between the operator and the
gateway pods (NetworkPolicies must let the operator reach the admin port; docs/audit.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_kube import ControlPlane
from fixtures_net import Net, gateway_doc
from kubehelpers import (
    OperatorProcess,
    free_port,
    gateway_namespace_args,
    get,
    install_crds,
    make_pod,
    operator_kubeconfig,
    wait_for,
)
from kubehelpers import (
    connect_status as kube_connect_status,
)

pytestmark = pytest.mark.kube

TIDEGATE = Path(sys.executable).parent / "tidegate"
NS = "audit-system"
GW = "watch"
API = "tidegate.io/v1alpha1"
# Long enough that a would-deny is still recent when a pass writes it (passes come every few
# seconds on a loaded machine), short enough for a test.
QUIET_SECONDS = 12


@pytest.fixture
def operator(control_plane: ControlPlane, tmp_path: Path) -> Iterator[OperatorProcess]:
    install_crds(control_plane)
    control_plane.ensure_namespace(NS)
    op = OperatorProcess(
        control_plane,
        operator_kubeconfig(control_plane, NS),
        tmp_path / "op.log",
        *gateway_namespace_args(NS),
        "--audit-interval",
        "1",
        "--ready-to-enforce-after",
        str(QUIET_SECONDS),
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()


def apply(cp: ControlPlane, doc: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))


def policy(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("gatewayRef", {"name": GW, "namespace": NS})
    return {
        "apiVersion": API,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def stand_in_pod(cp: ControlPlane, metrics_port: int) -> None:
    """A Pod object as the gateway's Deployment would make it, Ready at 127.0.0.1."""
    gateway = get(cp, "egressgateway", GW, NS)
    assert gateway is not None
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{GW}-gateway-standin",
            "namespace": NS,
            "labels": {
                "app.kubernetes.io/name": "tidegate-gateway",
                "app.kubernetes.io/instance": GW,
            },
            # A controller reference, so a ReplicaSet controller (when one runs) never adopts it.
            "ownerReferences": [
                {
                    "apiVersion": API,
                    "kind": "EgressGateway",
                    "name": GW,
                    "uid": gateway["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "gateway",
                    "image": "tidegate:test",
                    "ports": [
                        {"name": "proxy", "containerPort": 3128},
                        {"name": "metrics", "containerPort": metrics_port},
                    ],
                }
            ]
        },
    }
    apply(cp, pod)
    status = {
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    }
    cp.kubectl(
        "patch",
        "pod",
        pod["metadata"]["name"],
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


# The test client: a pod of this namespace (an object with its status written here) at its
# own loopback address, so the gateway identifies it and the namespace's policies govern it.
CLIENT_IP = "127.0.0.7"


def connect_status(port: int, target: str) -> int:
    return kube_connect_status(port, target, source=CLIENT_IP)


def test_would_deny_reaches_the_policy_status_and_quiet_policies_get_ready_to_enforce(
    control_plane: ControlPlane, operator: OperatorProcess, net: Net, tmp_path: Path
) -> None:
    cp = control_plane
    gateway = gateway_doc(net)
    gateway["metadata"] = {"name": GW, "namespace": NS}
    apply(cp, gateway)
    apply(
        cp,
        policy("svc", mode="Audit", allow=[{"host": "known.audit.test", "ports": [net.echo.port]}]),
    )
    # Governs other pods only: nothing it would deny is seen.
    others = {"matchLabels": {"app": "another-client"}}
    apply(cp, policy("quiet", mode="Audit", podSelector=others, allow=[]))
    apply(cp, policy("strict", allow=[], podSelector=others))
    wait_for("the bundle ConfigMap", lambda: get(cp, "configmap", f"{GW}-bundle", NS), op=operator)
    make_pod(cp, NS, "client", {"app": "client"}, CLIENT_IP)

    kubeconfig = cp.token_for(f"{GW}-gateway", NS)
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    argv = [
        str(TIDEGATE),
        "gateway",
        "--configmap",
        f"{NS}/{GW}-bundle",
        "--identities-configmap",
        f"{NS}/{GW}-identities",
        "--kubeconfig",
        str(kubeconfig),
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--access-log",
        "off",
    ]
    with log.open("ab") as out:
        gw = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:

        def loaded() -> bool:
            try:
                return connect_status(port, f"known.audit.test:{net.echo.port}") == 200
            except OSError:
                return False

        net.dns.set("known.audit.test", [(net.up, 30)])
        net.dns.set("new.audit.test", [(net.up, 30)])
        wait_for("the gateway to serve the bundle", loaded, timeout=30)
        for _ in range(3):
            assert connect_status(port, f"new.audit.test:{net.echo.port}") == 200  # would-deny
        stand_in_pod(cp, metrics_port)

        def recorded() -> dict[str, Any] | None:
            audit = ((get(cp, "egresspolicy", "svc", NS) or {}).get("status") or {}).get("audit")
            return audit if audit and audit.get("wouldDeny") == 3 else None

        audit = wait_for("svc's status.audit", recorded, timeout=30, op=operator)
        assert audit["podsReporting"] == 1 and audit["podsReady"] == 1
        (dest,) = audit["destinations"]
        assert (dest["host"], dest["port"], dest["wouldDeny"]) == (
            "new.audit.test",
            net.echo.port,
            3,
        )
        assert dest["reason"] == "no_rule_matched"
        svc = get(cp, "egresspolicy", "svc", NS)
        blocked = condition(svc, "ReadyToEnforce")
        assert (blocked["status"], blocked["reason"]) == ("False", "WouldDeny")
        assert f"new.audit.test:{net.echo.port} (3)" in blocked["message"]
        assert condition(svc, "Ready")["status"] == "True"  # the Ready condition survives

        described = cp.kubectl("describe", "egp", "svc", "-n", NS).stdout
        assert "new.audit.test" in described and "ReadyToEnforce" in described
        table = cp.kubectl("get", "egp", "-n", NS).stdout
        assert "WOULD-DENY" in table

        ready = wait_for(
            "quiet ReadyToEnforce",
            lambda: (
                condition(get(cp, "egresspolicy", "quiet", NS), "ReadyToEnforce").get("status")
                == "True"
                or None
            ),
            timeout=60,
            op=operator,
        )
        assert ready
        events = cp.kubectl(
            "get", "events", "-n", NS, "--field-selector", "involvedObject.name=quiet", "-o", "json"
        ).stdout
        assert any(e["reason"] == "ReadyToEnforce" for e in json.loads(events)["items"])
        # An Enforce policy carries the record but no ReadyToEnforce condition.
        strict = wait_for(
            "strict status.audit",
            lambda: ((get(cp, "egresspolicy", "strict", NS) or {}).get("status") or {}).get(
                "audit"
            ),
            timeout=30,
            op=operator,
        )
        assert strict["podsReporting"] == 1
        assert condition(get(cp, "egresspolicy", "strict", NS), "ReadyToEnforce") == {}
    finally:
        gw.terminate()
        gw.wait(15)
