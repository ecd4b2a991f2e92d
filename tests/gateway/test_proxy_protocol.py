"""The wire through the real proxy: malformed requests, limits, timeouts, upstream failures,
half-close and plain HTTP rewriting."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
import requests
from fixtures_net import (
    GatewayFactory,
    GatewayProcess,
    Net,
    connect,
    proxy_socket,
    read_reply,
    recv_exactly,
    recv_until_eof,
    send_raw,
)


def test_the_loopback_guard_refuses_other_addresses() -> None:
    for address in (("10.0.0.1", 443), ("192.0.2.1", 80), ("example.com", 443)):
        with socket.socket() as s, pytest.raises(PermissionError):
            s.connect(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(PermissionError):
        s.sendto(b"x", ("192.0.2.1", 53))

    async def dial() -> None:
        await asyncio.get_running_loop().create_connection(asyncio.Protocol, "192.0.2.1", 443)

    with pytest.raises(PermissionError):
        asyncio.run(dial())


# --- malformed requests and limits ----------------------------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        "CONNECT allowed.test HTTP/1.1",  # no port
        "CONNECT allowed.test: HTTP/1.1",
        "CONNECT allowed.test:0 HTTP/1.1",
        "CONNECT allowed.test:70000 HTTP/1.1",
        "CONNECT allowed.test:-1 HTTP/1.1",
        "CONNECT allowed.test:44x3 HTTP/1.1",
        "CONNECT [::1 HTTP/1.1",
        "CONNECT [::1]443 HTTP/1.1",
        "CONNECT allowed .test:443 HTTP/1.1",  # spaces
        "CONNECT  allowed.test:443 HTTP/1.1",
        "CONNECT  HTTP/1.1",  # empty target
        "CONNECT :443 HTTP/1.1",
        "CONNECT a..b:443 HTTP/1.1",
        "CONNECT 1.2.3.256:443 HTTP/1.1",
        "CONNECT bad_label-.test:443 HTTP/1.1",
    ],
)
def test_malformed_connect_targets_get_400(
    shared_gateway: GatewayProcess, net: Net, request_line: str
) -> None:
    before = net.tls.accepts
    reply = send_raw(shared_gateway, f"{request_line}\r\nHost: x\r\n\r\n".encode())
    assert reply.status == 400, request_line
    assert reply.reason == "bad_request"
    assert recv_until_eof(reply.sock) is not None
    assert net.tls.accepts == before


def test_oversized_head_gets_431(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(extra_args=["--max-header-bytes", "4096"])
    filler = "X-Filler: " + "a" * 5000
    reply = send_raw(gw, f"CONNECT allowed.test:443 HTTP/1.1\r\n{filler}\r\n\r\n".encode())
    assert (reply.status, reply.reason) == (431, "header_too_large")
    # A head that never ends is cut as soon as it passes the limit.
    reply = send_raw(gw, f"CONNECT allowed.test:443 HTTP/1.1\r\n{filler}".encode())
    assert (reply.status, reply.reason) == (431, "header_too_large")
    gw.wait_log(lambda r: r.get("reason") == "header_too_large" and r.get("status") == 431)


def test_too_many_header_fields_get_431(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(extra_args=["--max-headers", "20"])
    fields = "".join(f"X-H{i}: v\r\n" for i in range(21))
    reply = send_raw(gw, f"CONNECT allowed.test:443 HTTP/1.1\r\n{fields}\r\n".encode())
    assert reply.status == 431
    fields = "".join(f"X-H{i}: v\r\n" for i in range(20))
    reply = send_raw(gw, f"CONNECT allowed.test:443 HTTP/1.1\r\n{fields}\r\n".encode())
    assert reply.status == 200


def test_slow_head_gets_408_and_is_closed(shared_gateway: GatewayProcess) -> None:
    sock = proxy_socket(shared_gateway)
    started = time.monotonic()
    sock.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: all")
    reply = read_reply(sock, timeout=5)
    elapsed = time.monotonic() - started
    assert (reply.status, reply.reason) == (408, "header_timeout")
    assert 0.9 <= elapsed < 3.0  # --header-timeout 1, swept every 0.2 s
    assert reply.rest + recv_until_eof(sock) == b"request head not received in time\n"
    shared_gateway.wait_log(lambda r: r.get("reason") == "header_timeout")


def test_slowloris_trickle_does_not_extend_the_deadline(shared_gateway: GatewayProcess) -> None:
    sock = proxy_socket(shared_gateway)
    started = time.monotonic()
    got = b""
    sock.settimeout(0.25)
    for byte in b"CONNECT allowed.test:443 HTTP/1.1\r\nX-Slow: " + b"a" * 40:
        try:
            sock.sendall(bytes([byte]))
            got = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if got or time.monotonic() - started > 4:
            break
    assert got.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 3.0


# --- upstream failures ---------------------------------------------------------------------------


def test_refused_upstream_gets_502(shared_gateway: GatewayProcess, net: Net) -> None:
    reply = connect(shared_gateway, f"tcp.test:{net.refused_port}")
    assert (reply.status, reply.reason) == (502, "upstream_unreachable")
    line = shared_gateway.wait_log(lambda r: r.get("port") == net.refused_port)
    assert line["status"] == 502
    assert line["decision"] == "allow"


def test_upstream_reset_closes_the_tunnel_and_logs(
    shared_gateway: GatewayProcess, net: Net
) -> None:
    reply = connect(shared_gateway, f"tcp.test:{net.reset.port}")
    assert reply.status == 200
    reply.sock.sendall(b"hello")
    assert recv_until_eof(reply.sock) == b""
    line = shared_gateway.wait_log(lambda r: r.get("port") == net.reset.port)
    assert line["status"] == 200
    assert line["bytes_up"] == 5
    assert line["upstream"] == f"{net.up}:{net.reset.port}"
    assert shared_gateway.admin("/healthz")[0] == 200


def test_half_close_passes_through(shared_gateway: GatewayProcess, net: Net) -> None:
    reply = connect(shared_gateway, f"echo.test:{net.echo.port}")
    assert reply.status == 200
    sock = reply.sock
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    payload = b"x" * 200_000
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)  # the upstream replies only after it sees our EOF
    data = recv_until_eof(sock)
    assert data == payload + b"bye 200004\n"
    sock.close()
    line = shared_gateway.wait_log(
        lambda r: r.get("port") == net.echo.port and r.get("bytes_up") == 200_004
    )
    assert line["bytes_down"] == 200_004 + len(b"bye 200004\n")


def test_data_sent_with_the_connect_head_is_forwarded(
    shared_gateway: GatewayProcess, net: Net
) -> None:
    sock = proxy_socket(shared_gateway)
    target = f"echo.test:{net.echo.port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nearly".encode())
    sock.shutdown(socket.SHUT_WR)
    reply = read_reply(sock)
    assert reply.status == 200
    assert reply.rest + recv_until_eof(sock) == b"earlybye 5\n"


def test_idle_tunnel_is_closed(shared_gateway: GatewayProcess, net: Net) -> None:
    reply = connect(shared_gateway, f"echo.test:{net.echo.port}")
    assert reply.status == 200
    started = time.monotonic()
    data = recv_until_eof(reply.sock, timeout=8)
    assert data == b""
    assert 2.5 < time.monotonic() - started < 6  # --idle-timeout 3
    client = f"127.0.0.1:{reply.sock.getsockname()[1]}"
    line = shared_gateway.wait_log(lambda r: r.get("client") == client)
    assert line["closed_by"] == "idle_timeout"
    assert line["port"] == net.echo.port


# --- plain HTTP -------------------------------------------------------------------------------


def _plain(gw: GatewayProcess, net: Net, head: str) -> tuple[int, bytes, bytes | None]:
    """(status, response body, the head the upstream saw or None)."""
    seen = len(net.http.seen)
    reply = send_raw(gw, head.encode())
    body = reply.rest + recv_until_eof(reply.sock)
    upstream = net.http.seen[seen] if len(net.http.seen) > seen else None
    return reply.status, body, upstream


def test_plain_http_is_rewritten_to_origin_form(shared_gateway: GatewayProcess, net: Net) -> None:
    url = net.http_url("plain.test", "/path/x?q=1&r=2")
    host = url.split("/")[2]
    seen = len(shared_gateway.log_lines())  # other tests' plain.test lines come before
    status, body, upstream = _plain(
        shared_gateway,
        net,
        f"GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Connection: keep-alive\r\n"
        "Proxy-Authorization: Basic c2VjcmV0\r\nConnection: keep-alive, X-Hop\r\n"
        "X-Hop: drop me\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Keep: kept\r\n\r\n",
    )
    assert status == 200
    assert upstream is not None and body == upstream
    lines = upstream.decode().split("\r\n")
    assert lines[0] == "GET /path/x?q=1&r=2 HTTP/1.1"
    headers = {
        k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    assert headers["host"] == host
    assert headers["via"] == "1.1 tidegate"
    assert headers["x-keep"] == "kept"
    assert headers["connection"] == "close"
    for hop in ("proxy-connection", "proxy-authorization", "x-hop", "keep-alive", "te"):
        assert hop not in headers, hop
    line = shared_gateway.wait_log(
        lambda r: r.get("method") == "GET" and r.get("host") == "plain.test", after=seen
    )
    assert line["status"] == 200
    assert line["decision"] == "allow"


def test_plain_http_without_host_header_gets_one(shared_gateway: GatewayProcess, net: Net) -> None:
    url = net.http_url("PLAIN.test.", "/")
    status, _, upstream = _plain(shared_gateway, net, f"GET {url} HTTP/1.0\r\n\r\n")
    assert status == 200
    assert upstream is not None
    assert f"\r\nHost: plain.test{'' if net.http_port == 80 else f':{net.http_port}'}\r\n" in (
        upstream.decode()
    )


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        ("GET {url} HTTP/1.1\r\nHost: evil.test\r\n\r\n", "bad_request"),  # lying Host
        ("GET {url} HTTP/1.1\r\nHost: plain.test:8080\r\n\r\n", "bad_request"),
        ("GET {url} HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n", "bad_request"),
        ("GET https://plain.test/ HTTP/1.1\r\nHost: plain.test\r\n\r\n", "bad_request"),
        ("GET /relative HTTP/1.1\r\nHost: plain.test\r\n\r\n", "bad_request"),
        ("GET http://user:pw@plain.test/ HTTP/1.1\r\nHost: plain.test\r\n\r\n", "bad_request"),
        (
            "POST {url} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\n"
            "Transfer-Encoding: chunked\r\n\r\n",
            "bad_request",
        ),
    ],
)
def test_bad_plain_http_gets_400_and_reaches_nothing(
    shared_gateway: GatewayProcess, net: Net, head: str, reason: str
) -> None:
    url = net.http_url("plain.test", "/")
    status, _, upstream = _plain(shared_gateway, net, head.format(url=url, host=url.split("/")[2]))
    assert status == 400
    assert upstream is None


def test_plain_http_to_a_denied_host_gets_403(shared_gateway: GatewayProcess, net: Net) -> None:
    url = net.http_url("other.test", "/")
    status, _, upstream = _plain(
        shared_gateway, net, f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n\r\n"
    )
    assert status == 403
    assert upstream is None


def test_plain_http_with_requests_and_a_body(shared_gateway: GatewayProcess, net: Net) -> None:
    with requests.Session() as session:
        session.trust_env = False
        resp = session.post(
            net.http_url("plain.test", "/submit"),
            data=b"payload",
            proxies={"http": shared_gateway.proxy_url},
            timeout=10,
        )
    assert resp.status_code == 200
    assert resp.headers["x-upstream"] == "up-http"
    seen = resp.content.decode()
    assert seen.startswith("POST /submit HTTP/1.1\r\n")
    assert "\r\nVia: 1.1 tidegate\r\n" in seen
    assert "Proxy-Connection" not in seen


# --- overload and slow DNS -----------------------------------------------------------------------


def test_connections_beyond_the_limit_get_503(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(extra_args=["--max-connections", "2"])
    tunnels = [connect(gw, f"echo.test:{net.echo.port}") for _ in range(2)]
    assert [t.status for t in tunnels] == [200, 200]
    reply = send_raw(gw, b"")
    assert (reply.status, reply.reason) == (503, "overloaded")
    for t in tunnels:
        t.sock.close()
    deadline = time.monotonic() + 5
    while gw.metrics().get_value("tidegate_tunnels_active") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connect(gw, f"echo.test:{net.echo.port}").status == 200
    assert gw.admin("/healthz")[0] == 200


def test_dns_server_that_never_answers_gets_504(gateway_factory: GatewayFactory, net: Net) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives queries, never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        gw = gateway_factory(dns={"servers": [address]}, extra_args=["--dns-timeout", "0.5"])
        started = time.monotonic()
        reply = connect(gw, f"allowed.test:{net.tls_port}")
        assert reply.status == 504
        assert reply.reason in ("dns_timeout", "dns_error")
        assert time.monotonic() - started < 3


# --- backpressure, concurrency, DNS over TCP ---------------------------------------------------


def test_slow_reader_is_backpressured_not_buffered(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    import psutil

    gw = gateway_factory(extra_args=["--idle-timeout", "30"])
    process = psutil.Process(gw.proc.pid)
    size = 200 * 1024 * 1024
    reply = connect(gw, f"tcp.test:{net.source.port}")
    assert reply.status == 200
    baseline = process.memory_info().rss
    reply.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    reply.sock.sendall(f"{size}\n".encode())
    time.sleep(1.0)  # the upstream could push 200 MiB in this time; we read nothing
    grown = process.memory_info().rss - baseline
    assert grown < 32 * 1024 * 1024, f"the gateway buffered {grown} bytes"
    reply.sock.settimeout(10)
    received = len(reply.rest)
    deadline = time.monotonic() + 30
    while received < size and time.monotonic() < deadline:
        chunk = reply.sock.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    assert received == size
    assert reply.sock.recv(1) == b""


def test_many_concurrent_tunnels(shared_gateway: GatewayProcess, net: Net) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> bytes:
        reply = connect(shared_gateway, f"echo.test:{net.echo.port}")
        assert reply.status == 200
        message = f"tunnel {i}".encode()
        reply.sock.sendall(message)
        reply.sock.shutdown(socket.SHUT_WR)
        data = recv_until_eof(reply.sock)
        reply.sock.close()
        return data

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    for i, data in enumerate(results):
        message = f"tunnel {i}".encode()
        assert data == message + b"bye %d\n" % len(message)


def test_large_dns_answer_over_tcp(shared_gateway: GatewayProcess, net: Net, dns: Any) -> None:
    """60 A records do not fit a 512-byte UDP answer: the resolver retries over TCP, and
    only the excepted address among them is dialled."""
    prefix = net.blocked.rpartition(".")[0]
    many = [(f"{prefix}.{i}", 0) for i in range(100, 160)] + [(net.up, 0)]
    dns.set("rebind.test", many)
    tcp_before = dns.tcp_queries
    reply = connect(shared_gateway, f"rebind.test:{net.tls_port}")
    assert reply.status == 200
    assert dns.tcp_queries > tcp_before
    client = f"127.0.0.1:{reply.sock.getsockname()[1]}"
    reply.sock.close()
    line = shared_gateway.wait_log(lambda r: r.get("client") == client)
    assert line["upstream"] == f"{net.up}:{net.tls_port}"
