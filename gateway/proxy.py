"""The proxy's connection handling: asyncio Protocols, no streams.

Why Protocols: an idle tunnel then costs two small protocol objects and two transports,
no coroutine frames or stream buffers, which is what keeps memory per idle tunnel in
single-digit KiB; bytes move from one transport's ``data_received`` straight into the
other's ``write``. Backpressure is transport flow control: when one side's write buffer
passes the high-water mark its ``pause_writing`` pauses reading on the other side, and
``resume_writing`` resumes it.

Life of a client connection (``ClientConnection.phase``):

  HEAD    read one request head (bounded in size, count and time)
  WORKING decide, resolve, check the address, dial (reading paused meanwhile)
  HELLO   CONNECT to port 443 with the SNI check on: hold the ClientHello until it
          names the CONNECT host, then forward it
  TUNNEL  splice bytes both ways; half-close is passed through; idle timeout applies
  LINGER  an error response was sent with a FIN; what the client still sends is read and
          dropped for LINGER_SECONDS, because closing with unread bytes would make the
          kernel answer with a reset that can destroy the response before it is read

Timeouts are enforced by one sweeper that walks the open connections once per
``sweep_interval`` rather than by a timer per connection (cheaper at 10k tunnels).

Shutdown, in order (``ProxyServer.shutdown``):
  1. readiness turns false and the listening socket closes: no new clients;
  2. connections still sending a request head are closed (they have no tunnel yet);
  3. open tunnels may finish on their own for up to ``shutdown_grace`` seconds;
  4. whatever is left is aborted, the access log is flushed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from typing import Any, cast
from urllib.parse import urlsplit

from .addresses import IPAddress
from .dns import ResolveError
from .engine import REASON_BAD_REQUEST, REASON_PRIVATE, Decision, Engine
from .hosts import Host, HostError, normalize_host, split_host_port
from .httphead import HeadError, RequestHead, find_head_end, parse_head
from .observe import AccessLog, Metrics
from .settings import Limits
from .state import GatewayState
from .tls import NotTLS, parse_client_hello

log = logging.getLogger("tidegate.gateway.proxy")

HEAD, WORKING, HELLO, TUNNEL, CLOSED, LINGER = range(6)
# After an error response: how long to keep draining what the client still sends.
LINGER_SECONDS = 1.0
_PHRASES = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class ProxyServer:
    """Owns the listening socket, the set of open connections and the sweeper."""

    def __init__(
        self, *, state: GatewayState, limits: Limits, metrics: Metrics, access_log: AccessLog
    ) -> None:
        self.state = state
        self.limits = limits
        self.metrics = metrics
        self.access_log = access_log
        self.connections: set[ClientConnection] = set()
        self.read_pool = ReadPool(limits.read_buffer)
        self.now = time.monotonic()
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

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
        return [s.getsockname()[:2] for s in server.sockets]

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
            if conn.phase in (HEAD, LINGER):
                conn.abort_quietly()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a set
            await asyncio.sleep(0.05)
        left = len(self.connections)
        if left:
            log.warning("shutdown grace of %.0fs is over: cutting %d tunnels", grace, left)
        for conn in list(self.connections):
            conn.abort_quietly()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            await server.wait_closed()
        self.access_log.flush()


class ReadPool:
    """One read buffer shared by every bulk reader on the loop (reads never interleave).

    uvloop keeps a reference to the unsent tail of a write rather than copying it, so when
    a write does not go out at once the buffer is left to it and a new one is allocated
    for the next read.
    """

    __slots__ = ("size", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.view = memoryview(bytearray(size))

    def handed_over(self) -> None:
        self.view = memoryview(bytearray(self.size))


class BulkReader(asyncio.BufferedProtocol):
    """Takes over reading one side of a tunnel once it has carried ``bulk_threshold`` bytes.

    Why two modes: uvloop hands a plain Protocol a new bytes object per read of at most
    256 KiB, cheap for the few small reads of a short tunnel; a BufferedProtocol reads up
    to ``read_buffer`` bytes into one shared buffer, which lifted bulk throughput by about
    a fifth, but its extra Python calls per read cost about 15% of new-tunnel rate when
    used from the first byte. So tunnels start plain and switch when they turn out busy.
    Every other event is passed on to the protocol it replaced.
    """

    __slots__ = ("client", "downstream", "owner")

    def __init__(
        self, owner: asyncio.Protocol, client: ClientConnection, *, downstream: bool
    ) -> None:
        self.owner = owner
        self.client = client
        self.downstream = downstream  # True: reads the destination, writes to the client

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.client.server.read_pool.view

    def buffer_updated(self, nbytes: int) -> None:
        client = self.client
        pool = client.server.read_pool
        client.last_active = client.server.now
        if self.downstream:
            client.bytes_down += nbytes
            sink = client.transport
        else:
            client.bytes_up += nbytes
            upstream = client.upstream
            sink = upstream.transport if upstream is not None else None
        if sink is None:
            return
        sink.write(pool.view[:nbytes])
        if sink.get_write_buffer_size():
            pool.handed_over()

    def eof_received(self) -> bool | None:
        return self.owner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


def _go_bulk(transport: asyncio.Transport, reader: BulkReader) -> None:
    """Swap the reading protocol; restarting the read makes uvloop use the new mode."""
    if transport.is_closing():
        return
    transport.pause_reading()
    transport.set_protocol(reader)
    transport.resume_reading()


class UpstreamConnection(asyncio.Protocol):
    """The destination side of a tunnel; every event is handed to its client side."""

    __slots__ = ("bulk", "client", "eof", "transport")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.bulk = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=self.client.server.limits.write_high_water)

    def data_received(self, data: bytes) -> None:
        self.client.from_upstream(data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.client.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.client.pause_client_reading()

    def resume_writing(self) -> None:
        self.client.resume_client_reading()


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "body_left",
        "buffer",
        "bulk",
        "bytes_down",
        "bytes_up",
        "client_ip",
        "deadline",
        "eof",
        "http_mode",
        "last_active",
        "peer",
        "phase",
        "reading_paused",
        "record",
        "server",
        "started",
        "transport",
        "upstream",
    )

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.phase = HEAD
        self.buffer = bytearray()
        self.started = time.monotonic()
        self.deadline = self.started + server.limits.header_timeout
        self.last_active = server.now
        self.bytes_up = 0
        self.bytes_down = 0
        self.eof = False
        self.bulk = False
        self.reading_paused = False
        self.http_mode = False
        self.body_left: int | None = None  # plain HTTP: request body bytes still to forward
        self.record: dict[str, Any] = {}
        self.peer = ""
        self.client_ip: IPAddress | None = None

    # --- asyncio.Protocol: client side ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        server = self.server
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        host = str(peer[0]).split("%", 1)[0]
        self.peer = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        self.client_ip = _client_address(host)
        transport.set_write_buffer_limits(high=server.limits.write_high_water)
        server.metrics.connections_active.inc()
        server.connections.add(self)
        if len(server.connections) > server.limits.max_connections or server.state.draining:
            server.metrics.rejected.labels("overload").inc()
            self.respond(503, "overloaded", "too many connections, try again later")
        elif server.state.engine is None:
            server.metrics.rejected.labels("not_ready").inc()
            self.respond(503, "not_ready", "no policy bundle loaded yet")

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == TUNNEL:
            self.last_active = self.server.now
            upstream = self.upstream
            if self.http_mode and self.body_left is not None:
                if self.body_left <= 0:
                    return  # nothing more belongs to the one forwarded request
                data = data[: self.body_left]
                self.body_left -= len(data)
            self.bytes_up += len(data)
            if upstream is not None and upstream.transport is not None:
                upstream.transport.write(data)
            if (
                self.bytes_up > self.server.limits.bulk_threshold
                and not self.http_mode
                and not self.bulk
                and self.transport is not None
            ):
                self.bulk = True
                _go_bulk(self.transport, BulkReader(self, self, downstream=False))
            return
        if phase == HEAD:
            self.buffer += data
            end = find_head_end(self.buffer)
            limit = self.server.limits.max_header_bytes
            if end < 0:
                if len(self.buffer) > limit:
                    self.reject_early(431, "header_too_large", "request head too large")
                return
            if end > limit:
                self.reject_early(431, "header_too_large", "request head too large")
                return
            head, rest = bytes(self.buffer[:end]), bytes(self.buffer[end:])
            self.buffer = bytearray(rest)
            self.phase = WORKING
            # Reading stays on while we decide and dial (pausing and resuming would cost
            # two epoll_ctl calls per tunnel); early bytes are buffered, within a bound.
            asyncio.get_running_loop().create_task(self.handle(head))
            return
        if phase == HELLO:
            self.buffer += data
            self.check_hello()
            return
        if phase == LINGER:
            return
        if phase == WORKING:
            self.buffer += data  # e.g. a ClientHello sent before our 200: keep, bounded
            limits = self.server.limits
            if len(self.buffer) > limits.max_header_bytes + limits.max_client_hello_bytes:
                self.pause_client_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.phase == WORKING:
            return True  # half-closed before the tunnel is up: passed on when it is
        if self.phase != TUNNEL:
            self.close()
            return False
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return False
        if upstream.eof or self.http_mode:
            if not self.http_mode:
                self.close()
                return False
            return True  # plain HTTP: keep reading the response
        if upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == CLOSED:
            return
        self.phase = CLOSED
        server = self.server
        server.connections.discard(self)
        server.metrics.connections_active.dec()
        if self.upstream is not None:
            server.metrics.tunnels_active.dec()
            if self.upstream.transport is not None:
                self.upstream.transport.close()
        self.finish()

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    # --- events from the upstream side ---------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self.last_active = self.server.now
        if self.http_mode and "status" not in self.record:
            self.record["status"] = _status_of(data)
        self.bytes_down += len(data)
        if self.transport is not None:
            self.transport.write(data)
        if self.bytes_down > self.server.limits.bulk_threshold and not self.http_mode:
            upstream = self.upstream
            if upstream is not None and upstream.transport is not None and not upstream.bulk:
                upstream.bulk = True
                _go_bulk(upstream.transport, BulkReader(upstream, self, downstream=True))

    def upstream_eof(self) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self.eof or self.http_mode or not transport.can_write_eof():
            transport.close()  # flushes what is buffered first
            return False
        transport.write_eof()
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def pause_client_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self.reading_paused and self.transport is not None and self.phase != WORKING:
            self.reading_paused = False
            self.transport.resume_reading()

    # --- timeouts --------------------------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        phase = self.phase
        if phase == HEAD and time.monotonic() > self.deadline:
            self.server.metrics.rejected.labels("header_timeout").inc()
            self.reject_early(408, "header_timeout", "request head not received in time")
        elif phase == HELLO and time.monotonic() > self.deadline:
            self.record.update(decision="deny", reason="tls_hello_timeout", status=200)
            self.abort_quietly()
        elif phase == LINGER and time.monotonic() > self.deadline:
            self.close()
        elif phase == TUNNEL and now - self.last_active > self.server.limits.idle_timeout:
            self.record.setdefault("closed_by", "idle_timeout")
            self.close()

    # --- the request ------------------------------------------------------------------------

    async def handle(self, raw_head: bytes) -> None:
        try:
            await self._handle(raw_head)
        except Exception:  # a bug must cost one connection, never the process
            log.exception("internal error handling a request from %s", self.peer)
            if self.phase != CLOSED:
                self.respond(502, "internal_error", "internal error")

    async def _handle(self, raw_head: bytes) -> None:
        record = self.record
        record["client"] = self.peer
        try:
            head = parse_head(raw_head, max_headers=self.server.limits.max_headers)
        except HeadError as exc:
            self.respond(exc.status, REASON_BAD_REQUEST, str(exc))
            return
        record["method"] = head.method
        try:
            host_text, port, plain = self._target(head)
            record["host"], record["port"] = host_text, port
            host = normalize_host(host_text)
        except (HostError, HeadError) as exc:
            status = exc.status if isinstance(exc, HeadError) else 400
            self.respond(status, REASON_BAD_REQUEST, str(exc))
            return
        record["host"] = host.name
        state = self.server.state
        engine = state.engine
        assert engine is not None and self.client_ip is not None
        decision = engine.decide(self.client_ip, host, port)
        record["decision"] = decision.verdict
        record["reason"] = decision.reason
        if decision.policy:
            record["policy"], record["rule"] = decision.policy, decision.rule
        if not decision.allowed:
            self.respond(403, decision.reason, decision.message, counted=decision)
            return
        addresses = await self._addresses(host, engine)
        if addresses is None:
            return
        if not await self._dial(addresses, port):
            return
        self.server.metrics.count_request(decision.verdict, decision.policy or "", decision.reason)
        if plain is not None:
            self._start_plain_http(head, plain)
            return
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(ESTABLISHED)
        record["status"] = 200
        if port == 443 and engine.gateway.require_sni_match and host.kind == "name":
            self.phase = HELLO
            self.deadline = time.monotonic() + self.server.limits.tls_hello_timeout
            if self.buffer:
                self.check_hello()
            if self.phase == HELLO:
                self.resume_client_reading()
            return
        self._start_tunnel()

    def _target(self, head: RequestHead) -> tuple[str, int, str | None]:
        """(host, port, origin-form path or None for CONNECT)."""
        if head.method == "CONNECT":
            host, port = split_host_port(head.target)
            return host, port, None
        url = urlsplit(head.target)
        if url.scheme.lower() != "http" or not url.netloc:
            if url.scheme.lower() == "https":
                raise HeadError("use CONNECT for https:// destinations")
            raise HeadError("not a proxy request: the target must be an absolute http:// URI")
        if "@" in url.netloc:
            raise HeadError("credentials in the request URI are not allowed")
        authority = url.netloc
        host_text, port = split_host_port(authority) if _has_port(authority) else (authority, 80)
        header_host = head.get_all("host")
        if len(header_host) > 1:
            raise HeadError("more than one Host header")
        if header_host:
            h_text = header_host[0]
            h_host, h_port = split_host_port(h_text) if _has_port(h_text) else (h_text, 80)
            if normalize_host(h_host) != normalize_host(host_text) or h_port != port:
                raise HeadError(f"Host header {h_text!r} does not match the request URI")
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        return host_text, port, path

    async def _addresses(self, host: Host, engine: Engine) -> list[IPAddress] | None:
        assert self.client_ip is not None
        if host.kind == "ip":
            assert host.ip is not None
            candidates: tuple[IPAddress, ...] = (host.ip,)
        else:
            resolver = self.server.state.resolver
            assert resolver is not None
            metrics = self.server.metrics
            try:
                found = resolver.cached(host.name)
                if found is None:
                    metrics.dns_cache_misses.inc()
                    async with asyncio.timeout(self.server.limits.dns_timeout):
                        found = await resolver.resolve(host.name)
                else:
                    metrics.dns_cache_hits.inc()
            except TimeoutError:
                self.respond(504, "dns_timeout", f"DNS lookup of {host.name} timed out")
                return None
            except ResolveError as exc:
                status = 504 if exc.timeout else 502
                self.respond(status, "dns_error", str(exc))
                return None
            candidates = found
        allowed = []
        blocked = ""
        for address in candidates:
            why = engine.destination_blocked(address, self.client_ip)
            if why is None:
                allowed.append(address)
            else:
                blocked = blocked or f"{address} is {why}"
        if not allowed:
            decision = Decision("deny", REASON_PRIVATE, f"destination {blocked}")
            self.record.update(decision="deny", reason=REASON_PRIVATE)
            self.record.pop("policy", None)
            self.record.pop("rule", None)
            self.respond(403, REASON_PRIVATE, decision.message, counted=decision)
            return None
        return allowed

    async def _dial(self, addresses: list[IPAddress], port: int) -> bool:
        loop = asyncio.get_running_loop()
        limits = self.server.limits
        # The answer reflects the last failure: 504 for a timeout, 502 for a refusal.
        failure = (502, "upstream_unreachable", "no address")
        budget_end = time.monotonic() + 2 * limits.connect_timeout
        for address in addresses:
            remaining = min(limits.connect_timeout, budget_end - time.monotonic())
            if remaining <= 0:
                failure = (504, "upstream_timeout", "connect budget used up: " + failure[2])
                break
            started = time.monotonic()
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            try:
                async with asyncio.timeout(remaining):  # no extra task, unlike wait_for
                    _, upstream = await loop.create_connection(
                        lambda: UpstreamConnection(self), str(address), port, family=family
                    )
            except TimeoutError:
                message = f"connect to {_hostport(address, port)} timed out"
                failure = (504, "upstream_timeout", message)
                continue
            except OSError as exc:
                message = f"connect to {_hostport(address, port)}: {exc.strerror or exc}"
                failure = (502, "upstream_unreachable", message)
                continue
            self.server.metrics.upstream_connect.observe(time.monotonic() - started)
            if self.phase == CLOSED:  # the client left while we dialled
                if upstream.transport is not None:
                    upstream.transport.close()
                return False
            self.upstream = upstream
            self.server.metrics.tunnels_active.inc()
            self.record["upstream"] = _hostport(address, port)
            return True
        self.respond(*failure)
        return False

    def _start_tunnel(self) -> None:
        self.phase = TUNNEL
        self.last_active = self.server.now
        if self.buffer:
            early = bytes(self.buffer)
            self.buffer = bytearray()
            self.data_received(early)
        else:
            self.buffer = bytearray()
        self.resume_client_reading()
        if self.eof:  # the client half-closed before the tunnel was up
            self.eof_received()

    def check_hello(self) -> None:
        try:
            result = parse_client_hello(
                bytes(self.buffer), limit=self.server.limits.max_client_hello_bytes
            )
        except NotTLS as exc:
            self._refuse_sni(f"not a TLS ClientHello on port 443: {exc}")
            return
        if not result.complete:
            return
        expected = self.record.get("host")
        if result.server_name is None:
            self._refuse_sni("the TLS ClientHello names no server (SNI)")
            return
        try:
            sni = normalize_host(result.server_name).name
        except HostError:
            sni = result.server_name
        if sni != expected:
            self.record["sni"] = sni
            self._refuse_sni(f"TLS SNI {sni!r} differs from the CONNECT host {expected!r}")
            return
        self._start_tunnel()

    def _refuse_sni(self, message: str) -> None:
        # The 200 is already sent, so the refusal is a closed connection, logged and counted.
        self.record.update(decision="deny", reason="sni_mismatch", message=message)
        self.record.pop("policy", None)
        self.record.pop("rule", None)
        self.server.metrics.count_request("deny", "", "sni_mismatch")
        self.abort_quietly()

    def _start_plain_http(self, head: RequestHead, path: str) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        connection_tokens = {
            t.strip().lower() for v in head.get_all("connection") for t in v.split(",")
        }
        lines = [f"{head.method} {path} HTTP/1.1"]
        has_host = False
        for name, value in head.headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or lowered in connection_tokens:
                continue
            has_host = has_host or lowered == "host"
            lines.append(f"{name}: {value}")
        if not has_host:
            lines.append(f"Host: {_host_header(self.record['host'], self.record['port'])}")
        lines.append("Via: 1.1 tidegate")
        lines.append("Connection: close")
        self.upstream.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        length = head.get("content-length")
        chunked = head.get("transfer-encoding") is not None
        self.body_left = None if chunked else int(length or 0)
        self.http_mode = True
        self._start_tunnel()

    # --- responses and the end ---------------------------------------------------------------

    def reject_early(self, status: int, reason: str, message: str) -> None:
        self.record.update(client=self.peer, decision="deny", reason=reason)
        self.respond(status, reason, message)

    def respond(
        self, status: int, reason: str, message: str, *, counted: Decision | None = None
    ) -> None:
        transport = self.transport
        self.record.setdefault("decision", "deny")
        self.record.setdefault("reason", reason)
        self.record["status"] = status
        self.record["message"] = message
        if counted is not None:
            self.server.metrics.count_request(counted.verdict, counted.policy or "", counted.reason)
        else:
            self.server.metrics.count_request("deny", "", reason)
        if transport is None or transport.is_closing():
            return
        body = (message + "\n").encode("utf-8", "replace")
        transport.write(
            f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-Tidegate-Reason: {reason}\r\n"
            f"Connection: close\r\n\r\n".encode("latin-1")
            + body
        )
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        if self.phase == CLOSED or not transport.can_write_eof():
            transport.close()
            return
        self.phase = LINGER
        self.deadline = time.monotonic() + LINGER_SECONDS
        self.buffer = bytearray()
        transport.write_eof()
        self.resume_client_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort_quietly(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()

    def finish(self) -> None:
        record = self.record
        if not record:
            if not self.buffer:
                return  # connected and left without a byte: a health check, not a request
            record.update(client=self.peer, decision="deny", reason=REASON_BAD_REQUEST)
        record.setdefault("client", self.peer)
        record["bytes_up"] = self.bytes_up
        record["bytes_down"] = self.bytes_down
        record["duration_ms"] = round((time.monotonic() - self.started) * 1000, 1)
        metrics = self.server.metrics
        if self.bytes_up:
            metrics.bytes_up.inc(self.bytes_up)
        if self.bytes_down:
            metrics.bytes_down.inc(self.bytes_down)
        self.server.access_log.write(record)
        self.buffer = bytearray()


@functools.lru_cache(maxsize=4096)  # clients are few, connections many
def _client_address(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def _has_port(authority: str) -> bool:
    if authority.startswith("["):
        return "]:" in authority
    return ":" in authority


def _hostport(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _host_header(host: str, port: int) -> str:
    text = f"[{host}]" if ":" in host else host
    return text if port == 80 else f"{text}:{port}"


def _status_of(data: bytes) -> int | None:
    if data[:5] == b"HTTP/" and len(data) >= 12 and data[9:12].isdigit():
        return int(data[9:12])
    return None
