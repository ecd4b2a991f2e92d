"""Busy tunnels switch to bulk reads mid-stream; not a byte may be lost, reordered or
duplicated at the switch, in either direction, with backpressure on."""

from __future__ import annotations

import hashlib
import socket
import threading

from fixtures_net import GatewayProcess, Net, connect

SIZE = 6 * 1024 * 1024  # well past the 256 KiB switch, several 1 MiB reads


def pattern(n: int) -> bytes:
    block = hashlib.sha256(b"tidegate").digest() * 2048  # 64 KiB, not periodic in 256
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += counter.to_bytes(4, "big") + block[:65532]
        counter += 1
    return bytes(out[:n])


def test_upload_and_echo_survive_the_bulk_switch(shared_gateway: GatewayProcess, net: Net) -> None:
    payload = pattern(SIZE)
    reply = connect(shared_gateway, f"echo.test:{net.echo.port}")
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
        chunk = sock.recv(1 << 20)
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
    reply = connect(shared_gateway, f"tcp.test:{net.source.port}")
    assert reply.status == 200
    sock = reply.sock
    sock.sendall(b"%d\n" % SIZE)
    received = bytearray(reply.rest)
    sock.settimeout(20)
    while True:
        chunk = sock.recv(300_000)
        if not chunk:
            break
        received += chunk
    sock.close()
    block = bytes(range(256)) * 256
    expected = (block * (SIZE // len(block) + 1))[:SIZE]
    assert len(received) == SIZE
    assert received == expected
