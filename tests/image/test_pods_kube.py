"""The chart's and the operator's Deployments run as real containers of the real image.

On a fresh real kube-apiserver: ``helm install`` as the README says (pointed at the image
hack/image.sh built), then the pod runner (tests/podrunner.py, a stand-in for the kubelet)
runs the chart's operator Deployment with its own ServiceAccount token; the operator
reconciles the default gateway and an applied EgressPolicy; the gateway Deployment it
renders runs as a container, becomes ready through its readiness probe and enforces the
policy for a real client (curl) on loopback. A policy change reaches it through its
ConfigMap watch (the kubelet's volume sync paused) and, separately, through the projected
file swap alone (the pod cut off from the API), and a pod that cannot reach the API keeps
serving the mounted bundle.

Host networking: the gateway's ports (3128, 9090) are host ports while it runs, so the
gateway pods run one at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fixtures_kube import ControlPlane, ensure_binaries, start_control_plane
from fixtures_net import Net, gateway_doc
from podrunner import POD_IP, Podman, PodRunner, RunningPod

pytestmark = [pytest.mark.kube, pytest.mark.image, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
NS = "tidegate-system"
APP_NS = "team-a"
# The client: a pod of team-a (an object whose status the test writes), at its own loopback
# address so the gateway identifies it - EgressPolicies govern their namespace's pods.
CLIENT_IP = "127.0.0.5"
PROXY_PORT = 3128
METRICS_PORT = 9090
HOST_PORTS_LOCK = Path("/tmp/tidegate-gateway-host-ports.lock")
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, why: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{why()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the gateway binds: TIME_WAIT leftovers of earlier connections do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def get(cp: ControlPlane, *args: str) -> dict[str, Any] | None:
    proc = cp.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


def curl(net: Net, url: str) -> tuple[int, int]:
    """(CONNECT status, response status) of curl through the gateway pod's proxy port."""
    proc = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect} %{http_code}",
            "--max-time",
            "10",
            "--noproxy",
            "",
            "--interface",
            CLIENT_IP,
            "--proxy",
            f"http://{POD_IP}:{PROXY_PORT}",
            "--cacert",
            str(net.ca_file),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    connect, _, code = proc.stdout.strip().partition(" ")
    return (int(connect or 0), int(code or 0))


def client_pod(cp: ControlPlane) -> None:
    """The curl client as team-a's pod ``client`` at CLIENT_IP (idempotent)."""
    cp.ensure_namespace(APP_NS)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client", "namespace": APP_NS, "labels": {"app": "client"}},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "curl", "image": "curl:test"}],
        },
    }
    deadline = time.monotonic() + 30
    while cp.kubectl("apply", "-f", "-", input=json.dumps(pod), check=False).returncode != 0:
        assert time.monotonic() < deadline, "the client pod could not be created"
        time.sleep(0.2)
    status = {"status": {"phase": "Running", "podIP": CLIENT_IP, "podIPs": [{"ip": CLIENT_IP}]}}
    cp.kubectl(
        "patch",
        "pod",
        "client",
        "-n",
        APP_NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def policy(hosts: list[str], net: Net) -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "web", "namespace": APP_NS},
        "spec": {"allow": [{"host": h, "ports": [net.tls_port]} for h in hosts]},
    }


