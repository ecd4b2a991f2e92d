"""PROXY protocol through the real gateway process on loopback.

127.0.0.2 plays the load balancer (it is in --proxy-protocol-from) and names clients in its
headers; 127.0.0.1 is a direct client outside the trusted range. The headers come from our
own bytes, from an independent implementation (the ``proxy-protocol`` package, v1 and v2
with TLVs) and from curl's ``--haproxy-protocol``. What decides, what is logged and what is
counted must be the header's client, never the balancer, and never an address a direct
client names for itself.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from fixtures_net import (
    TIDEGATE,
    GatewayProcess,
    Net,
    cluster_policy_doc,
    proxy_socket,
    read_reply,
    recv_exactly,
    recv_until_eof,
)
from fixtures_net import _start as start_gateway
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.tlv import ProxyProtocolTLV
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from tidegate.gateway.proxyproto import V2_SIGNATURE

LB = "127.0.0.2"  # the load balancer: trusted
CURL_LB = "127.0.0.3"  # curl, sending its own v1 header: trusted
CLIENT_V4 = "198.51.100.7"
CLIENT_V6 = "2001:db8:77::7"
OUTSIDER = "203.0.113.9"  # not in clientCIDRs


@pytest.fixture(scope="module")
def gw(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway for the module (the tests compare counters before and after)."""
    # Clients behind the balancer are no pods: chosen by address, by cluster policies.
    team = cluster_policy_doc(
        "team-a",
        sources={"cidrs": ["198.51.100.0/24", "2001:db8:77::/48"]},
        allow=[{"host": "echo.test", "ports": [net.echo.port]}],
    )
    curl = cluster_policy_doc(
        "curl",
        sources={"cidrs": [f"{CURL_LB}/32"]},
        allow=[{"host": "plain.test", "ports": [net.http_port]}],
    )
    started: list[GatewayProcess] = []
    try:
        yield start_gateway(
            net,
            tmp_path_factory,
            started,
            [team, curl],
            clientCIDRs=["127.0.0.0/8", "198.51.100.0/24", "2001:db8:77::/48"],
            extra_args=["--proxy-protocol", "--proxy-protocol-from", f"{LB}/32", f"{CURL_LB}/32"],
        )
    finally:
        for process in started:
            process.stop()
            process.assert_only_loopback_upstreams()


def rejections(gw: GatewayProcess, reason: str) -> float:
    return gw.metrics().get_value("tidegate_connections_rejected_total", reason=reason)


def from_lb(gw: GatewayProcess, source: str = LB) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(gw.proxy_addr)
    return sock


def connect_line(net: Net) -> bytes:
    target = f"echo.test:{net.echo.port}"
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def v4(src: str, port: int = 40000) -> ProxyResultIPv4:
    return ProxyResultIPv4(
        (ipaddress.IPv4Address(src), port),
        (ipaddress.IPv4Address("127.0.0.1"), 3128),
        protocol=socket.SOCK_STREAM,
        tlv=ProxyProtocolTLV(authority="gw.example", unique_id=b"conn-1"),
    )


HEADERS: dict[str, Callable[[], tuple[bytes, str]]] = {
    "v1-ours": lambda: (f"PROXY TCP4 {CLIENT_V4} 127.0.0.1 40000 3128\r\n".encode(), CLIENT_V4),
    "v1-library": lambda: (ProxyProtocolV1().pack(v4(CLIENT_V4)), CLIENT_V4),
    "v2-library-tlvs": lambda: (ProxyProtocolV2().pack(v4(CLIENT_V4)), CLIENT_V4),
    "v2-library-ipv6": lambda: (
        ProxyProtocolV2().pack(
            ProxyResultIPv6(
                (ipaddress.IPv6Address(CLIENT_V6), 40000),
                (ipaddress.IPv6Address("::1"), 3128),
                protocol=socket.SOCK_STREAM,
            )
        ),
        CLIENT_V6,
    ),
}


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@pytest.mark.parametrize("kind", list(HEADERS))
def test_the_header_names_the_client(gw: GatewayProcess, net: Net, kind: str) -> None:
    header, client = HEADERS[kind]()
    sock = from_lb(gw)
    lb_port = sock.getsockname()[1]
    sock.sendall(header + connect_line(net))  # header and request in one segment
    reply = read_reply(sock)
    assert reply.status == 200, reply
    sock.sendall(b"ping")
    assert reply.rest + recv_exactly(sock, 4 - len(reply.rest)) == b"ping"
    sock.close()
    line = gw.wait_log(lambda r: r.get("via") == f"{LB}:{lb_port}")
    assert line["client"] == hostport(client, 40000)
    assert (line["decision"], line["policy"]) == ("allow", "team-a")


