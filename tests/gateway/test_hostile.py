"""The gateway under hostile peers, through the real proxy on loopback (issue 9).

Request smuggling through plain-HTTP mode, a destination that speaks first, a chatty
destination with a slow client (memory), a destination that is the gateway itself, a DNS
server that goes silent, the log lines of cut tunnels, SIGHUP, and garbage on the admin
port. Every destination here is a small raw server on the session's upstream address.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from fixtures_net import (
    DnsServer,
    GatewayFactory,
    GatewayProcess,
    Net,
    connect,
    policy_doc,
    proxy_socket,
    read_reply,
    recv_until_eof,
    send_raw,
    write_policy_dir,
)

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class _Raw(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        self.received: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Recorder(socketserver.BaseRequestHandler):
    """Record every byte until the client is quiet for 0.4 s, then answer and close."""

    server: _Raw

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(0.4)
        data = b""
        with contextlib.suppress(OSError):
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                data += chunk
        with self.server.lock:
            self.server.received.append(data)
        with contextlib.suppress(OSError):
            sock.sendall(RESPONSE)


class _Banner(socketserver.BaseRequestHandler):
    """Speak first, like SSH, then echo."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            self.request.sendall(b"SSH-2.0-banner\r\n")
            self.request.settimeout(5)
            while data := self.request.recv(4096):
                self.request.sendall(data)