@dataclass
class Installed:
    cp: ControlPlane
    runner: PodRunner
    operator: RunningPod
    net: Net

    def why(self) -> str:
        return self.operator.report()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ControlPlane]:
    """A control plane of its own: helm install meets an empty cluster, as a user's does."""
    cp = start_control_plane(tmp_path_factory.mktemp("pods-cluster"), ensure_binaries(pytestconfig))
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def installed(
    cluster: ControlPlane,
    podman_image: Podman,
    net: Net,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    cp = cluster
    assert cp.has_controller_manager, "the pod runner needs the ReplicaSet's Pod objects"
    repository, _, tag = podman_image.image.removeprefix("localhost/").rpartition(":")
    spec = gateway_doc(net, replicas=1)["spec"]
    # The README's command, pointed at the image built here; one operator replica and free
    # ports for its probes/metrics, since every pod port is a host port on this "node".
    cp.helm(
        "install",
        "tidegate",
        str(ROOT / "charts" / "tidegate"),
        "-n",
        NS,
        "--create-namespace",
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "operator.replicas=1",
        "--set",
        f"operator.healthPort={free_port()}",
        "--set",
        f"operator.metricsPort={free_port()}",
        "--set-json",
        f"defaultGateway.spec={json.dumps(spec)}",
    )
    runner = PodRunner(cp, podman_image, tmp_path_factory.mktemp("pods"))
    try:
        operator = runner.run_deployment(NS, "tidegate-operator")
        yield Installed(cp=cp, runner=runner, operator=operator, net=net)
    finally:
        runner.stop_all()


def test_operator_pod_runs_as_the_chart_says_and_reconciles_a_policy(
    installed: Installed,
) -> None:
    cp, op = installed.cp, installed.operator
    # The container is what the chart asked for: uid 65532, read-only root, no caps.
    info = op.inspect()
    assert info["Config"]["User"].split(":")[0] == "65532", info["Config"]["User"]
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    caps = op.exec("python3", "-c", "print(open('/proc/self/status').read())").stdout
    assert "CapEff:\t0000000000000000" in caps, caps
    assert op.exec("touch", "/opt/x").returncode != 0, "the root filesystem is writable"
    whoami = op.exec("python3", "-c", "import getpass; print(getpass.getuser())").stdout
    assert whoami.strip() == "tidegate"

    # Its own ServiceAccount: the projected token says who it is.
    token = op.exec("cat", "/var/run/secrets/kubernetes.io/serviceaccount/token").stdout
    review = cp.kubectl(
        "create",
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token},
            }
        ),
    )
    user = json.loads(review.stdout)["status"]["user"]
    sa = get(cp, "deployment", "tidegate-operator", "-n", NS)
    assert sa is not None
    sa_name = sa["spec"]["template"]["spec"]["serviceAccountName"]
    assert user["username"] == f"system:serviceaccount:{NS}:{sa_name}"
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == [op.name]

    # The operator reconciles: the default gateway's objects, then an applied policy.
    wait_for(
        "the gateway Deployment",
        lambda: get(cp, "deployment", "default-gateway", "-n", NS),
        90,
        installed.why,
    )
    cp.ensure_namespace(APP_NS)
    cp.apply([policy(["allowed.test"], installed.net)])
    ready = wait_for(
        "EgressPolicy Ready=True",
        lambda: (
            (c := condition(get(cp, "egresspolicy", "web", "-n", APP_NS), "Ready"))
            and c["status"] == "True"
            and c
        ),
        60,
        installed.why,
    )
    assert ready["status"] == "True"

    # The liveness probe is polled and passes; the Pod object reports what the runner saw.
    wait_for(
        "a passing liveness probe",
        lambda: any(r.kind == "liveness" and r.ok for r in op.probe_log),
        60,
        installed.why,
    )
    assert not any(r.kind == "liveness" and not r.ok for r in op.probe_log), op.report()
    assert op.restarts == 0, op.report()
    pod = get(cp, "pod", op.name, "-n", NS)
    assert pod is not None and pod["spec"]["nodeName"] == "podrunner"
    assert pod["status"]["podIP"] == POD_IP
    assert (condition(pod, "Ready") or {}).get("status") == "True"
    assert op.state()[0] == "running", op.report()


@contextlib.contextmanager
def host_ports() -> Iterator[None]:
    """Hold the gateway's host ports for this machine: another test session running a
    gateway pod at the same time waits here instead of failing on a taken port."""
    with HOST_PORTS_LOCK.open("w") as lock:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{HOST_PORTS_LOCK} held for 600 s"
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def wait_ports_free(timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (port_free(PROXY_PORT) and port_free(METRICS_PORT)):
        assert time.monotonic() < deadline, (
            f"port {PROXY_PORT} or {METRICS_PORT} is taken on this machine: the gateway pod "
            "listens on them (host network)"
        )
        time.sleep(0.2)


@contextlib.contextmanager
def gateway_pod(installed: Installed, **kwargs: Any) -> Iterator[RunningPod]:
    """Run one pod of the rendered gateway Deployment; stop it (and free its ports) after."""
    wait_for(
        "the gateway Deployment",
        lambda: get(installed.cp, "deployment", "default-gateway", "-n", NS),
        90,
        installed.why,
    )
    with host_ports():
        wait_ports_free()
        pod = installed.runner.run_deployment(NS, "default-gateway", **kwargs)
        try:
            yield pod
        finally:
            pod.stop()
            wait_ports_free()


def client_policy(cp: ControlPlane, hosts: list[str], net: Net) -> dict[str, Any]:
    """The policy that governs the test's loopback client (curl on this machine).

    The client is no pod: where ClusterEgressPolicy exists (an EgressPolicy then governs
    only the pods of its own namespace), a cluster policy selects it by address
    (sources.cidrs); before that, a namespaced EgressPolicy governs every client.
    """
    if get(cp, "crd", "clusteregresspolicies.tidegate.io") is None:
        return policy(hosts, net)
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": "loopback-web"},
        "spec": {
            "sources": {"cidrs": ["127.0.0.0/8"]},
            "allow": [{"host": h, "ports": [net.tls_port]} for h in hosts],
        },
    }


