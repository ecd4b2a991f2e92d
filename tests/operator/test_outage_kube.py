"""After an API server outage, the next policy change is enforced within seconds.

A control plane of its own (the test stops its kube-apiserver). The operator (chart RBAC)
and a real gateway process watching the bundle ConfigMap run through a 20 s outage; once the
API server is back, a new policy is created and the time until the *gateway* serves a bundle
with it is measured. Before the fix, kopf's watch back-off (1, 1, 2, 3, 5, 8, 13, 21 s), the
reconciler's retry back-off (doubling to 60 s) and the gateway's watch back-off (doubling to
30 s) each could add tens of seconds.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_kube import ControlPlane, ensure_binaries, start_control_plane
from kubehelpers import (
    OperatorProcess,
    free_port,
    gateway_namespace_args,
    get,
    install_crds,
    operator_kubeconfig,
    ready,
    wait_for,
)

pytestmark = pytest.mark.kube

TIDEGATE = Path(sys.executable).parent / "tidegate"
NS = "outage"
OUTAGE_SECONDS = 20.0
ENFORCED_WITHIN = 5.0


@pytest.fixture(scope="module")
def own_cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("outage-cluster")
    cp = start_control_plane(workdir, ensure_binaries(pytestconfig))
    try:
        yield cp
    finally:
        cp.stop()


def _policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"allow": [{"host": f"{name}.example.com"}]},
    }


def _gateway_generation(port: int) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
    except OSError:
        return 0.0
    for line in text.decode().splitlines():
        if line.startswith("tidegate_bundle_generation "):
            return float(line.split()[1])
    return 0.0


def test_policy_enforced_within_seconds_after_an_api_outage(
    own_cluster: ControlPlane, tmp_path: Path
) -> None:
    cp = own_cluster
    install_crds(cp)
    cp.ensure_namespace(NS)
    cp.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "gw", "namespace": NS},
                "spec": {"replicas": 1, "service": {"type": "ClusterIP"}},
            },
            _policy("before"),
        ]
    )
    op = OperatorProcess(
        cp,
        operator_kubeconfig(cp, NS),
        tmp_path / "operator.log",
        *gateway_namespace_args(NS),
        "--namespace",
        NS,
        "--default-gateway",
        f"{NS}/gw",
        "--resync-seconds",
        "600",  # the periodic resync must not be what saves the day
    )
    metrics = free_port()
    gateway_log = tmp_path / "gateway.log"
    op.start()
    with gateway_log.open("wb") as out:
        gateway = subprocess.Popen(
            [
                str(TIDEGATE),
                "gateway",
                "--configmap",
                f"{NS}/gw-bundle",
                "--kubeconfig",
                str(cp.kubeconfig),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--metrics-listen",
                f"127.0.0.1:{metrics}",
                "--access-log",
                "off",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            "before Ready",
            lambda: ready(get(cp, "egp", "before", NS)).get("reason") == "Accepted" or None,
            op=op,
        )
        first = wait_for("the gateway's first bundle", lambda: _gateway_generation(metrics))

        cp.stop_apiserver()
        time.sleep(OUTAGE_SECONDS)
        cp.start_apiserver()
        back = time.monotonic()
        cp.apply([_policy("after")])
        wait_for(
            "the gateway serving the new policy",
            lambda: _gateway_generation(metrics) > first or None,
            timeout=60,
            op=op,
        )
        took = time.monotonic() - back
        print(f"enforced {took:.2f} s after the API came back ({OUTAGE_SECONDS:.0f} s outage)")
        assert took < ENFORCED_WITHIN, (took, op.tail(), gateway_log.read_text()[-2000:])
        assert gateway.poll() is None and op.alive()
    finally:
        gateway.terminate()
        gateway.wait(20)
        op.stop()
