"""A client that keeps sending an oversized head after the gateway answered still reads
the 431, and then a clean end of stream.

The gateway answers errors with a FIN and then drains what the client still sends for a
moment (lingering close) instead of closing with unread bytes. Closing with unread bytes
makes the kernel send a reset: on Linux the response already received stays readable, but
the reset replaces the clean end of stream (and elsewhere it can destroy the response).
So the check is the end of the stream: an EOF, never ECONNRESET. The slow-decision test
is the one that goes red with an immediate close (checked by replacing the linger).
"""

from __future__ import annotations

import socket
import time

from fixtures_net import DnsServer, GatewayFactory, GatewayProcess, Net


def read_to_clean_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything up to the end of stream; a reset on the way fails the test."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError as exc:
            raise AssertionError(f"reset instead of a clean close after {data[:80]!r}") from exc
        if not chunk:
            return data
        data += chunk


def test_oversized_head_streamed_in_pieces_still_gets_431(shared_gateway: GatewayProcess) -> None:
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    with socket.create_connection(shared_gateway.proxy_addr, timeout=5) as sock:
        sock.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\n" + filler * 40)
        time.sleep(0.3)  # the gateway has answered 431 by now; we have not read it
        sock.sendall(filler * 40)  # more of the head: arrives after the answer
        time.sleep(0.3)
        reply = read_to_clean_eof(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"X-Tidegate-Reason: header_too_large" in reply


def test_refusal_after_a_slow_decision_drains_the_unread_body(
    gateway_factory: GatewayFactory, net: Net, dns: DnsServer
) -> None:
    """The refusal comes while the client's body is still queued unread in the gateway's
    socket (reading is paused while it decides): an immediate close would reset."""
    gw = gateway_factory()

    def slow_blocked(n: int) -> list[tuple[str, int]]:
        time.sleep(0.5)  # the client keeps sending meanwhile
        return [(net.blocked, 5)]

    dns.set("ssrf.test", slow_blocked)
    with socket.create_connection(gw.proxy_addr, timeout=5) as sock:
        sock.sendall(
            b"POST http://ssrf.test/ HTTP/1.1\r\nHost: ssrf.test\r\nContent-Length: 400000\r\n\r\n"
        )
        sock.settimeout(5)
        sock.sendall(b"x" * 400_000)  # more than the gateway buffers while deciding
        reply = read_to_clean_eof(sock)
    assert reply.startswith(b"HTTP/1.1 403 Forbidden by tidegate: private_address"), reply[:200]
