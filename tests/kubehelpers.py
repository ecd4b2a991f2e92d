"""Helpers for the operator's tests against the real kube-apiserver: run the operator as
a subprocess with the Helm chart's ClusterRole, read objects, wait for conditions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from fixtures_kube import ControlPlane

REPO = Path(__file__).resolve().parents[1]
TIDEGATE = Path(sys.executable).parent / "tidegate"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


OPERATOR_NAMESPACE = "tidegate-system"
OPERATOR_SA = "tidegate-operator-under-test"

#: Namespaces where the operator under test was granted the chart's gateway Role, across
#: the session: tests/kube/test_rbac_audit.py judges its namespaced requests by them.
GRANTED_GATEWAY_NAMESPACES: set[str] = set()


def chart_rbac(cp: ControlPlane, gateway_namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
    """The operator's RBAC exactly as the Helm chart renders it, bound to OPERATOR_SA."""
    values = [
        "--set",
        f"serviceAccount.name={OPERATOR_SA}",
        "--set",
        "gatewayNamespaces={" + ",".join(gateway_namespaces) + "}",
    ]
    out = cp.helm(
        "template", "tidegate", str(REPO / "charts" / "tidegate"), "-n", OPERATOR_NAMESPACE, *values
    ).stdout
    docs = [
        d
        for d in yaml.safe_load_all(out)
        if d and d.get("kind") in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    assert any(d["kind"] == "ClusterRole" for d in docs), "the chart renders no ClusterRole"
    # Names of their own: a test that helm-installs the chart into the same cluster (and
    # uninstalls it) must not take these away from the operator under test.
    for doc in docs:
        doc["metadata"]["name"] += "-under-test"
        if "roleRef" in doc:
            doc["roleRef"]["name"] += "-under-test"
    return docs


def chart_cluster_role(cp: ControlPlane, *gateway_namespaces: str) -> list[dict[str, Any]]:
    """The chart's operator ClusterRole and gateway-namespace Roles, without bindings and
    renamed, for binding to another identity (``serviceaccount_kubeconfig`` binds them)."""
    namespaces = gateway_namespaces or (OPERATOR_NAMESPACE,)
    for ns in namespaces:
        cp.ensure_namespace(ns)
    return [d for d in chart_rbac(cp, namespaces) if d["kind"] in ("ClusterRole", "Role")]


def operator_kubeconfig(cp: ControlPlane, *gateway_namespaces: str) -> Path:
    """A kubeconfig with exactly the chart's operator RBAC, for gateways in the given
    namespaces (default: the release namespace, as the chart's default)."""
    namespaces = gateway_namespaces or (OPERATOR_NAMESPACE,)
    for ns in namespaces:
        cp.ensure_namespace(ns)
    GRANTED_GATEWAY_NAMESPACES.update(namespaces)
    return cp.serviceaccount_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SA, chart_rbac(cp, namespaces))


def gateway_namespace_args(*namespaces: str) -> list[str]:
    """The operator flags the chart passes for gatewayNamespaces."""
    return [f"--gateway-namespace={ns}" for ns in namespaces or (OPERATOR_NAMESPACE,)]


def install_crds(cp: ControlPlane) -> None:
    """Apply the CRDs exactly as committed in crds/ and wait until they are served."""
    cp.apply(sorted((REPO / "crds").glob("*.yaml")))
    for crd in (
        "egresspolicies.tidegate.io",
        "clusteregresspolicies.tidegate.io",
        "egressgateways.tidegate.io",
    ):
        # Polled, not `kubectl wait`: right after the apply a CRD may have no conditions
        # yet, and kubectl wait then fails at once ("conditions accessor error").
        wait_for(f"CRD {crd} Established", lambda crd=crd: _established(cp, crd), timeout=60)


def _established(cp: ControlPlane, crd: str) -> bool:
    obj = get(cp, "crd", crd) or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


class OperatorProcess:
    def __init__(self, cp: ControlPlane, kubeconfig: Path, log: Path, *extra: str) -> None:
        self.cp = cp
        self.kubeconfig = kubeconfig
        self.log = log
        self.extra = extra
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            str(TIDEGATE),
            "operator",
            "--standalone",
            "--kubeconfig",
            str(self.kubeconfig),
            "--liveness",
            f"http://127.0.0.1:{self.liveness_port}/healthz",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--resync-seconds",
            "5",
            *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def get(
    cp: ControlPlane, kind: str, name: str, namespace: str | None = None
) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json"]
    if namespace:
        args += ["-n", namespace]
    proc = cp.kubectl(*args, check=False)
    if proc.returncode != 0:
        if "NotFound" in proc.stderr or "not found" in proc.stderr:
            return None
        raise AssertionError(proc.stderr)
    return dict(json.loads(proc.stdout))


def items(cp: ControlPlane, kind: str, namespace: str, *selector: str) -> list[dict[str, Any]]:
    args = ["get", kind, "-n", namespace, "-o", "json", *selector]
    return list(json.loads(cp.kubectl(*args).stdout)["items"])


def ready(obj: dict[str, Any] | None) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return dict(cond)
    return {}


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float = 30,
    op: OperatorProcess | None = None,
) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        if op is not None and not op.alive():
            raise AssertionError(f"operator exited while waiting for {what}\n{op.tail()}")
        time.sleep(0.25)
    log = op.tail() if op is not None else ""
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{log}")


def events_for(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    out = cp.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "-o",
        "json",
        f"--field-selector=involvedObject.name={name}",
    ).stdout
    return list(json.loads(out)["items"])


# --- pods without a kubelet: objects whose status the test writes ----------------------


def make_pod(
    cp: ControlPlane,
    namespace: str,
    name: str,
    labels: dict[str, str],
    ip: str | None = None,
    *,
    host_network: bool = False,
) -> None:
    cp.ensure_namespace(namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "hostNetwork": host_network,
            "containers": [{"name": "app", "image": "app:test"}],
        },
    }
    deadline = time.monotonic() + 30
    while True:  # the namespace's default ServiceAccount appears a moment after it
        done = cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod), check=False)
        if done.returncode == 0:
            break
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.2)
    if ip is not None:
        set_pod_ip(cp, namespace, name, ip)


def set_pod_ip(cp: ControlPlane, namespace: str, name: str, ip: str) -> None:
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
    cp.kubectl(
        "patch",
        "pod",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def delete_pod(cp: ControlPlane, namespace: str, name: str) -> None:
    cp.kubectl(
        "delete", "pod", name, "-n", namespace, "--grace-period=0", "--force", "--wait=false"
    )


def connect_status(port: int, target: str, *, source: str, timeout: float = 5.0) -> int:
    """CONNECT through the gateway on loopback ``port`` from the loopback address
    ``source`` (a client pod's address); the status code, 0 when the gateway closed first."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            head += chunk
        return int(head.split(b" ", 2)[1])
