"""A client that keeps sending an oversized head after the gateway answered still reads
the 431.

The gateway answers errors with a FIN and then drains what the client still sends for a
moment (lingering close) instead of closing with unread bytes, which elsewhere can turn
into a reset that destroys the response. (Linux on loopback happens to keep the response
readable even after a reset, so this checks the outcome, not the mechanism.)
"""

from __future__ import annotations

import socket
import time

from fixtures_net import GatewayProcess, recv_until_eof


def test_oversized_head_streamed_in_pieces_still_gets_431(shared_gateway: GatewayProcess) -> None:
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    with socket.create_connection(shared_gateway.proxy_addr, timeout=5) as sock:
        sock.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\n" + filler * 40)
        time.sleep(0.3)  # the gateway has answered 431 by now; we have not read it
        try:
            sock.sendall(filler * 40)  # more of the head: arrives after the answer
        except (BrokenPipeError, ConnectionResetError):
            pass
        time.sleep(0.3)
        reply = recv_until_eof(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"X-Tidegate-Reason: header_too_large" in reply
