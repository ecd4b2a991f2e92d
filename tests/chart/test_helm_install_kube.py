"""The README's install command on a fresh, real cluster, then the operator as its pod runs.

A control plane of its own (a few seconds to start), so `helm install` meets a cluster with
nothing in it - exactly what a user's first install meets - and no other test's CRDs.

1. `helm install tidegate charts/tidegate -n tidegate-system --create-namespace`;
2. the CRDs (release objects with the keep policy), the operator's workload and RBAC, the
   ClusterKopfPeering and the default gateway's spec ConfigMap exist;
3. the operator, started locally with the chart's arguments and the token of the chart's
   ServiceAccount (so with exactly the chart's RBAC, and with peering on), creates the
   default EgressGateway from that ConfigMap, reconciles it and accepts an example policy;
4. `helm upgrade` with a new default gateway spec reaches the gateway through the operator;
5. `helm uninstall` removes the workload and the default gateway (garbage-collected with
   its ConfigMap) and keeps the CRDs (helm.sh/resource-policy: keep), so no policy is
   deleted by accident.

A second test upgrades a release to a chart whose CRD has a new field, on the real API
server: `helm upgrade` updates the CRD, and the field is kept where it was pruned before.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_kube import ControlPlane, ensure_binaries, start_control_plane
from helmlib import NO_HELM, find_helm
from prometheus_client.parser import text_string_to_metric_families

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


def _operator_metric(port: int, name: str, **labels: str) -> float | None:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


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
    crd = _get(cp, "crd", "egressgateways.tidegate.io") or {}
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "tidegate"
    spec_cm = _get(cp, "configmap", "tidegate-default-gateway", "-n", NS)
    assert spec_cm is not None
    assert _get(cp, "egressgateway", "default", "-n", NS) is None, "the operator creates it"

    # The operator as its pod runs it: the chart's arguments, the chart's identity.
    args = [a for a in container.get("args", []) if not a.startswith(("--liveness", "--metrics"))]
    kubeconfig = cp.token_for(deployment["spec"]["template"]["spec"]["serviceAccountName"], NS)
    log = tmp_path / "operator.log"
    metrics_port = _free_port()
    with log.open("wb") as sink:
        operator = subprocess.Popen(
            [
                str(TIDEGATE),
                "operator",
                *args,
                "--kubeconfig",
                str(kubeconfig),
                f"--liveness=http://127.0.0.1:{_free_port()}/healthz",
                f"--metrics-listen=127.0.0.1:{metrics_port}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        gateway = _wait(
            "the default gateway, applied by the operator",
            lambda: _get(cp, "egressgateway", "default", "-n", NS),
            log=log,
        )
        assert gateway["spec"]["mode"] == "Enforce"  # the CRD's default
        (owner,) = gateway["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "ConfigMap",
            "tidegate-default-gateway",
            spec_cm["metadata"]["uid"],
        )
        bundle = _wait(
            "the default gateway's bundle",
            lambda: _get(cp, "configmap", "default-bundle", "-n", NS),
            log=log,
        )
        published = json.loads(bundle["data"]["bundle.json"])
        assert published["kind"] == "PolicyBundle"
        # The alerts compare this with what the gateway pods load (docs/operations.md).
        _wait(
            "the operator's tidegate_operator_bundle_generation",
            lambda: (
                _operator_metric(
                    metrics_port, "tidegate_operator_bundle_generation", gateway=f"{NS}/default"
                )
                == published["generation"]
            ),
            log=log,
        )
        _wait(
            "the gateway Deployment",
            lambda: _get(cp, "deployment", "default-gateway", "-n", NS),
            log=log,
        )
        service = _wait(
            "the gateway Service", lambda: _get(cp, "service", "default-gateway", "-n", NS)
        )
        assert service["spec"]["type"] == "LoadBalancer"

        # The README's next line, verbatim: the file brings its namespace.
        cp.kubectl("apply", "-f", str(ROOT / "examples" / "ci-runners.yaml"))

        def accepted() -> bool:
            policy = _get(cp, "egresspolicy", "ci-runners", "-n", "ci") or {}
            conditions = (policy.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        _wait("ci/ci-runners Accepted", accepted, log=log)
        # Every example at once, as a user tries next: the chart's gateway stays as it is.
        before = _get(cp, "egressgateway", "default", "-n", NS)
        assert before is not None
        cp.kubectl("apply", "-f", str(ROOT / "examples"))
        after = _get(cp, "egressgateway", "default", "-n", NS)
        assert after is not None
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"] == before["spec"]
        listing = cp.kubectl("get", "egp", "-A").stdout
        assert "ci-runners" in listing and "Enforce" in listing

        # helm upgrade changes the ConfigMap; the operator applies it to the gateway.
        cp.helm(
            "upgrade",
            "tidegate",
            str(ROOT / "charts" / "tidegate"),
            "-n",
            NS,
            "--reuse-values",
            "--set",
            "defaultGateway.spec.mode=Audit",
        )

        def audit_mode() -> bool:
            gw = _get(cp, "egressgateway", "default", "-n", NS) or {}
            return bool((gw.get("spec") or {}).get("mode") == "Audit")

        _wait("the default gateway in Audit mode after helm upgrade", audit_mode, log=log)

        # helm uninstall while the operator still runs (as its pods do while Helm deletes
        # the release): the ConfigMap goes, the garbage collector takes the gateway with it.
        cp.helm("uninstall", "tidegate", "-n", NS)
        assert _get(cp, "deployment", "tidegate-operator", "-n", NS) is None
        assert _get(cp, "configmap", "tidegate-default-gateway", "-n", NS) is None
        if cp.has_controller_manager:
            # Deleted by the garbage collector, and really gone: the operator puts no
            # finalizer on gateways, so nothing waits for an operator whose RBAC Helm has
            # just removed (it used to stay Terminating, and the namespace with it).
            _wait(
                "the default gateway deleted",
                lambda: _get(cp, "egressgateway", "default", "-n", NS) is None,
                timeout=60,
                log=log,
            )
    finally:
        operator.terminate()
        try:
            operator.wait(20)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait(5)

    assert _get(cp, "crd", "egresspolicies.tidegate.io") is not None, (
        "helm uninstall must keep the CRDs"
    )
    assert _get(cp, "egresspolicy", "ci-runners", "-n", "ci") is not None
    if cp.has_controller_manager:  # the namespace controller deletes its content
        cp.kubectl("delete", "namespace", NS, "--timeout=60s")
        assert _get(cp, "namespace", NS) is None


def test_helm_upgrade_updates_a_crd(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config, tmp_path: Path
) -> None:
    """A chart version whose EgressGateway CRD has a new field: before the upgrade the API
    server prunes it, after `helm upgrade` it keeps it."""
    workdir = tmp_path_factory.mktemp("upgrade-cluster")
    cp = start_control_plane(workdir, ensure_binaries(pytestconfig))
    try:
        chart = tmp_path / "tidegate"
        shutil.copytree(ROOT / "charts" / "tidegate", chart)
        values = ("--set", "defaultGateway.create=false")
        cp.helm("install", "tg", str(chart), "-n", NS, "--create-namespace", *values)

        def apply_with_new_field() -> dict[str, Any]:
            gateway = {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "probe", "namespace": NS},
                "spec": {"mode": "Audit", "upgradeProbe": "kept"},
            }
            cp.kubectl("apply", "--validate=false", "-f", "-", input=json.dumps(gateway))
            return _get(cp, "egressgateway", "probe", "-n", NS) or {}

        assert "upgradeProbe" not in apply_with_new_field()["spec"], "pruned before"

        template = chart / "templates" / "crds" / "tidegate.io_egressgateways.yaml"
        text = template.read_text()
        # A new property first among spec's properties.
        at = text.index("              properties:\n", text.index("            spec:\n"))
        at += len("              properties:\n")
        new_field = "                upgradeProbe:\n                  type: string\n"
        template.write_text(text[:at] + new_field + text[at:])
        chart_yaml = chart / "Chart.yaml"
        chart_yaml.write_text(chart_yaml.read_text().replace("version: 0.1.0", "version: 0.2.0"))
        cp.helm("upgrade", "tg", str(chart), "-n", NS, *values)
        crd = _get(cp, "crd", "egressgateways.tidegate.io") or {}
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["properties"]["spec"]["properties"]["upgradeProbe"] == {"type": "string"}
        assert crd["metadata"]["labels"]["helm.sh/chart"] == "tidegate-0.2.0"
        _wait(
            "the new field kept",
            lambda: apply_with_new_field()["spec"].get("upgradeProbe") == "kept",
        )
        cp.helm("uninstall", "tg", "-n", NS)
        assert _get(cp, "crd", "egressgateways.tidegate.io") is not None
    finally:
        cp.stop()