class _Chatty(socketserver.BaseRequestHandler):
    """After one byte from the client: 1 KiB every millisecond for 8 seconds."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            self.request.settimeout(5)
            self.request.recv(1)
            self.request.setblocking(False)
            end = time.monotonic() + 8
            piece = b"c" * 1024
            while time.monotonic() < end:
                with contextlib.suppress(BlockingIOError):
                    self.request.send(piece)
                time.sleep(0.001)


@pytest.fixture(scope="module")
def raw_servers(net: Net) -> Iterator[dict[str, _Raw]]:
    servers = {
        "record": _Raw((net.up, 0), _Recorder),
        "banner": _Raw((net.up, 0), _Banner),
        "chatty": _Raw((net.up, 0), _Chatty),
    }
    for server in servers.values():
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}).start()
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


@pytest.fixture
def hostile_gw(
    gateway_factory: GatewayFactory, net: Net, dns: DnsServer, raw_servers: dict[str, _Raw]
) -> GatewayProcess:
    for name in ("record", "banner", "chatty"):
        dns.set(f"{name}.test", [(net.up, 300)])
    ports = [s.port for s in raw_servers.values()]
    policies = [
        policy_doc(
            "hostile",
            allow=[{"host": f"{n}.test", "ports": ports} for n in raw_servers],
            deny=[{"host": "denied.test"}],
        )
    ]
    return gateway_factory(policies)


def _recorded(server: _Raw, timeout: float = 3.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with server.lock:
            if server.received:
                return server.received.pop(0)
        time.sleep(0.05)
    raise AssertionError("the destination received no connection")


# --- plain-HTTP framing ---------------------------------------------------------------------


def test_chunked_post_then_smuggled_get_forwards_one_request(
    hostile_gw: GatewayProcess, raw_servers: dict[str, _Raw]
) -> None:
    record = raw_servers["record"]
    url = f"http://record.test:{record.port}"
    request = (
        f"POST {url}/a HTTP/1.1\r\nHost: record.test:{record.port}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: transfer-encoding\r\n\r\n"
        "5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
        f"GET {url}/smuggled HTTP/1.1\r\nHost: record.test:{record.port}\r\n\r\n"
    ).encode()
    reply = send_raw(hostile_gw, request)
    assert reply.status == 200
    got = _recorded(record)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /a HTTP/1.1\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert body == b"5\r\nhello\r\n0\r\n\r\n"  # re-framed: no extension, no trailer
    assert b"smuggled" not in got


def test_content_length_body_then_pipelined_request_is_not_forwarded(
    hostile_gw: GatewayProcess, raw_servers: dict[str, _Raw]
) -> None:
    record = raw_servers["record"]
    host = f"record.test:{record.port}"
    request = (
        f"POST http://{host}/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc"
        f"GET http://{host}/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    ).encode()
    assert send_raw(hostile_gw, request).status == 200
    got = _recorded(record)
    assert got.endswith(b"\r\n\r\nabc")
    assert b"\r\nContent-Length: 3\r\n" in got
    assert b"smuggled" not in got


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        ("Transfer-Encoding: chunked, chunked", 501),
        ("Transfer-Encoding: xchunked", 501),
        ("Transfer-Encoding: gzip", 501),
        ("Transfer-Encoding: chunked, gzip", 501),
        ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", 400),
        ("Transfer-Encoding: chunked\r\nContent-Length: 5", 400),
        ("Content-Length: \u00b2", 400),
        ("Content-Length: 5, 6", 400),
        ("Content-Length: +5", 400),
        ("X-A\n: b", 400),
        ("X-A: b\r\n folded", 400),
    ],
)
def test_ambiguous_framing_is_refused_before_anything_is_forwarded(
    hostile_gw: GatewayProcess, raw_servers: dict[str, _Raw], framing: str, status: int
) -> None:
    record = raw_servers["record"]
    host = f"record.test:{record.port}"
    request = f"POST http://{host}/ HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n\r\n5\r\nhello\r\n"
    reply = send_raw(hostile_gw, request.encode("utf-8"))
    assert (reply.status, reply.reason) == (status, "bad_request")
    time.sleep(0.2)
    with record.lock:
        assert record.received == []
    assert "Traceback" not in hostile_gw.stderr()


def test_broken_chunk_cuts_the_connection(
    hostile_gw: GatewayProcess, raw_servers: dict[str, _Raw]
) -> None:
    record = raw_servers["record"]
    host = f"record.test:{record.port}"
    sock = proxy_socket(hostile_gw)
    sock.sendall(
        f"POST http://{host}/ HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhelloX\r\n0\r\n\r\n".encode()
    )
    recv_until_eof(sock)
    sock.close()
    got = _recorded(record)
    assert b"X" not in got and b"0\r\n\r\n" not in got  # the bad chunk never went upstream
    line = hostile_gw.wait_log(lambda r: r.get("message", "").startswith("chunk data"))
    assert line["reason"] == "bad_request"


# --- a destination that speaks first --------------------------------------------------------


def test_no_destination_byte_before_the_200(
    hostile_gw: GatewayProcess, raw_servers: dict[str, _Raw]
) -> None:
    port = raw_servers["banner"].port
    for _ in range(60):
        sock = proxy_socket(hostile_gw)
        sock.sendall(f"CONNECT banner.test:{port} HTTP/1.1\r\nHost: banner.test\r\n\r\n".encode())
        time.sleep(0.002)
        data = b""
        sock.settimeout(5)
        while b"SSH-2.0-banner\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        sock.close()
        assert data == b"HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-banner\r\n", data


# --- memory ---------------------------------------------------------------------------------


def test_chatty_destination_and_slow_client_stay_bounded(
    hostile_gw: GatewayProcess, raw_servers: dict[str, _Raw]
) -> None:
    """1 KiB every millisecond into a tunnel whose client reads slowly: the gateway holds
    about its high-water mark, not a 1 MiB buffer per small read. (The first seconds fill
    the kernel's send buffer; after that each small read lands in the gateway's own write
    buffer - without the bound this grew the gateway by ~250 MiB.)"""
    process = psutil.Process(hostile_gw.proc.pid)
    before = process.memory_info().rss
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(hostile_gw.proxy_addr)
    port = raw_servers["chatty"].port
    sock.sendall(f"CONNECT chatty.test:{port} HTTP/1.1\r\nHost: chatty.test\r\n\r\n".encode())
    assert read_reply(sock).status == 200
    sock.sendall(b"go")
    sock.settimeout(1)
    peak = before
    end = time.monotonic() + 8
    while time.monotonic() < end:  # read slowly: about 200 KiB/s of the 1 MiB/s sent
        for _ in range(10):
            with contextlib.suppress(TimeoutError):
                sock.recv(2048)
            time.sleep(0.01)
        peak = max(peak, process.memory_info().rss)
    sock.close()
    grown = (peak - before) / 2**20
    assert grown < 24, f"one slow tunnel grew the gateway by {grown:.0f} MiB"


# --- the gateway itself as a destination ----------------------------------------------------


def test_the_gateways_own_sockets_are_refused(
    gateway_factory: GatewayFactory, net: Net, tmp_path: Any
) -> None:
    gw = gateway_factory([], defaultAction="Allow", privateDestinationExceptions=["127.0.0.0/8"])
    for port in (gw.proxy_port, gw.metrics_port):
        reply = connect(gw, f"127.0.0.1:{port}")
        assert (reply.status, reply.reason) == (403, "own_address"), port
        reply = connect(gw, f"127.0.0.2:{port}")  # listening on 127.0.0.1 only: not ours
        assert reply.reason != "own_address"
    reply = send_raw(
        gw, f"GET http://127.0.0.1:{gw.metrics_port}/metrics HTTP/1.1\r\n\r\n".encode()
    )
    assert (reply.status, reply.reason) == (403, "own_address")


# --- DNS that goes silent, deadlines --------------------------------------------------------


def test_a_silent_dns_server_never_hangs_a_second_client(
    gateway_factory: GatewayFactory, net: Net, dns: DnsServer
) -> None:
    """The first client gives up (working deadline) while the lookup is in flight; a second
    client for the same name must still get an answer, and SIGTERM must not wait."""
    gw = gateway_factory(
        defaultAction="Allow",
        extra_args=["--working-timeout", "1", "--dns-timeout", "2.5"],
    )

    def silent_then_answer(n: int) -> list[tuple[str, int]]:
        time.sleep(1.5)
        return [(net.up, 5)]

    dns.set("silent.test", silent_then_answer)
    first = proxy_socket(gw)
    first.sendall(b"CONNECT silent.test:443 HTTP/1.1\r\nHost: silent.test\r\n\r\n")
    time.sleep(0.2)
    second = proxy_socket(gw)
    second.sendall(b"CONNECT silent.test:443 HTTP/1.1\r\nHost: silent.test\r\n\r\n")
    started = time.monotonic()
    reply = read_reply(first, timeout=5)
    assert (reply.status, reply.reason) == (504, "gateway_timeout")
    reply = read_reply(second, timeout=5)
    assert reply.status in (200, 504)  # the shared lookup answered it, or its own deadline
    assert time.monotonic() - started < 4
    line = gw.wait_log(lambda r: r.get("reason") == "gateway_timeout")
    assert line["decision"] == "allow" and line["closed_by"] == "deadline"
    stop = time.monotonic()
    assert gw.stop() == 0
    assert time.monotonic() - stop < 3


def test_client_eof_while_deciding_is_bounded(
    gateway_factory: GatewayFactory, net: Net, dns: DnsServer
) -> None:
    gw = gateway_factory(defaultAction="Allow", extra_args=["--working-timeout", "1"])
    dns.set("slowname.test", lambda n: (time.sleep(3), [(net.up, 5)])[1])
    sock = proxy_socket(gw)
    sock.sendall(b"CONNECT slowname.test:443 HTTP/1.1\r\nHost: slowname.test\r\n\r\n")
    sock.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    reply = read_reply(sock, timeout=5)
    assert reply.status == 504
    assert time.monotonic() - started < 3


def test_dns_failure_is_logged_as_counted(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(defaultAction="Allow")
    reply = connect(gw, "nosuch.test:443")
    assert (reply.status, reply.reason) == (502, "dns_error")
    assert reply.reason_phrase == "Bad Gateway by tidegate: dns_error"
    line = gw.wait_log(lambda r: r.get("host") == "nosuch.test")
    assert (line["decision"], line["reason"]) == ("allow", "dns_error")
    counted = gw.metrics().get_value(
        "tidegate_requests_total", decision="allow", reason="dns_error"
    )
    assert counted == 1


# --- shutdown, SIGHUP, the admin port -------------------------------------------------------


def test_tunnels_cut_at_shutdown_are_logged(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(extra_args=["--shutdown-grace", "0.5", "--idle-timeout", "30"])
    tunnels = [connect(gw, f"echo.test:{net.echo.port}") for _ in range(3)]
    assert all(t.status == 200 for t in tunnels)
    assert gw.stop() == 0
    cut = [r for r in gw.log_lines() if r.get("closed_by") == "shutdown"]
    assert len(cut) == 3, gw.log_lines()


def test_sighup_reloads_and_does_not_stop(gateway_factory: GatewayFactory, net: Net) -> None:
    gw = gateway_factory(extra_args=["--reload-interval", "3600"])
    assert connect(gw, f"echo.test:{net.echo.port}").status == 200
    write_policy_dir(
        gw.workdir / "policies", net, [policy_doc("none", deny=[{"host": "echo.test"}])]
    )
    gw.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while connect(gw, f"echo.test:{net.echo.port}").status == 200:
        assert time.monotonic() < deadline, f"SIGHUP did not reload: {gw.stderr()}"
        time.sleep(0.1)
    assert gw.proc.poll() is None
    assert "SIGHUP" in gw.stderr()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x00\x05hello\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX-A\n: b\r\n\r\n",
    ],
)
def test_admin_port_garbage_gets_4xx_without_traceback(
    shared_gateway: GatewayProcess, garbage: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", shared_gateway.metrics_port), timeout=5) as sock:
        sock.sendall(garbage)
        reply = recv_until_eof(sock, timeout=3)
    assert reply.startswith(b"HTTP/1.") and reply[9:10] == b"4", reply[:100]
    time.sleep(0.3)
    assert "Traceback" not in shared_gateway.stderr()
