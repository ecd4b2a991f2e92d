"""The README's install command on a fresh, real cluster, then the operator as its pod runs.

A control plane of its own (a few seconds to start), so `helm install` meets a cluster with
nothing in it - exactly what a user's first install meets - and no other test's CRDs.

1. `helm install tidegate charts/tidegate -n tidegate-system --create-namespace`;
2. the CRDs, the operator's workload and RBAC, the ClusterKopfPeering and the default
   EgressGateway exist;
3. the operator, started locally with the chart's arguments and the token of the chart's
   ServiceAccount (so with exactly the chart's RBAC, and with peering on), reconciles the
   default gateway and accepts an example policy;
4. `helm uninstall` removes the workload and keeps the CRDs (Helm never deletes what it
   installed from a chart's crds/ folder), so no policy is deleted by accident.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_kube import ControlPlane, ensure_binaries, start_control_plane
from helmlib import NO_HELM, find_helm

pytestmark = [pytest.mark.kube, pytest.mark.skipif(find_helm() is None, reason=NO_HELM)]

ROOT = Path(__file__).resolve().parents[2]
TIDEGATE = Path(sys.executable).parent / "tidegate"
NS = "tidegate-system"


@pytest.fixture(scope="module")
def fresh_cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ControlPlane]:
    cp = start_control_plane(
        tmp_path_factory.mktemp("fresh-cluster"), ensure_binaries(pytestconfig)
    )
    try:
        yield cp
    finally:
        cp.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(cp: ControlPlane, *args: str) -> dict[str, Any] | None:
    proc = cp.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _wait(what: str, probe: Any, timeout: float = 45, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def test_helm_install_then_the_operator_reconciles(
    fresh_cluster: ControlPlane, tmp_path: Path
) -> None:
    cp = fresh_cluster
    out = cp.helm(
        "install", "tidegate", str(ROOT / "charts" / "tidegate"), "-n", NS, "--create-namespace"
    )
    assert "STATUS: deployed" in out.stdout

    for crd in (
        "egresspolicies.tidegate.io",
        "egressgateways.tidegate.io",
        "clusterkopfpeerings.kopf.dev",
    ):
        assert _get(cp, "crd", crd) is not None, crd
    deployment = _get(cp, "deployment", "tidegate-operator", "-n", NS)
    assert deployment is not None
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["tidegate", "operator"] or "operator" in json.dumps(
        container
    )
    assert _get(cp, "clusterrole", "tidegate-operator") is not None
    assert _get(cp, "clusterkopfpeering", "tidegate") is not None
    gateway = _get(cp, "egressgateway", "default", "-n", NS)
    assert gateway is not None and gateway["spec"]["mode"] == "Enforce"

    # The operator as its pod runs it: the chart's arguments, the chart's identity.
    args = [a for a in container.get("args", []) if not a.startswith(("--liveness", "--metrics"))]
    kubeconfig = cp.token_for(deployment["spec"]["template"]["spec"]["serviceAccountName"], NS)
    log = tmp_path / "operator.log"
    with log.open("wb") as sink:
        operator = subprocess.Popen(
            [
                str(TIDEGATE),
                "operator",
                *args,
                "--kubeconfig",
                str(kubeconfig),
                f"--liveness=http://127.0.0.1:{_free_port()}/healthz",
                f"--metrics-listen=127.0.0.1:{_free_port()}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        bundle = _wait(
            "the default gateway's bundle",
            lambda: _get(cp, "configmap", "default-bundle", "-n", NS),
            log=log,
        )
        assert json.loads(bundle["data"]["bundle.json"])["kind"] == "PolicyBundle"
        _wait(
            "the gateway Deployment",
            lambda: _get(cp, "deployment", "default-gateway", "-n", NS),
            log=log,
        )
        service = _wait(
            "the gateway Service", lambda: _get(cp, "service", "default-gateway", "-n", NS)
        )
        assert service["spec"]["type"] == "LoadBalancer"

        cp.ensure_namespace("ci")
        cp.kubectl("apply", "-f", str(ROOT / "examples" / "ci-runners.yaml"))

        def accepted() -> bool:
            policy = _get(cp, "egresspolicy", "ci-runners", "-n", "ci") or {}
            conditions = (policy.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        _wait("ci/ci-runners Accepted", accepted, log=log)
        listing = cp.kubectl("get", "egp", "-A").stdout
        assert "ci-runners" in listing and "Enforce" in listing
    finally:
        operator.terminate()
        try:
            operator.wait(20)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait(5)

    cp.helm("uninstall", "tidegate", "-n", NS)
    assert _get(cp, "deployment", "tidegate-operator", "-n", NS) is None
    assert _get(cp, "crd", "egresspolicies.tidegate.io") is not None, (
        "helm uninstall must keep the CRDs"
    )
    assert _get(cp, "egresspolicy", "ci-runners", "-n", "ci") is not None
