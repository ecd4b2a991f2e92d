"""Policy decisions through the real proxy: allow, deny, audit, clients, ports, SSRF, SNI."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import subprocess
import time

import httpx
import pytest
import requests
from fixtures_net import (
    GatewayFactory,
    GatewayProcess,
    Net,
    cluster_policy_doc,
    connect,
    recv_until_eof,
    tls_get,
)

# --- allow ---------------------------------------------------------------------------------


def test_allow_raw_connect_reaches_the_upstream(shared_gateway: GatewayProcess, net: Net) -> None:
    reply = connect(shared_gateway, f"allowed.test:{net.tls_port}")
    assert reply.status == 200
    answer = tls_get(reply.sock, net, "allowed.test", "/raw")
    assert answer == {"server": "up-tls", "sni": "allowed.test", "path": "/raw"}
    line = shared_gateway.wait_log(
        lambda r: r.get("host") == "allowed.test" and r.get("bytes_down", 0) > 0
    )
    assert line["decision"] == "allow"
    assert line["reason"] == "allow_rule"
    assert line["policy"] == "t/main"
    assert line["rule"] == "allow[0]"
    assert line["method"] == "CONNECT"
    assert line["status"] == 200
    assert line["upstream"] == f"{net.up}:{net.tls_port}"
    assert line["client"].startswith("127.0.0.1:")
    assert line["bytes_up"] > 0
    assert isinstance(line["duration_ms"], float | int)


def _curl(gw: GatewayProcess, net: Net, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--noproxy",
            "",
            "-x",
            gw.proxy_url,
            "--cacert",
            str(net.ca_file),
            "-w",
            "\n%{http_code} %{http_connect}",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        check=False,
    )


def test_allow_with_curl(shared_gateway: GatewayProcess, net: Net) -> None:
    result = _curl(shared_gateway, net, net.https_url("allowed.test", "/curl"))
    assert result.returncode == 0, result.stderr
    body, _, codes = result.stdout.rpartition("\n")
    assert codes == "200 200"
    assert '"path": "/curl"' in body and '"sni": "allowed.test"' in body


def test_deny_with_curl_reports_the_connect_status(
    shared_gateway: GatewayProcess, net: Net
) -> None:
    result = _curl(shared_gateway, net, net.https_url("other.test", "/curl"))
    assert result.returncode != 0
    assert result.stdout.rstrip().endswith("403")


def test_allow_with_requests(shared_gateway: GatewayProcess, net: Net) -> None:
    with requests.Session() as session:
        session.trust_env = False
        resp = session.get(
            net.https_url("allowed.test", "/requests"),
            proxies={"https": shared_gateway.proxy_url, "http": shared_gateway.proxy_url},
            verify=str(net.ca_file),
            timeout=10,
        )
    assert resp.status_code == 200
    assert resp.json()["path"] == "/requests"
    with requests.Session() as session, pytest.raises(requests.exceptions.ProxyError):
        session.trust_env = False
        session.get(
            net.https_url("other.test"),
            proxies={"https": shared_gateway.proxy_url},
            verify=str(net.ca_file),
            timeout=10,
        )


def test_allow_with_httpx(shared_gateway: GatewayProcess, net: Net) -> None:
    with httpx.Client(
        proxy=shared_gateway.proxy_url, verify=net.ssl_context(), trust_env=False
    ) as c:
        resp = c.get(net.https_url("allowed.test", "/httpx"), timeout=10)
        assert resp.status_code == 200
        assert resp.json()["path"] == "/httpx"
        with pytest.raises(httpx.ProxyError):
            c.get(net.https_url("denied.test"), timeout=10)


# --- deny, port, audit -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reason", "policy", "rule"),
    [
        ("other.test:{tls}", "no_rule_matched", None, None),
        ("denied.test:443", "deny_rule", "t/main", "deny[0]"),
        ("DENIED.test.:443", "deny_rule", "t/main", "deny[0]"),  # case and trailing dot
        ("allowed.test:8443", "port_not_allowed", "t/main", "allow[0]"),
        ("denied.test:22", "deny_rule", "t/main", "deny[0]"),  # a deny covers every port
        ("tcp.test:443", "port_not_allowed", "t/main", "allow[7]"),
    ],
)
def test_denied_requests_get_403_with_a_reason(
    shared_gateway: GatewayProcess,
    net: Net,
    target: str,
    reason: str,
    policy: str | None,
    rule: str | None,
) -> None:
    target = target.format(tls=net.tls_port)
    before = net.tls.accepts
    reply = connect(shared_gateway, target)
    assert reply.status == 403
    assert reply.reason == reason
    assert reply.headers["connection"] == "close"
    body = reply.rest + recv_until_eof(reply.sock)  # the message, then the proxy closes
    assert len(body) == int(reply.headers["content-length"]) > 1
    host = target.rpartition(":")[0].lower().rstrip(".")
    line = shared_gateway.wait_log(lambda r: r.get("host") == host and r.get("reason") == reason)
    assert line["decision"] == "deny"
    assert line["status"] == 403
    assert line.get("policy") == policy
    assert line.get("rule") == rule
    assert "upstream" not in line
    assert net.tls.accepts == before  # nothing was dialled


def test_policy_in_audit_mode_allows_and_logs_audit(
    shared_gateway: GatewayProcess, net: Net
) -> None:
    before = shared_gateway.metrics().get_value("tidegate_requests_total", decision="audit")
    reply = connect(shared_gateway, f"audit.test:{net.tls_port}")
    assert reply.status == 200
    assert tls_get(reply.sock, net, "audit.test")["sni"] == "audit.test"
    line = shared_gateway.wait_log(lambda r: r.get("host") == "audit.test")
    assert line["decision"] == "audit"
    assert line["reason"] == "deny_rule"
    assert line["policy"] == "t/watch"
    assert line["status"] == 200
    after = shared_gateway.metrics().get_value("tidegate_requests_total", decision="audit")
    assert after == before + 1


def test_gateway_in_audit_mode_allows_what_enforce_would_deny(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    gw = gateway_factory(mode="Audit")
    for name in ("other.test", "denied.test"):
        reply = connect(gw, f"{name}:{net.tls_port}")
        assert reply.status == 200, name
        assert tls_get(reply.sock, net, name)["sni"] == name
        line = gw.wait_log(lambda r, n=name: r.get("host") == n)
        assert line["decision"] == "audit"
    # The SSRF guard is not a policy: Audit never opens it.
    reply = connect(gw, "ssrf.test:443")
    assert reply.status == 403
    assert reply.reason == "private_address"
    assert net.blocked_accepts() == 0


# --- clients ------------------------------------------------------------------------------------


def test_client_outside_client_cidrs_is_refused(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(clientCIDRs=["10.0.0.0/8"], mode="Audit")  # Audit never opens it either
    before = net.tls.accepts
    reply = connect(gw, f"allowed.test:{net.tls_port}")
    assert reply.status == 403
    assert reply.reason == "client_not_allowed"
    line = gw.wait_log(lambda r: r.get("reason") == "client_not_allowed")
    assert line["decision"] == "deny"
    assert net.tls.accepts == before


# --- SSRF ---------------------------------------------------------------------------------------


def test_name_resolving_to_a_non_excepted_loopback_is_refused(
    shared_gateway: GatewayProcess, net: Net
) -> None:
    reply = connect(shared_gateway, "ssrf.test:443")
    assert reply.status == 403
    assert reply.reason == "private_address"
    line = shared_gateway.wait_log(lambda r: r.get("host") == "ssrf.test")
    assert line["decision"] == "deny"
    assert "policy" not in line
    assert net.blocked_accepts() == 0


def test_only_the_checked_addresses_are_dialled(shared_gateway: GatewayProcess, net: Net) -> None:
    """mixed.test answers a blocked and an excepted address: only the latter is used."""
    for _ in range(3):
        reply = connect(shared_gateway, f"mixed.test:{net.tls_port}")
        assert reply.status == 200
        assert tls_get(reply.sock, net, "mixed.test")["server"] == "up-tls"
    assert net.blocked_accepts() == 0


def _numeric_forms(address: str) -> list[str]:
    ip = ipaddress.IPv4Address(address)
    a, b, c, d = ip.packed
    return [
        str(int(ip)),
        f"0x{a:x}.{(b << 16) | (c << 8) | d}",
        f"0{int(ip):o}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}",
        f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",
        f"[::ffff:{address}]",
    ]


@pytest.mark.parametrize(
    "target",
    ["2130706433:443", "0x7f.1:443", "017700000001:443", "127.1:443", "[::ffff:127.0.0.1]:443"],
)
def test_numeric_loopback_forms_are_refused(shared_gateway: GatewayProcess, target: str) -> None:
    reply = connect(shared_gateway, target)
    assert reply.status == 403
    line = shared_gateway.wait_log(
        lambda r: (
            r.get("method") == "CONNECT"
            and r.get("port") == 443
            and r.get("status") == 403
            and r.get("host") in ("127.0.0.1", "::ffff:7f00:1")
        )
    )
    assert line["decision"] == "deny"


def test_numeric_forms_of_a_blocked_address_never_reach_it(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    """Even with every policy decision turned into "allow", the SSRF guard holds."""
    gw = gateway_factory(defaultAction="Allow")
    for form in _numeric_forms(net.blocked):
        reply = connect(gw, f"{form}:443")
        assert (reply.status, reply.reason) == (403, "private_address"), form
    hosts = {r["host"] for r in gw.log_lines() if r.get("reason") == "private_address"}
    assert hosts <= {net.blocked, f"::ffff:{net.blocked}"}
    assert net.blocked_accepts() == 0


def test_dns_rebinding_never_reaches_the_blocked_address(
    shared_gateway: GatewayProcess, net: Net, dns: object
) -> None:
    net.dns.set("rebind.test", lambda n: [(net.up if n % 2 == 0 else net.blocked, 0)])
    outcomes = []
    for _ in range(6):
        reply = connect(shared_gateway, f"rebind.test:{net.tls_port}")
        if reply.status == 200:
            assert tls_get(reply.sock, net, "rebind.test")["server"] == "up-tls"
            outcomes.append("reached")
        else:
            assert (reply.status, reply.reason) == (403, "private_address")
            outcomes.append("refused")
    # TTL 0 with minTTLSeconds 0: every request looked up again, so both answers were seen.
    assert set(outcomes) == {"reached", "refused"}
    assert net.dns.queries("rebind.test", "A") >= 6
    assert net.blocked_accepts() == 0


# --- SNI ---------------------------------------------------------------------------------------


def test_sni_must_match_the_connect_host(shared_gateway: GatewayProcess, net: Net) -> None:
    if net.tls_port != 443:
        pytest.skip("cannot bind port 443 on a loopback address (needs root)")
    seen_before = len(net.tls.seen)
    reply = connect(shared_gateway, "allowed.test:443")
    assert reply.status == 200
    tls = net.ssl_context().wrap_socket(
        reply.sock, server_hostname="other.test", do_handshake_on_connect=False
    )
    tls.settimeout(5)
    with pytest.raises((ssl.SSLError, OSError)):
        tls.do_handshake()
    tls.close()
    line = shared_gateway.wait_log(
        lambda r: r.get("reason") == "sni_mismatch" and r.get("sni") == "other.test"
    )
    assert line["decision"] == "deny"
    assert line["host"] == "allowed.test"
    assert net.tls.seen[seen_before:] == []  # the ClientHello never reached the upstream
    # The matching name works on the same gateway.
    reply = connect(shared_gateway, "allowed.test:443")
    assert tls_get(reply.sock, net, "allowed.test")["sni"] == "allowed.test"


def test_sni_check_refuses_a_tunnel_that_is_not_tls(shared_gateway: GatewayProcess) -> None:
    reply = connect(shared_gateway, "allowed.test:443")
    assert reply.status == 200
    reply.sock.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert recv_until_eof(reply.sock) == b""


def test_sni_check_is_off_when_the_gateway_says_so(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    if net.tls_port != 443:
        pytest.skip("cannot bind port 443 on a loopback address (needs root)")
    gw = gateway_factory(tls={"requireSNIMatch": False})
    reply = connect(gw, "allowed.test:443")
    assert tls_get(reply.sock, net, "other.test")["sni"] == "other.test"


def test_sources_scope_a_policy_to_some_clients(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(
        [
            cluster_policy_doc(
                "far", sources={"cidrs": ["10.0.0.0/8"]}, allow=[{"host": "other.test"}]
            ),
            cluster_policy_doc(
                "near", sources={"cidrs": ["127.0.0.0/8"]}, allow=[{"host": "allowed.test"}]
            ),
        ]
    )
    assert connect(gw, "allowed.test:443").status == 200
    reply = connect(gw, "other.test:443")
    assert (reply.status, reply.reason) == (403, "no_rule_matched")


# --- SNI: the ClientHello as a fronting client would send it ------------------------------------


def _hello_client(net: Net, name: str) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = net.ssl_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, incoming, outgoing, outgoing.read()


def _finish_over(
    sock: socket.socket, obj: ssl.SSLObject, inc: ssl.MemoryBIO, out: ssl.MemoryBIO
) -> bytes:
    """Complete the handshake, send a GET, return the decrypted response (bounded)."""
    sock.settimeout(5)
    for _ in range(50):
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(out.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake") from None
            inc.write(data)
    obj.write(b"GET /fragmented HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.sendall(out.read())
    response = b""
    for _ in range(50):
        data = sock.recv(65536)
        if not data:
            break
        inc.write(data)
        for _ in range(100):  # drain what is decrypted so far, up to the close_notify
            try:
                chunk = obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                return response
            if not chunk:
                return response
            response += chunk
    return response


def _fragment(record: bytes, at: int) -> bytes:
    """Split one TLS handshake record into two records at payload offset ``at``."""
    assert record[0] == 22
    header, payload = record[:3], record[5:]
    first, second = payload[:at], payload[at:]
    return (
        header
        + len(first).to_bytes(2, "big")
        + first
        + header
        + len(second).to_bytes(2, "big")
        + second
    )


@pytest.mark.parametrize("how", ["trickled", "two_records"])
def test_sni_check_reassembles_the_client_hello(
    shared_gateway: GatewayProcess, net: Net, how: str
) -> None:
    if net.tls_port != 443:
        pytest.skip("cannot bind port 443 on a loopback address (needs root)")
    for name, ok in (("allowed.test", True), ("other.test", False)):
        obj, inc, out, hello = _hello_client(net, name)
        data = _fragment(hello, 40) if how == "two_records" else hello
        reply = connect(shared_gateway, "allowed.test:443")
        assert reply.status == 200
        if how == "trickled":
            for i in range(0, len(data), 64):
                reply.sock.sendall(data[i : i + 64])
                time.sleep(0.002)
        else:
            reply.sock.sendall(data)
        if ok:
            response = _finish_over(reply.sock, obj, inc, out)
            assert response.startswith(b"HTTP/1.1 200 OK")
            assert b'"path": "/fragmented"' in response
        else:
            assert recv_until_eof(reply.sock) == b""
        reply.sock.close()


def test_client_hello_must_arrive_in_time(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(extra_args=["--tls-hello-timeout", "0.5"])
    reply = connect(gw, "allowed.test:443")
    assert reply.status == 200
    started = time.monotonic()
    reply.sock.sendall(b"\x16\x03\x01")  # the start of a record, never the rest
    assert recv_until_eof(reply.sock) == b""
    assert time.monotonic() - started < 2.5
    line = gw.wait_log(lambda r: r.get("reason") == "tls_hello_timeout")
    assert line["decision"] == "deny"
