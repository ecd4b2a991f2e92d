"""Per-workload policies on the real API server: pods, namespaces, identities, gateway.

There is no kubelet: pods are created as objects and get their address through the
status subresource (``status.podIP`` / ``podIPs``), exactly the field a kubelet writes.
Each pod's address is a distinct loopback address (127.0.0.x), and the test client binds
to that address before connecting, so the gateway sees the connection come from the pod.
The gateway runs as its pod would: ``--configmap`` and ``--identities-configmap`` watches
with a token of the ServiceAccount the operator rendered for it (its Role only).

What a stand-in leaves untested: a real CNI's address assignment and reuse timing (the
ordering is driven here by status patches and deletions, in both orders).
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_kube import ControlPlane
from fixtures_net import Net, gateway_doc
from kubehelpers import (
    OperatorProcess,
    delete_pod,
    free_port,
    gateway_namespace_args,
    get,
    install_crds,
    make_pod,
    operator_kubeconfig,
    ready,
    set_pod_ip,
    wait_for,
)

pytestmark = pytest.mark.kube

TIDEGATE = Path(sys.executable).parent / "tidegate"
NS = "tn-system"
GW = "tn"
API = "tidegate.io/v1alpha1"


# --- helpers ----------------------------------------------------------------------------


def connect(port: int, target: str, source: str, timeout: float = 3.0) -> tuple[int, str]:
    """CONNECT from ``source`` (a loopback address); (status, X-Tidegate-Reason)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0]:
        return 0, ""
    reason = ""
    for line in lines[1:]:
        if line.lower().startswith("x-tidegate-reason:"):
            reason = line.split(":", 1)[1].strip()
    return int(lines[0].split(" ", 2)[1]), reason


def apply(cp: ControlPlane, doc: dict[str, Any], kubeconfig: Path | None = None) -> Any:
    args = ["--kubeconfig", str(kubeconfig)] if kubeconfig else []
    return cp.kubectl(
        *args, "apply", "-f", "-", input=yaml.safe_dump(doc), check=kubeconfig is None
    )


def policy(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"gatewayRef": {"name": GW, "namespace": NS}, **spec},
    }


def cluster_policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": name},
        "spec": {"gatewayRef": {"name": GW, "namespace": NS}, **spec},
    }


class Gateway:
    def __init__(self, kubeconfig: Path, workdir: Path, index: int) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log = workdir / f"gateway{index}.log"
        self.access = workdir / f"access{index}.log"
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
            f"127.0.0.1:{self.port}",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--access-log",
            str(self.access),
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())

    def metric(self, prefix: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.metrics().splitlines()
            if line.startswith(prefix)
        )

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def access_lines(self) -> list[dict[str, Any]]:
        if not self.access.exists():
            return []
        return [json.loads(line) for line in self.access.read_text().splitlines() if line]


