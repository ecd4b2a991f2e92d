"""The gateway process over time: reloads, draining, the DNS cache, metrics and health,
bundle files swapped the kubelet's way, and the ``check`` / ``suggest`` commands."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_net import (
    TIDEGATE,
    GatewayFactory,
    GatewayProcess,
    Net,
    connect,
    gateway_doc,
    policy_doc,
    proxy_socket,
    recv_exactly,
    recv_until_eof,
    send_raw,
    standard_policies,
    tls_get,
    write_policy_dir,
)

from tidegate.gateway.bundle import compile_bundle
from tidegate.gateway.documents import parse_documents


def _eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        time.sleep(0.05)


def _status(gw: GatewayProcess, target: str) -> int:
    reply = connect(gw, target)
    reply.sock.close()
    return reply.status


# --- reload ---------------------------------------------------------------------------------


def test_reload_keeps_open_tunnels_and_survives_broken_updates(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    gw = gateway_factory()
    policy_dir = gw.workdir / "policies"
    echo = f"echo.test:{net.echo.port}"
    tunnel = connect(gw, echo)
    assert tunnel.status == 200
    tunnel.sock.sendall(b"one")
    assert recv_exactly(tunnel.sock, 3) == b"one"
    assert gw.metrics().get_value("tidegate_bundle_generation") == 1

    # Deny the host: new CONNECTs are refused, the open tunnel keeps working.
    policies = standard_policies(net)
    policies.append(policy_doc("lockdown", deny=[{"host": "echo.test"}]))
    write_policy_dir(policy_dir, net, policies)
    _eventually(lambda: _status(gw, echo) == 403, what="the new bundle refuses echo.test")
    assert gw.metrics().get_value("tidegate_bundle_generation") == 2
    assert gw.metrics().get_value("tidegate_bundle_reloads_total", result="success") >= 2
    tunnel.sock.sendall(b"two")
    assert recv_exactly(tunnel.sock, 3) == b"two"

    # A broken file: rejected, counted, the last good bundle stays in force.
    errors = gw.metrics().get_value("tidegate_bundle_reloads_total", result="error")
    (policy_dir / "policies.yaml").write_text("apiVersion: [unclosed\n  kind: {{\n")
    gw.wait_metric("tidegate_bundle_reloads_total", lambda v: v > errors, result="error")
    assert gw.metrics().get_value("tidegate_bundle_generation") == 2
    assert _status(gw, echo) == 403
    assert _status(gw, f"allowed.test:{net.tls_port}") == 200

    # An invalid policy (valid YAML) is rejected the same way.
    errors = gw.metrics().get_value("tidegate_bundle_reloads_total", result="error")
    write_policy_dir(policy_dir, net, [policy_doc("bad", allow=[{"host": "*"}])])
    gw.wait_metric("tidegate_bundle_reloads_total", lambda v: v > errors, result="error")
    assert _status(gw, f"allowed.test:{net.tls_port}") == 200
    assert "rejected policy update" in gw.stderr()

    tunnel.sock.sendall(b"three")
    assert recv_exactly(tunnel.sock, 5) == b"three"
    tunnel.sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(tunnel.sock) == b"bye 11\n"
    assert gw.admin("/readyz")[0] == 200


def test_not_ready_until_a_valid_bundle_loads(
    gateway_factory: GatewayFactory, net: Net, tmp_path: Path
) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "policies.yaml").write_text("kind: [\n")
    gw = gateway_factory(args=["--policies", str(policy_dir)], wait=False)
    _eventually(lambda: _admin_status(gw, "/healthz") == 200, what="healthz")
    assert gw.admin("/readyz")[0] == 503
    reply = connect(gw, f"allowed.test:{net.tls_port}")
    assert (reply.status, reply.reason) == (503, "not_ready")
    write_policy_dir(policy_dir, net, standard_policies(net))
    _eventually(lambda: _admin_status(gw, "/readyz") == 200, what="readyz after the fix")
    assert _status(gw, f"allowed.test:{net.tls_port}") == 200


def _admin_status(gw: GatewayProcess, path: str) -> int:
    try:
        return gw.admin(path)[0]
    except OSError:
        return 0


# --- SIGTERM --------------------------------------------------------------------------------------


def _refused(gw: GatewayProcess) -> bool:
    try:
        with socket.create_connection(gw.proxy_addr, timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_drains_open_tunnels_and_exits_0(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(extra_args=["--shutdown-grace", "10"])
    tunnel = connect(gw, f"echo.test:{net.echo.port}")
    assert tunnel.status == 200
    tunnel.sock.sendall(b"a")
    assert recv_exactly(tunnel.sock, 1) == b"a"

    gw.signal(signal.SIGTERM)
    _eventually(lambda: _refused(gw), timeout=3, what="the listener closes")
    assert gw.admin("/readyz")[0] == 503
    assert gw.proc.poll() is None
    tunnel.sock.sendall(b"bc")  # the open tunnel still works within the grace
    assert recv_exactly(tunnel.sock, 2) == b"bc"
    started = time.monotonic()
    tunnel.sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(tunnel.sock) == b"bye 3\n"
    assert gw.proc.wait(5) == 0
    assert time.monotonic() - started < 3  # it did not wait for the 10 s grace
    line = gw.wait_log(lambda r: r.get("port") == net.echo.port)
    assert (line["bytes_up"], line["bytes_down"]) == (3, 3 + len(b"bye 3\n"))


def test_sigterm_cuts_tunnels_after_the_grace(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(
        extra_args=["--shutdown-grace", "1.5", "--idle-timeout", "30", "--header-timeout", "30"]
    )
    tunnel = connect(gw, f"echo.test:{net.echo.port}")
    assert tunnel.status == 200
    half_head = proxy_socket(gw)
    half_head.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\n")
    time.sleep(0.3)  # let the gateway read the partial head
    started = time.monotonic()
    gw.signal(signal.SIGTERM)
    # A connection still sending its head has no tunnel: it is closed at once.
    assert recv_until_eof(half_head, timeout=1.0) == b""
    assert time.monotonic() - started < 1.0
    assert recv_until_eof(tunnel.sock, timeout=5) == b""  # cut when the grace is over
    assert gw.proc.wait(5) == 0
    assert 1.3 < time.monotonic() - started < 4
    assert "cutting 1 tunnels" in gw.stderr()


# --- DNS cache ------------------------------------------------------------------------------------


def test_dns_cache_honours_ttl(shared_gateway: GatewayProcess, net: Net, dns: Any) -> None:
    dns.set("ttl.test", [(net.up, 2)])
    target = f"ttl.test:{net.tls_port}"
    queries = dns.queries("ttl.test", "A")
    hits = shared_gateway.metrics().get_value("tidegate_dns_cache_hits_total")
    first = time.monotonic()
    assert _status(shared_gateway, target) == 200
    assert _status(shared_gateway, target) == 200
    if time.monotonic() - first < 1.5:  # (on a very slow machine the TTL may have run out)
        assert dns.queries("ttl.test", "A") == queries + 1
        assert shared_gateway.metrics().get_value("tidegate_dns_cache_hits_total") == hits + 1
    time.sleep(max(0.0, first + 2.3 - time.monotonic()))
    assert _status(shared_gateway, target) == 200
    assert dns.queries("ttl.test", "A") == queries + 2
    assert dns.queries("ttl.test", "AAAA") >= 1


def test_dns_min_ttl_bounds_the_cache(gateway_factory: GatewayFactory, net: Net, dns: Any) -> None:
    gw = gateway_factory(
        dns={"servers": [net.dns.address], "cache": {"minTTLSeconds": 30, "maxTTLSeconds": 60}}
    )
    dns.set("rebind.test", lambda n: [(net.up if n == 0 else net.blocked, 0)])
    for _ in range(3):  # a TTL of 0 is held for minTTLSeconds: one lookup only
        reply = connect(gw, f"rebind.test:{net.tls_port}")
        assert reply.status == 200
        assert tls_get(reply.sock, net, "rebind.test")["server"] == "up-tls"
    assert dns.queries("rebind.test", "A") == 1


def test_unknown_name_gets_502_dns_error(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(defaultAction="Allow")
    reply = connect(gw, "nosuch.test:443")
    assert (reply.status, reply.reason) == (502, "dns_error")


# --- metrics and health ---------------------------------------------------------------------------


def test_metrics_endpoint(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory()
    tunnels = [connect(gw, f"echo.test:{net.echo.port}") for _ in range(2)]
    for t in tunnels:
        t.sock.sendall(b"12345")
        assert recv_exactly(t.sock, 5) == b"12345"
    assert gw.metrics().get_value("tidegate_tunnels_active") == 2
    reply = connect(gw, f"allowed.test:{net.tls_port}")
    tls_get(reply.sock, net, "allowed.test")
    connect(gw, f"allowed.test:{net.tls_port}").sock.close()
    assert connect(gw, "denied.test:443").status == 403
    for t in tunnels:
        t.sock.close()
    gw.wait_metric("tidegate_tunnels_active", lambda v: v == 0)

    metrics = gw.metrics()
    for name in (
        "tidegate_requests_total",
        "tidegate_tunnels_active",
        "tidegate_bytes_total",
        "tidegate_upstream_connect_seconds_bucket",
        "tidegate_upstream_connect_seconds_count",
        "tidegate_dns_cache_hits_total",
        "tidegate_bundle_generation",
        "tidegate_bundle_reloads_total",
    ):
        assert name in metrics.names(), name
    allow = metrics.get_value(
        "tidegate_requests_total", decision="allow", policy="t/main", reason="allow_rule"
    )
    assert allow == 4
    assert metrics.get_value("tidegate_requests_total", decision="deny", reason="deny_rule") == 1
    assert metrics.get_value("tidegate_bytes_total", direction="up") >= 10
    assert metrics.get_value("tidegate_bytes_total", direction="down") >= 10
    assert metrics.get_value("tidegate_upstream_connect_seconds_count") == 4
    assert metrics.get_value("tidegate_dns_cache_hits_total") >= 2  # echo.test, allowed.test
    assert metrics.get_value("tidegate_bundle_generation") == 1
    assert metrics.get_value("tidegate_bundle_reloads_total", result="success") == 1
    label_values = {v for _, labels in metrics for _, v in labels}
    assert not any(".test" in v for v in label_values), "a host became a metric label"


def test_health_endpoints_and_separate_ports(shared_gateway: GatewayProcess) -> None:
    assert shared_gateway.admin("/healthz") == (200, "ok\n")
    status, text = shared_gateway.admin("/readyz")
    assert status == 200 and text.startswith("ready: bundle generation ")
    reply = send_raw(shared_gateway, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 400  # the proxy port never serves the admin endpoints


# --- --bundle mode with a kubelet-style ConfigMap volume ------------------------------------------


def _bundle_bytes(net: Net, policies: list[dict[str, Any]], generation: int) -> bytes:
    docs = parse_documents(yaml.safe_dump_all([gateway_doc(net), *policies]))
    assert docs.gateway is not None
    return compile_bundle(gateway=docs.gateway, policies=docs.policies, generation=generation)


def _publish(volume: Path, name: str, data: bytes) -> None:
    """What the kubelet does: a new timestamped dir, then swap ``..data`` atomically."""
    (volume / name).mkdir()
    (volume / name / "bundle.json").write_bytes(data)
    tmp = volume / "..data_tmp"
    tmp.symlink_to(name)
    os.replace(tmp, volume / "..data")
    if not (volume / "bundle.json").is_symlink():
        (volume / "bundle.json").symlink_to("..data/bundle.json")


def test_bundle_file_swapped_like_a_configmap_volume(
    gateway_factory: GatewayFactory, net: Net, tmp_path: Path
) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    first = [policy_doc("p", allow=[{"host": "allowed.test", "ports": [net.tls_port]}])]
    _publish(volume, "..2026_01", _bundle_bytes(net, first, 1))
    gw = gateway_factory(args=["--bundle", str(volume / "bundle.json")])
    assert _status(gw, f"allowed.test:{net.tls_port}") == 200
    assert _status(gw, f"other.test:{net.tls_port}") == 403

    second = [policy_doc("p", allow=[{"host": "other.test", "ports": [net.tls_port]}])]
    _publish(volume, "..2026_02", _bundle_bytes(net, second, 2))
    _eventually(lambda: _status(gw, f"other.test:{net.tls_port}") == 200, what="swap seen")
    assert _status(gw, f"allowed.test:{net.tls_port}") == 403
    assert gw.metrics().get_value("tidegate_bundle_generation") == 2

    # A corrupt bundle (sha256 no longer matches) is rejected; generation 2 stays.
    errors = gw.metrics().get_value("tidegate_bundle_reloads_total", result="error")
    corrupt = _bundle_bytes(net, first, 3).replace(b"allowed.test", b"allowed.tesx")
    _publish(volume, "..2026_03", corrupt)
    gw.wait_metric("tidegate_bundle_reloads_total", lambda v: v > errors, result="error")
    assert gw.metrics().get_value("tidegate_bundle_generation") == 2
    assert _status(gw, f"other.test:{net.tls_port}") == 200


# --- tidegate check / suggest ------------------------------------------------------------


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TIDEGATE, *args], capture_output=True, text=True, input=stdin, timeout=30, check=False
    )


@pytest.mark.parametrize(
    ("client", "target", "code", "first_line", "reason"),
    [
        (
            "127.0.0.1",
            "allowed.test:443",
            0,
            "ALLOW allowed.test:443 from pod t/local {app=test} at 127.0.0.1",
            "allow_rule",
        ),
        ("127.0.0.1", "ALLOWED.test.:443", 0, "ALLOW allowed.test:443", "allow_rule"),
        ("127.0.0.1", "other.test:443", 1, "DENY other.test:443", "no_rule_matched"),
        ("127.0.0.1", "denied.test:443", 1, "DENY denied.test:443", "deny_rule"),
        ("127.0.0.1", "allowed.test:22", 1, "DENY allowed.test:22", "port_not_allowed"),
        ("127.0.0.1", "audit.test:443", 0, "AUDIT audit.test:443", "deny_rule"),
        ("10.1.2.3", "allowed.test:443", 1, "DENY allowed.test:443", "client_not_allowed"),
        ("127.0.0.1", "2130706433:443", 1, "DENY 127.0.0.1:443", "no_rule_matched"),
    ],
)
def test_check_command(
    net: Net,
    tmp_path: Path,
    client: str,
    target: str,
    code: int,
    first_line: str,
    reason: str,
) -> None:
    write_policy_dir(tmp_path, net, standard_policies(net))
    result = _run("check", "--policies", str(tmp_path), "--client", client, target)
    assert result.returncode == code, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(first_line)
    assert f"reason: {reason}" in lines[1]


def test_check_command_json(net: Net, tmp_path: Path) -> None:
    write_policy_dir(tmp_path, net, standard_policies(net))
    args = ["check", "--policies", str(tmp_path), "--client", "127.0.0.1", "--json"]
    result = _run(*args, "Denied.Test:443")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "decision": "deny",
        "reason": "deny_rule",
        "message": "denied by t/main deny[0]",
        "policy": "t/main",
        "rule": "deny[0]",
        "host": "denied.test",
        "port": 443,
        "client": "127.0.0.1",
        "identity": "pod",
        "client_namespace": "t",
        "client_pod": "local",
        "governing_policies": ["t/main", "t/watch", "t/watch-allow"],
    }


@pytest.mark.parametrize(
    ("who", "code", "first_line"),
    [
        (["--pod", "t/local"], 1, "DENY denied.test:443 from pod t/local {app=test} at 127.0.0.1"),
        (["--namespace", "t", "--labels", "app=x"], 1, "DENY denied.test:443 from pod t/* {app=x}"),
        (["--namespace", "other"], 1, "DENY denied.test:443 from pod other/*"),
        (["--client", "127.0.0.2"], 1, "DENY denied.test:443 from 127.0.0.2"),
    ],
)
def test_check_command_identifies_the_client(
    net: Net, tmp_path: Path, who: list[str], code: int, first_line: str
) -> None:
    write_policy_dir(tmp_path, net, standard_policies(net))
    result = _run("check", "--policies", str(tmp_path), *who, "denied.test:443")
    assert result.returncode == code, result.stderr
    assert result.stdout.splitlines()[0] == first_line
    reason = "deny_rule" if who[1].startswith("t") else "no_rule_matched"
    assert f"reason: {reason}" in result.stdout


def test_check_command_errors(net: Net, tmp_path: Path) -> None:
    write_policy_dir(tmp_path, net, standard_policies(net))
    assert _run("check", "--policies", str(tmp_path), "--client", "x", "a.test:1").returncode == 2
    missing = _run("check", "--policies", str(tmp_path), "--pod", "t/nobody", "a.test:1")
    assert missing.returncode == 2 and "not in the identities" in missing.stderr
    nobody = _run("check", "--policies", str(tmp_path), "a.test:1")
    assert nobody.returncode == 2 and "--client" in nobody.stderr
    bad_target = _run("check", "--policies", str(tmp_path), "--client", "127.0.0.1", "a.test")
    assert bad_target.returncode == 2
    assert bad_target.stderr.startswith("error: ")
    note = _run("check", "--policies", str(tmp_path), "--client", "127.0.0.1", "127.1:443")
    assert "SSRF guard refuses it" in note.stdout


def test_suggest_turns_an_audit_run_into_a_working_policy(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    audit = gateway_factory([], mode="Audit")
    for target in (
        f"suggest-a.test:{net.tls_port}",
        f"suggest-a.test:{net.tls_port}",
        f"suggest-b.test:{net.tls_port}",
        f"echo.test:{net.echo.port}",
        "ssrf.test:443",  # refused by the SSRF guard: not a destination to allow
    ):
        connect(audit, target).sock.close()
    assert audit.stop() == 0
    log = audit.log_path.read_text()
    assert sum(1 for line in log.splitlines() if '"decision":"audit"' in line) == 4

    result = _run("suggest", str(audit.log_path), "--name", "learned", "--namespace", "t")
    assert result.returncode == 0, result.stderr
    assert _run("suggest", "--name", "learned", "--namespace", "t", stdin=log).stdout == (
        result.stdout
    )
    (suggested,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    # the log names the client pod's namespace (t): one EgressPolicy for that namespace
    assert suggested["kind"] == "EgressPolicy"
    assert suggested["metadata"]["namespace"] == "t" and "sources" not in suggested["spec"]
    rules = {r["host"]: r.get("ports") for r in suggested["spec"]["allow"]}
    assert rules == {
        "suggest-a.test": [net.tls_port],
        "suggest-b.test": [net.tls_port],
        "echo.test": [net.echo.port],
    }
    assert 'host: "suggest-a.test"  # 2 requests, last seen' in result.stdout

    enforce = gateway_factory([suggested])
    for target in (
        f"suggest-a.test:{net.tls_port}",
        f"suggest-b.test:{net.tls_port}",
        f"echo.test:{net.echo.port}",
    ):
        assert _status(enforce, target) == 200, target
    reply = connect(enforce, f"other.test:{net.tls_port}")
    assert (reply.status, reply.reason) == (403, "no_rule_matched")
