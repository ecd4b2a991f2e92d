"""The proxy server: the listening sockets, the open connections, the sweeper, shutdown.

Why asyncio Protocols and no streams: an idle tunnel then costs two small protocol objects
and two transports, no coroutine frames or stream buffers, which is what keeps memory per
idle tunnel in single-digit KiB. The pieces:

- ``connection``: one client connection's state machine and its destination side;
- ``admission``: the decision from request head to checked addresses (no sockets);
- ``flow``: backpressure, bulk reads and the per-tunnel memory bound, shared by both sides;
- ``plainhttp``: plain-HTTP framing; ``access``: the access record.

Timeouts are enforced by one sweeper that walks the open connections once per
``sweep_interval`` rather than by a timer per connection (cheaper at 10k tunnels).

Shutdown, in order (``ProxyServer.shutdown``):
  1. readiness turns false and the listening socket closes: no new clients;
  2. connections still sending a request head are closed (they have no tunnel yet);
  3. open tunnels may finish on their own for up to ``shutdown_grace`` seconds;
  4. whatever is left is cut - each still gets its access-log line, ``closed_by: shutdown``
     - the access log is flushed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time

from . import access
from .addresses import IPAddress
from .connection import HEAD, LINGER, PREAMBLE, ClientConnection
from .flow import ReadPool
from .observe import AccessLog, Metrics
from .proxyproto import TrustedPeers
from .settings import Limits
from .state import GatewayState

log = logging.getLogger("tidegate.gateway.proxy")

#: After cutting the last tunnels at shutdown: how long their close events may take.
CUT_SETTLE_SECONDS = 1.0


class ProxyServer:
    """Owns the listening socket, the set of open connections and the sweeper."""

    def __init__(
        self,
        *,
        state: GatewayState,
        limits: Limits,
        metrics: Metrics,
        access_log: AccessLog,
        proxy_peers: TrustedPeers | None = None,
    ) -> None:
        self.state = state
        # PROXY protocol: connections from these peers must start with a header.
        self.proxy_peers = proxy_peers
        self.limits = limits
        self.metrics = metrics
        self.access_log = access_log
        self.connections: set[ClientConnection] = set()
        self.read_pool = ReadPool(limits.read_buffer)
        self.now = time.monotonic()
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        # port -> addresses bound on it (an unspecified address: every local address)
        self._own: dict[int, set[IPAddress]] = {}

    async def listen(self, host: str, port: int) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ClientConnection(self),
            host=host or None,
            port=port,
            backlog=4096,
            reuse_address=True,
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        bound = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in server.sockets]
        for bound_host, bound_port in bound:
            self.add_own_socket(bound_host, bound_port)
        return bound

    # --- the self-loop guard ------------------------------------------------------------------

    def add_own_socket(self, host: str, port: int) -> None:
        """Remember a socket this process listens on (the proxy's, the admin port's), so a
        destination that is one of them is refused instead of proxying to ourselves."""
        address = ipaddress.ip_address(host.split("%", 1)[0])
        self._own.setdefault(port, set()).add(_unmap(address))

    def is_own_socket(self, address: IPAddress, port: int) -> bool:
        bound = self._own.get(port)
        if not bound:
            return False
        address = _unmap(address)
        for own in bound:
            if own == address:
                return True
            if own.is_unspecified and (own.version == address.version or own.version == 6):
                if _is_local_address(address):
                    return True
        return False

    # --- timeouts and shutdown ----------------------------------------------------------------

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            self.now = loop.time()
            for conn in list(self.connections):
                conn.check_deadlines(self.now)

    async def shutdown(self, grace: float | None = None) -> None:
        grace = self.limits.shutdown_grace if grace is None else grace
        self.state.draining = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.phase in (PREAMBLE, HEAD, LINGER):
                conn.abort_quietly()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a set
            await asyncio.sleep(0.05)
        left = len(self.connections)
        if left:
            log.warning("shutdown grace of %.0fs is over: cutting %d tunnels", grace, left)
        for conn in list(self.connections):
            if conn.record.closed_by is None:
                conn.record.closed_by = access.CLOSED_SHUTDOWN
            conn.abort_quietly()
        settle = time.monotonic() + CUT_SETTLE_SECONDS
        while self.connections and time.monotonic() < settle:  # noqa: ASYNC110 - polls a set
            await asyncio.sleep(0.01)
        for conn in list(self.connections):  # a close event that never came: log it anyway
            conn.connection_lost(None)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            await server.wait_closed()
        self.access_log.flush()


def _unmap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=1024)
def _is_local_address(address: IPAddress) -> bool:
    """True when ``address`` belongs to this host: binding to it succeeds only then."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True