def _policy_ready(installed: Installed, hosts: list[str]) -> None:
    client_pod(installed.cp)
    installed.cp.ensure_namespace(APP_NS)
    installed.cp.apply([client_policy(installed.cp, hosts, installed.net)])

    def current() -> bool:
        bundle = get(installed.cp, "configmap", "default-bundle", "-n", NS) or {}
        return all(h in json.dumps(bundle.get("data") or {}) for h in hosts)

    wait_for("the bundle to carry the policy", current, 60, installed.why)


def test_gateway_pod_enforces_and_follows_its_configmap_watch(installed: Installed) -> None:
    net = installed.net
    _policy_ready(installed, ["allowed.test"])
    # The kubelet's volume sync is paused: a change can only come through the API watch.
    with gateway_pod(installed, volume_sync=None) as gw:
        gw.wait_ready(60)
        info = gw.inspect()
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["Config"]["User"].split(":")[0] == "65532"
        # The readiness probe's verdict reaches the Pod object, as a kubelet reports it.
        reported = wait_for(
            "the gateway Pod reported Ready",
            lambda: (
                (condition(get(installed.cp, "pod", gw.name, "-n", NS), "Ready") or {}).get(
                    "status"
                )
                == "True"
            ),
            30,
            gw.report,
        )
        assert reported
        assert curl(net, net.https_url("allowed.test")) == (200, 200), gw.report()
        assert curl(net, net.https_url("other.test"))[0] == 403, gw.report()

        _policy_ready(installed, ["allowed.test", "other.test"])
        wait_for(
            "other.test allowed through the ConfigMap watch",
            lambda: curl(net, net.https_url("other.test")) == (200, 200),
            30,
            gw.report,
        )
        bundle_dir = gw.volumes["bundle"][0]
        assert bundle_dir.swaps == 1, "the projected file changed: not the watch alone"
        assert "other.test" not in (bundle_dir.path / "bundle.json").read_text()
        assert gw.restarts == 0 and gw.ready, gw.report()
    _policy_ready(installed, ["allowed.test"])


def test_gateway_cut_off_from_the_api_serves_the_mounted_bundle_and_follows_the_file(
    installed: Installed,
) -> None:
    net = installed.net
    _policy_ready(installed, ["allowed.test"])
    with gateway_pod(installed, api_reachable=False) as gw:
        # Ready on the mounted bundle alone, and enforcing it.
        gw.wait_ready(60)
        assert curl(net, net.https_url("allowed.test")) == (200, 200), gw.report()
        assert curl(net, net.https_url("other.test"))[0] == 403, gw.report()
        # The pod really cannot reach the API: its in-cluster address is refused.
        reach = gw.exec(
            "python3",
            "-c",
            "import os, socket\n"
            "try:\n"
            "    socket.create_connection((os.environ['KUBERNETES_SERVICE_HOST'],"
            " int(os.environ['KUBERNETES_SERVICE_PORT'])), timeout=3)\n"
            "    print('reached')\n"
            "except ConnectionRefusedError:\n"
            "    print('refused')\n",
        )
        assert reach.stdout.strip() == "refused", reach

        # The kubelet swaps the projected file; that alone must reach the gateway.
        swaps = gw.volumes["bundle"][0].swaps
        _policy_ready(installed, ["allowed.test", "other.test"])
        wait_for(
            "other.test allowed through the projected-file swap",
            lambda: curl(net, net.https_url("other.test")) == (200, 200),
            30,
            gw.report,
        )
        assert gw.volumes["bundle"][0].swaps > swaps
        assert curl(net, net.https_url("allowed.test")) == (200, 200)
        assert gw.restarts == 0 and gw.ready, gw.report()
    _policy_ready(installed, ["allowed.test"])
