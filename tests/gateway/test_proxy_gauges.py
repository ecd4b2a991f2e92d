"""The two gauges tell tunnels from connections: a client still sending its head is a
connection, not a tunnel."""

from __future__ import annotations

import socket

from fixtures_net import GatewayFactory, Net, connect, recv_exactly


def test_tunnels_and_connections_are_counted_apart(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    gw = gateway_factory()
    tunnel = connect(gw, f"echo.test:{net.echo.port}")
    tunnel.sock.sendall(b"ping")
    assert recv_exactly(tunnel.sock, 4) == b"ping"
    with socket.create_connection(gw.proxy_addr, timeout=5) as idle:
        idle.sendall(b"CONNECT echo.test")  # a head that is not finished yet
        gw.wait_metric("tidegate_connections_active", lambda v: v == 2)
        metrics = gw.metrics()
        assert metrics.get_value("tidegate_tunnels_active") == 1
    tunnel.sock.close()
    gw.wait_metric("tidegate_connections_active", lambda v: v == 0)
    assert gw.metrics().get_value("tidegate_tunnels_active") == 0