def test_a_client_outside_client_cidrs_is_refused_and_counted(gw: GatewayProcess, net: Net) -> None:
    before = gw.metrics().get_value(
        "tidegate_requests_total", decision="deny", reason="client_not_allowed"
    )
    sock = from_lb(gw)
    sock.sendall(f"PROXY TCP4 {OUTSIDER} 127.0.0.1 5555 3128\r\n".encode() + connect_line(net))
    reply = read_reply(sock)
    assert (reply.status, reply.reason) == (403, "client_not_allowed")
    assert OUTSIDER.encode() in reply.rest + recv_until_eof(sock)  # "client ... outside"
    line = gw.wait_log(lambda r: r.get("client") == f"{OUTSIDER}:5555")
    assert line["reason"] == "client_not_allowed" and line["via"].startswith(f"{LB}:")
    gw.wait_metric(
        "tidegate_requests_total",
        lambda v: v == before + 1,
        decision="deny",
        reason="client_not_allowed",
    )


def test_a_direct_client_is_judged_by_its_own_address(gw: GatewayProcess, net: Net) -> None:
    sock = proxy_socket(gw)  # from 127.0.0.1, outside --proxy-protocol-from
    port = sock.getsockname()[1]
    sock.sendall(connect_line(net))
    reply = read_reply(sock)
    # team-a governs 198.51.100.0/24 only: 127.0.0.1 is not it, and no header says otherwise
    assert (reply.status, reply.reason) == (403, "no_rule_matched")
    line = gw.wait_log(lambda r: r.get("client") == f"127.0.0.1:{port}")
    assert "via" not in line


def test_a_direct_client_cannot_forge_its_address(gw: GatewayProcess, net: Net) -> None:
    accepts = net.echo.accepts
    rejected = rejections(gw, "proxy_protocol_unexpected")
    for forged in (
        f"PROXY TCP4 {CLIENT_V4} 127.0.0.1 40000 3128\r\n".encode(),
        ProxyProtocolV2().pack(v4(CLIENT_V4)),
    ):
        sock = proxy_socket(gw)
        port = sock.getsockname()[1]
        sock.sendall(forged + connect_line(net))
        reply = read_reply(sock)
        assert (reply.status, reply.reason) == (400, "proxy_protocol_unexpected")
        assert b"not in --proxy-protocol-from" in reply.rest + recv_until_eof(sock)
        line = gw.wait_log(lambda r, port=port: r.get("client") == f"127.0.0.1:{port}")
        assert line["decision"] == "deny" and "via" not in line
        assert f"from 127.0.0.1:{port}" not in gw.stderr()  # no stderr flood from clients
    assert net.echo.accepts == accepts
    gw.wait_metric(
        "tidegate_connections_rejected_total",
        lambda v: v == rejected + 2,
        reason="proxy_protocol_unexpected",
    )


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(b"CONNECT echo.test:1 HTTP/1.1\r\n\r\n", id="no-header"),
        pytest.param(b"PROXY TCP4 198.51.100.07 127.0.0.1 1 2\r\n", id="leading-zero"),
        pytest.param(b"PROXY TCP4 198.51.100.7 127.0.0.1 1 2\n", id="bare-lf"),
        pytest.param(V2_SIGNATURE + b"\x21\x11\x13\x88", id="v2-announces-5000-bytes"),
        pytest.param(V2_SIGNATURE + b"\x23\x11\x00\x0c" + b"\0" * 12, id="v2-command-3"),
    ],
)
def test_a_trusted_peer_without_a_valid_header_is_refused(
    gw: GatewayProcess, net: Net, opening: bytes
) -> None:
    accepts = net.echo.accepts
    rejected = rejections(gw, "proxy_protocol")
    sock = from_lb(gw)
    lb_port = sock.getsockname()[1]
    started = time.monotonic()
    sock.sendall(opening)  # refused at once, not at the header deadline
    reply = read_reply(sock)
    assert time.monotonic() - started < 0.9
    assert (reply.status, reply.reason) == (400, "proxy_protocol")
    assert b"no valid PROXY protocol header" in reply.rest + recv_until_eof(sock)
    line = gw.wait_log(lambda r: r.get("via") == f"{LB}:{lb_port}")
    assert line["reason"] == "proxy_protocol" and line["client"] == f"{LB}:{lb_port}"
    assert f"refused a connection from {LB}:{lb_port}" in gw.stderr()
    assert net.echo.accepts == accepts
    assert rejections(gw, "proxy_protocol") == rejected + 1


def test_a_truncated_header_is_logged_as_such(gw: GatewayProcess) -> None:
    rejected = rejections(gw, "proxy_protocol")
    sock = from_lb(gw)
    lb_port = sock.getsockname()[1]
    sock.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 4")
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    line = gw.wait_log(lambda r: r.get("via") == f"{LB}:{lb_port}")
    assert (line["reason"], line["client"]) == ("proxy_protocol", f"{LB}:{lb_port}")
    assert "closed inside the PROXY protocol header" in line["message"]
    assert rejections(gw, "proxy_protocol") == rejected + 1