@dataclass
class World:
    cp: ControlPlane
    net: Net
    operator: OperatorProcess
    gateways: list[Gateway]
    workdir: Path

    @property
    def gw(self) -> Gateway:
        return self.gateways[0]

    def host(self, name: str) -> str:
        """A name the test DNS answers with the upstream; CONNECT target with its port."""
        self.net.dns.set(name, [(self.net.up, 30)])
        return f"{name}:{self.net.echo.port}"

    def until(
        self,
        what: str,
        check: Callable[[], bool],
        timeout: float = 15.0,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, (
                f"{what} not within {timeout}s\n{self.gw.tail()}\n{self.operator.tail()}"
            )
            time.sleep(0.05)

    def status(self, target: str, source: str, gateway: Gateway | None = None) -> int:
        return connect((gateway or self.gw).port, target, source)[0]


@pytest.fixture(scope="module")
def world(
    control_plane: ControlPlane, net: Net, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    cp = control_plane
    workdir = tmp_path_factory.mktemp("tenancy")
    install_crds(cp)
    cp.ensure_namespace(NS)
    operator = OperatorProcess(
        cp,
        operator_kubeconfig(cp, NS),
        workdir / "operator.log",
        *gateway_namespace_args(NS),
    )
    operator.start()
    gateways: list[Gateway] = []
    try:
        gateway = gateway_doc(net)
        gateway["metadata"] = {"name": GW, "namespace": NS}
        apply(cp, gateway)
        wait_for(
            "the bundle ConfigMap", lambda: get(cp, "configmap", f"{GW}-bundle", NS), op=operator
        )
        wait_for(
            "the identities ConfigMap",
            lambda: get(cp, "configmap", f"{GW}-identities", NS),
            op=operator,
        )
        kubeconfig = cp.token_for(f"{GW}-gateway", NS)
        denied = cp.kubectl("--kubeconfig", str(kubeconfig), "get", "pods", "-A", check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
        gateways = [Gateway(kubeconfig, workdir, i) for i in range(2)]
        for g in gateways:
            wait_for("a gateway to be ready", g.ready, timeout=30)
        yield World(cp, net, operator, gateways, workdir)
    finally:
        for g in gateways:
            assert g.stop() == 0, g.tail()
        operator.stop()


# --- tests ------------------------------------------------------------------------------


def test_team_b_can_neither_allow_nor_deny_for_team_a(world: World) -> None:
    """Two tenants with namespace-scoped RBAC only; the gateway admits every namespace."""
    cp = world.cp
    team_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "egress-editor"},
        "rules": [
            {
                "apiGroups": ["tidegate.io"],
                "resources": ["egresspolicies"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
        ],
    }
    team_a = cp.serviceaccount_kubeconfig("team-a", "alice", [team_role])
    team_b = cp.serviceaccount_kubeconfig("team-b", "bob", [team_role])
    make_pod(cp, "team-a", "web", {"app": "web"}, "127.0.1.1")
    make_pod(cp, "team-b", "web", {"app": "web"}, "127.0.1.2")
    payments, exfil = world.host("api.payments.test"), world.host("exfil.test")

    done = apply(
        cp,
        policy(
            "web", "team-a", allow=[{"host": "api.payments.test", "ports": [world.net.echo.port]}]
        ),
        team_a,
    )
    assert done.returncode == 0, done.stderr
    world.until("team-a's pod allowed", lambda: world.status(payments, "127.0.1.1") == 200)
    # team-b's pod is not governed by team-a's policy
    assert world.status(payments, "127.0.1.2") == 403

    # team-b tries everything its RBAC allows, and what it does not
    grab = policy(
        "grab",
        "team-b",
        allow=[{"host": "exfil.test", "ports": [world.net.echo.port]}],
        deny=[{"host": "api.payments.test"}],
    )
    done = apply(cp, grab, team_b)
    assert done.returncode == 0, done.stderr
    world.until("team-b's own pod allowed", lambda: world.status(exfil, "127.0.1.2") == 200)
    assert connect(world.gw.port, payments, "127.0.1.2") == (403, "deny_rule")
    # ... and nothing changed for team-a: its allow stands, team-b's allow opens nothing
    assert world.status(payments, "127.0.1.1") == 200
    assert connect(world.gw.port, exfil, "127.0.1.1") == (403, "no_rule_matched")
    # team-b cannot write into team-a, nor write a cluster policy, nor select by address
    into_a = apply(cp, {**grab, "metadata": {"name": "grab", "namespace": "team-a"}}, team_b)
    assert into_a.returncode != 0 and "forbidden" in into_a.stderr.lower()
    cluster = apply(
        cp,
        cluster_policy("grab", namespaceSelector={}, deny=[{"host": "api.payments.test"}]),
        team_b,
    )
    assert cluster.returncode != 0 and "forbidden" in cluster.stderr.lower()
    sourced = apply(
        cp,
        policy(
            "src", "team-b", sources={"cidrs": ["0.0.0.0/0"]}, deny=[{"host": "api.payments.test"}]
        ),
        team_b,
    )
    assert sourced.returncode != 0 and "ClusterEgressPolicy" in sourced.stderr
    # the access log names the client pod; the metric its namespace
    world.until(
        "access lines with the pod",
        lambda: any(
            r.get("client_pod") == "web" and r.get("client_namespace") == "team-a"
            for r in world.gw.access_lines()
        ),
    )
    assert 'client_namespace="team-a"' in world.gw.metrics()


def test_label_change_moves_a_pod_between_policies(world: World) -> None:
    cp = world.cp
    target = world.host("labels.test")
    make_pod(cp, "team-l", "worker", {"app": "batch"}, "127.0.2.1")
    apply(
        cp,
        policy(
            "web-only",
            "team-l",
            podSelector={"matchLabels": {"app": "web"}},
            allow=[{"host": "labels.test", "ports": [world.net.echo.port]}],
        ),
    )
    world.until(
        "the policy accepted",
        lambda: ready(get(cp, "egresspolicy", "web-only", "team-l")).get("status") == "True",
    )
    time.sleep(1)
    assert world.status(target, "127.0.2.1") == 403
    cp.kubectl("label", "pod", "worker", "-n", "team-l", "app=web", "--overwrite")
    world.until("relabelled pod allowed", lambda: world.status(target, "127.0.2.1") == 200)
    cp.kubectl("label", "pod", "worker", "-n", "team-l", "app=batch", "--overwrite")
    world.until("pod denied again", lambda: world.status(target, "127.0.2.1") == 403)


def test_cluster_policy_by_namespace_selector(world: World) -> None:
    cp = world.cp
    target = world.host("mirror.test")
    make_pod(cp, "prod-1", "app", {"app": "x"}, "127.0.3.1")
    make_pod(cp, "dev-1", "app", {"app": "x"}, "127.0.3.2")
    cp.kubectl("label", "namespace", "prod-1", "env=prod", "--overwrite")
    apply(
        cp,
        cluster_policy(
            "prod-mirror",
            namespaceSelector={"matchLabels": {"env": "prod"}},
            allow=[{"host": "mirror.test", "ports": [world.net.echo.port]}],
        ),
    )
    world.until("prod namespace allowed", lambda: world.status(target, "127.0.3.1") == 200)
    assert world.status(target, "127.0.3.2") == 403
    policy_obj = wait_for(
        "the cluster policy Ready",
        lambda: get(cp, "clusteregresspolicy", "prod-mirror", None),
        op=world.operator,
    )
    assert policy_obj
    cp.kubectl("label", "namespace", "dev-1", "env=prod", "--overwrite")
    world.until("namespace label admits dev-1", lambda: world.status(target, "127.0.3.2") == 200)


def test_peered_vpc_cidr_clients_and_unknown_addresses(world: World) -> None:
    cp = world.cp
    target = world.host("reports.test")
    apply(
        cp,
        cluster_policy(
            "peered",
            sources={"cidrs": ["127.0.64.0/24"]},
            allow=[{"host": "reports.test", "ports": [world.net.echo.port]}],
        ),
    )
    world.until("the peered client allowed", lambda: world.status(target, "127.0.64.9") == 200)
    # an address nobody knows: no namespaced policy, no selector governs it (fail closed)
    apply(
        cp,
        cluster_policy(
            "everyone",
            namespaceSelector={},
            allow=[{"host": "reports.test", "ports": [world.net.echo.port]}],
        ),
    )
    make_pod(cp, "team-u", "known", {"app": "x"}, "127.0.4.1")
    world.until(
        "a known pod allowed by the cluster policy",
        lambda: world.status(target, "127.0.4.1") == 200,
    )
    before = world.gw.metric('tidegate_clients_total{identity="unknown_client"}')
    assert connect(world.gw.port, target, "127.0.4.99") == (403, "no_rule_matched")
    assert world.gw.metric('tidegate_clients_total{identity="unknown_client"}') == before + 1
    assert world.gw.metric('tidegate_clients_total{identity="cidr"}') >= 1
    world.until(
        "the unknown client logged",
        lambda: any(
            r.get("identity") == "unknown_client" and r["client"].startswith("127.0.4.99:")
            for r in world.gw.access_lines()
        ),
    )


def test_host_network_pods_only_match_cidr_sources(world: World) -> None:
    cp = world.cp
    target = world.host("node.test")
    apply(
        cp,
        cluster_policy(
            "all-pods-node",
            namespaceSelector={},
            allow=[{"host": "node.test", "ports": [world.net.echo.port]}],
        ),
    )
    make_pod(cp, "team-h", "agent", {"app": "agent"}, "127.0.5.1", host_network=True)
    make_pod(cp, "team-h", "normal", {"app": "x"}, "127.0.5.2")
    world.until("the normal pod allowed", lambda: world.status(target, "127.0.5.2") == 200)
    assert world.status(target, "127.0.5.1") == 403
    kinds = [
        r.get("identity") for r in world.gw.access_lines() if r["client"].startswith("127.0.5.1:")
    ]
    world.until(
        "host_network logged",
        lambda: any(
            r.get("identity") == "host_network"
            for r in world.gw.access_lines()
            if r["client"].startswith("127.0.5.1:")
        ),
    )
    del kinds


def test_address_reuse_is_withdrawn_before_reattribution(world: World) -> None:
    cp = world.cp
    a_host, b_host = world.host("reuse-a.test"), world.host("reuse-b.test")
    port = world.net.echo.port
    cp.ensure_namespace("reuse-a")
    cp.ensure_namespace("reuse-b")
    apply(cp, policy("ra", "reuse-a", allow=[{"host": "reuse-a.test", "ports": [port]}]))
    apply(cp, policy("rb", "reuse-b", allow=[{"host": "reuse-b.test", "ports": [port]}]))
    address = "127.0.6.1"
    make_pod(cp, "reuse-a", "old", {"app": "x"}, address)
    world.until("old pod allowed", lambda: world.status(a_host, address) == 200)

    # The next pod reports the same address while the old one is still listed: the
    # address is withdrawn - neither pod's policies apply - until the old pod is gone.
    make_pod(cp, "reuse-b", "new", {"app": "x"}, address)
    world.until("address withdrawn", lambda: world.status(a_host, address) == 403)
    assert world.status(b_host, address) == 403
    identities = json.dumps([c.get("data") for c in _identity_maps(cp)])
    assert address not in identities
    delete_pod(cp, "reuse-a", "old")
    world.until("new pod allowed", lambda: world.status(b_host, address) == 200)
    assert world.status(a_host, address) == 403

    # The other order: the old pod goes first (deleted), then the address comes back.
    delete_pod(cp, "reuse-b", "new")
    world.until("address released", lambda: world.status(b_host, address) == 403)
    make_pod(cp, "reuse-a", "third", {"app": "x"}, address)
    world.until("third pod allowed", lambda: world.status(a_host, address) == 200)
    # A finished pod (phase Succeeded) releases its address as deletion does.
    cp.kubectl(
        "patch",
        "pod",
        "third",
        "-n",
        "reuse-a",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Succeeded"}}),
    )
    world.until("finished pod released", lambda: world.status(a_host, address) == 403)


def _identity_maps(cp: ControlPlane) -> list[dict[str, Any]]:
    out = cp.kubectl(
        "get", "configmaps", "-n", NS, "-l", "app.kubernetes.io/component=identities", "-o", "json"
    ).stdout
    return list(json.loads(out)["items"])


def test_pod_address_reaches_every_gateway_replica_fast(world: World) -> None:
    """Time from the status patch giving a pod its address until both gateway replicas
    attribute a connection from it to the pod (seen through the decision)."""
    cp = world.cp
    target = world.host("latency.test")
    cp.ensure_namespace("team-lat")
    apply(cp, policy("lat", "team-lat", deny=[{"host": "latency.test"}]))
    world.until(
        "the policy accepted",
        lambda: ready(get(cp, "egresspolicy", "lat", "team-lat")).get("status") == "True",
    )
    time.sleep(0.5)  # the gateways load the bundle a moment after the status is written
    samples: list[float] = []
    for i in range(20):
        address = f"127.0.7.{i + 1}"
        make_pod(cp, "team-lat", f"p{i}", {"app": "x"})
        assert connect(world.gw.port, target, address)[1] == "no_rule_matched"
        started = time.monotonic()
        set_pod_ip(cp, "team-lat", f"p{i}", address)
        pending = list(world.gateways)
        while pending:
            pending = [g for g in pending if connect(g.port, target, address)[1] != "deny_rule"]
            assert time.monotonic() - started < 10, "address not attributed within 10 s"
            if pending:
                time.sleep(0.005)
        samples.append(time.monotonic() - started)
    samples.sort()
    report = {
        "samples": len(samples),
        "p50_s": round(statistics.median(samples), 3),
        "p99_s": round(samples[-1], 3),  # 20 samples: p99 = max
        "replicas": len(world.gateways),
    }
    print("pod-address-to-every-replica:", json.dumps(report))
    (world.workdir / "identity_latency.json").write_text(json.dumps(report))
