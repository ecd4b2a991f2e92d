"""The pod runner itself on the real API server, with a small Deployment of the real image
(python's http.server): env from fieldRef and ``$(VAR)``, a ConfigMap volume in the
``..data`` layout inside the container, readiness reported, a failing liveness probe
restarting the container, and runAsNonRoot refusing a root user - what the Deployment
tests rely on it to do like a kubelet."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_kube import ControlPlane
from podrunner import Podman, PodRunner, PodStartError

pytestmark = [pytest.mark.kube, pytest.mark.image, pytest.mark.timeout(300)]

NS = "podrunner-check"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deployment(name: str, image: str, port: int, **container: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "web",
        "image": image,
        "command": ["python3", "-m", "http.server"],
        "args": ["--bind", "127.0.0.1", "--directory", "/cfg", "$(PORT)"],
        "env": [
            {"name": "PORT", "value": str(port)},
            {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "GREETING", "value": "hello-$(ME)"},
        ],
        "readinessProbe": {"httpGet": {"path": "/", "port": port}, "periodSeconds": 1},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}],
    }
    base.update(container)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [base],
                    "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
                },
            },
        },
    }


@pytest.fixture
def runner(
    control_plane: ControlPlane, podman_image: Podman, tmp_path: Path
) -> Iterator[PodRunner]:
    cp = control_plane
    cp.ensure_namespace(NS)
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "cfg", "namespace": NS},
                "data": {"index.html": "one"},
            }
        ]
    )
    deadline = time.monotonic() + 60  # the ServiceAccount admission needs "default"
    while cp.kubectl("get", "sa", "default", "-n", NS, check=False).returncode != 0:
        assert time.monotonic() < deadline, "no default ServiceAccount"
        time.sleep(0.3)
    r = PodRunner(cp, podman_image, tmp_path / "pods")
    try:
        yield r
    finally:
        r.stop_all()


def test_env_volumes_readiness_and_liveness_restart(
    runner: PodRunner, podman_image: Podman, control_plane: ControlPlane
) -> None:
    port = free_port()
    liveness = {
        "httpGet": {"path": "/missing", "port": port},
        "periodSeconds": 1,
        "failureThreshold": 2,
        "initialDelaySeconds": 3,
    }
    control_plane.apply([deployment("web", podman_image.image, port, livenessProbe=liveness)])
    pod = runner.run_deployment(NS, "web")
    pod.wait_ready(60)
    env = pod.exec("python3", "-c", "import os; print(os.environ['ME'], os.environ['GREETING'])")
    assert env.stdout.split() == [pod.name, f"hello-{pod.name}"], env
    listing = pod.exec("python3", "-c", "import os; print(sorted(os.listdir('/cfg')))").stdout
    assert "'..data'" in listing and "'index.html'" in listing, listing
    data = pod.exec("python3", "-c", "import os; print(os.readlink('/cfg/..data'))").stdout
    assert data.startswith("..20"), data

    # The ConfigMap changes: the runner swaps the files the server reads.
    control_plane.kubectl(
        "patch", "configmap", "cfg", "-n", NS, "--type=merge", "-p", '{"data":{"index.html":"two"}}'
    )
    deadline = time.monotonic() + 20
    while "two" not in pod.exec("cat", "/cfg/index.html").stdout:
        assert time.monotonic() < deadline, pod.report()
        time.sleep(0.5)

    # /missing answers 404: the liveness probe fails and the container is restarted.
    deadline = time.monotonic() + 60
    while pod.restarts < 1:
        assert time.monotonic() < deadline, pod.report()
        time.sleep(0.5)
    assert any(r.kind == "liveness" and not r.ok and "404" in r.detail for r in pod.probe_log)
    pod.wait_ready(60)  # and it comes back


def test_run_as_non_root_refuses_a_root_user(
    runner: PodRunner, podman_image: Podman, control_plane: ControlPlane
) -> None:
    doc = deployment("root", podman_image.image, free_port())
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0
    control_plane.apply([doc])
    with pytest.raises(PodStartError, match="runAsNonRoot"):
        runner.run_deployment(NS, "root")