def test_header_and_request_split_across_reads(gw: GatewayProcess, net: Net) -> None:
    header = ProxyProtocolV2().pack(v4(CLIENT_V4, 41000))
    sock = from_lb(gw)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(header)):
        sock.sendall(header[i : i + 1])
        time.sleep(0.005)
    request = connect_line(net)
    sock.sendall(request[:10])
    time.sleep(0.05)
    sock.sendall(request[10:])
    reply = read_reply(sock)
    assert reply.status == 200
    sock.close()
    gw.wait_log(lambda r: r.get("client") == f"{CLIENT_V4}:41000" and r["decision"] == "allow")


def test_a_slow_header_is_cut_at_the_head_deadline(gw: GatewayProcess) -> None:
    rejected = rejections(gw, "proxy_protocol_timeout")
    sock = from_lb(gw)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    sock.sendall(b"PROXY TCP4 198.")
    reply = None
    for byte in b"51.100.7 127.0.0.1 40000 3128":  # one byte every 0.3 s would take 9 s
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        sock.settimeout(0.3)
        try:
            reply = read_reply(sock, timeout=0.3)
            break
        except (TimeoutError, ConnectionError):
            continue
    assert reply is not None
    elapsed = time.monotonic() - started
    assert (reply.status, reply.reason) == (408, "proxy_protocol_timeout")
    assert elapsed < 3.0  # --header-timeout 1, swept every 0.2 s
    gw.wait_metric(
        "tidegate_connections_rejected_total",
        lambda v: v == rejected + 1,
        reason="proxy_protocol_timeout",
    )


def test_local_command_keeps_the_balancer_as_client(gw: GatewayProcess, net: Net) -> None:
    sock = from_lb(gw)
    lb_port = sock.getsockname()[1]
    sock.sendall(ProxyProtocolV2().pack(ProxyResultLocal()) + connect_line(net))
    reply = read_reply(sock)
    assert (reply.status, reply.reason) == (403, "no_rule_matched")  # judged as 127.0.0.2
    line = gw.wait_log(lambda r: r.get("via") == f"{LB}:{lb_port}")
    assert line["client"] == f"{LB}:{lb_port}"


def test_a_health_check_without_bytes_leaves_no_log_line(gw: GatewayProcess, net: Net) -> None:
    sock = from_lb(gw)
    lb_port = sock.getsockname()[1]
    sock.close()
    marker = from_lb(gw)  # a later connection whose line proves the log was flushed
    marker_port = marker.getsockname()[1]
    marker.sendall(b"PROXY UNKNOWN\r\n" + connect_line(net))
    assert read_reply(marker).status == 403
    gw.wait_log(lambda r: r.get("client") == f"{LB}:{marker_port}")
    assert not [r for r in gw.log_lines() if r.get("via") == f"{LB}:{lb_port}"]


def test_curl_haproxy_protocol(gw: GatewayProcess, net: Net) -> None:
    """curl sends a v1 header naming its own socket to the proxy for a plain-HTTP request."""
    base = [
        "curl",
        "-s",
        "--max-time",
        "5",
        "--interface",
        CURL_LB,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        gw.proxy_url,
        net.http_url("plain.test"),
    ]
    env = {"PATH": "/usr/bin:/bin"}
    ok = subprocess.run([*base, "--haproxy-protocol"], capture_output=True, text=True, env=env)
    assert ok.stdout == "200", ok
    line = gw.wait_log(lambda r: r.get("host") == "plain.test" and r.get("status") == 200)
    assert line["client"].startswith(f"{CURL_LB}:") and line["via"].startswith(f"{CURL_LB}:")
    assert line["policy"] == "curl"
    # The same request without the header, from the trusted address: refused.
    bad = subprocess.run(base, capture_output=True, text=True, env=env)
    assert bad.stdout == "400", bad


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proxy-protocol"], "go together"),
        (["--proxy-protocol-from", "10.0.0.0/8"], "go together"),
        (["--proxy-protocol", "--proxy-protocol-from", "10.0.0.1/8"], "host bits set"),
    ],
)
def test_flags_must_name_trusted_ranges(tmp_path: object, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [TIDEGATE, "gateway", "--policies", "/nonexistent", "--no-metrics", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc
    assert message in proc.stderr


def test_v2_header_bytes_are_what_the_library_sends() -> None:
    """Guards the test's own assumption: the library's v2 header is TCP over IPv4 with TLVs."""
    data = ProxyProtocolV2().pack(v4(CLIENT_V4))
    assert data[:12] == V2_SIGNATURE and data[12:14] == b"\x21\x11"
    (length,) = struct.unpack("!H", data[14:16])
    assert length > 12  # addresses plus TLVs
