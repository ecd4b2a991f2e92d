"""Busy tunnels switch to bulk reads mid-stream; not a byte may be lost, reordered or
duplicated at the switch, in either direction, with backpressure on.

The client's receive buffer is kept small so the gateway's writes to it often cannot go
out at once (the case where a shared read buffer must not be reused while a write still
refers to it), and the data is :func:`counting_pattern`, so any reordering shows."""

from __future__ import annotations

import hashlib
import socket
import threading

from fixtures_net import GatewayProcess, Net, Reply, counting_pattern, read_reply

SIZE = 6 * 1024 * 1024  # well past the 256 KiB switch, several 1 MiB reads


def slow_connect(gw: GatewayProcess, target: str) -> Reply:
    """CONNECT from a socket with a small receive buffer (set before the handshake)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(5)
    sock.connect(gw.proxy_addr)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    return read_reply(sock)


def test_upload_and_echo_survive_the_bulk_switch(shared_gateway: GatewayProcess, net: Net) -> None:
    payload = counting_pattern(SIZE)
    reply = slow_connect(shared_gateway, f"echo.test:{net.echo.port}")
    assert reply.status == 200
    sock = reply.sock
    received = bytearray(reply.rest)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for i in range(0, len(payload), 100_000):  # uneven pieces
                sock.sendall(payload[i : i + 100_000])
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    sock.settimeout(20)
    while True:
        chunk = sock.recv(16 * 1024)
        if not chunk:
            break
        received += chunk
    sender.join(20)
    sock.close()
    assert not errors
    trailer = b"bye %d\n" % SIZE
    assert bytes(received[-len(trailer) :]) == trailer
    body = bytes(received[: -len(trailer)])
    assert len(body) == SIZE
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_download_survives_the_bulk_switch(shared_gateway: GatewayProcess, net: Net) -> None:
    reply = slow_connect(shared_gateway, f"tcp.test:{net.source.port}")
    assert reply.status == 200
    sock = reply.sock
    sock.sendall(b"%d\n" % SIZE)
    received = bytearray(reply.rest)
    sock.settimeout(20)
    while True:
        chunk = sock.recv(16 * 1024)
        if not chunk:
            break
        received += chunk
    sock.close()
    assert len(received) == SIZE
    assert received == counting_pattern(SIZE)
