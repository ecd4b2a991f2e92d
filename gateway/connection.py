"""One client connection's state machine, and the destination side of its tunnel.

The decision itself is in ``admission.admit`` (no sockets), byte moving and backpressure
in ``flow.Side``, plain-HTTP framing in ``plainhttp``; this module strings them together.

Life of a client connection (``ClientConnection.phase``), each phase with a deadline
checked by the server's sweeper:

  PREAMBLE only for a peer in ``--proxy-protocol-from`` (the load balancer): read the
          PROXY protocol header naming the real client (``proxyproto``), within the same
          ``header_timeout`` as the request head that follows it
  HEAD    read one request head (bounded in size, count and ``header_timeout``)
  WORKING admit (decide, resolve, check the address), dial; bounded by ``working_timeout``
          (a client EOF here is remembered and passed on once the tunnel is up)
  HELLO   CONNECT to port 443 with the SNI check on: hold the ClientHello until it
          names the CONNECT host, then forward it (``tls_hello_timeout``)
  TUNNEL  splice bytes both ways; half-close is passed through (``idle_timeout``)
  LINGER  an error response was sent with a FIN; what the client still sends is read and
          dropped for LINGER_SECONDS, because closing with unread bytes would make the
          kernel answer with a reset that can destroy the response before it is read

Nothing the destination sends reaches the client before the tunnel is up: bytes from a
server that speaks first (an SSH banner) are held, bounded, until after the ``200``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, cast

from . import access
from .access import AccessRecord
from .addresses import IPAddress
from .admission import Refusal, Tunnel, admit
from .dial import DialFailure, dial, hostport
from .engine import REASON_BAD_REQUEST
from .flow import ReadPool, Side
from .hosts import HostError, normalize_host
from .httphead import HeadError, find_head_end
from .identity import ClientIdentity
from .plainhttp import CHUNKED, BodyError, ChunkedBody, LengthBody
from .proxyproto import ProxyHeaderError, looks_like_proxy_header, parse_proxy_header
from .tls import NotTLS, parse_client_hello

if TYPE_CHECKING:
    from .proxy import ProxyServer

log = logging.getLogger("tidegate.gateway.proxy")

HEAD, WORKING, HELLO, TUNNEL, CLOSED, LINGER, PREAMBLE = range(7)
# After an error response: how long to keep draining what the client still sends.
LINGER_SECONDS = 1.0
#: Longest reason phrase written in a refusal's status line.
MAX_PHRASE = 160
REASON_SNI = "sni_mismatch"
REASON_TIMEOUT = "gateway_timeout"
REASON_PROXY_HEADER = "proxy_protocol"  # a trusted peer sent no valid PROXY header
REASON_PROXY_TIMEOUT = "proxy_protocol_timeout"
REASON_PROXY_UNEXPECTED = "proxy_protocol_unexpected"  # a header from a peer not trusted
_PHRASES = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def status_line(status: int, reason: str, policy: str | None, rule: str | None) -> str:
    """``HTTP/1.1 403 Forbidden by tidegate: deny_rule (ci/ci-runners deny[0])``: the
    reason goes where every client shows it, in its own error message. Only the reason
    code and, for a 403, the policy's name and rule go in (no request input), printable
    ASCII, at most MAX_PHRASE characters."""
    phrase = f"{_PHRASES.get(status, 'Error')} by tidegate: {reason}"
    if status == 403 and policy:
        phrase += f" ({policy} {rule})" if rule else f" ({policy})"
    safe = "".join(c if " " <= c <= "~" else "?" for c in phrase)[:MAX_PHRASE]
    return f"HTTP/1.1 {status} {safe}"


class UpstreamConnection(Side):
    """The destination side of a tunnel; its events are handed to its client side."""

    __slots__ = ("client", "eof", "lost")

    def __init__(self, client: ClientConnection) -> None:
        super().__init__()
        self.client = client
        self.eof = False
        self.lost = False

    def other(self) -> Side | None:
        return self.client

    def sink(self) -> asyncio.Transport | None:
        return self.client.transport

    def carried(self, nbytes: int) -> None:
        client = self.client
        client.bytes_down += nbytes
        client.last_active = client.server.now

    def pool(self) -> ReadPool:
        return self.client.server.read_pool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=self.client.server.limits.write_high_water)

    def data_received(self, data: bytes) -> None:
        self.client.from_upstream(data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.client.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.client.upstream_lost(exc)


class ClientConnection(Side):
    __slots__ = (
        "body",
        "buffer",
        "bytes_down",
        "bytes_up",
        "client_ip",
        "deadline",
        "eof",
        "held",
        "identity",
        "last_active",
        "peer",
        "phase",
        "plain",
        "record",
        "server",
        "started",
        "task",
        "upstream",
    )

    def __init__(self, server: ProxyServer) -> None:
        super().__init__()
        self.server = server
        self.upstream: UpstreamConnection | None = None
        self.phase = HEAD
        self.buffer = bytearray()
        self.held: bytearray | None = None  # destination bytes waiting for the tunnel
        self.started = time.monotonic()
        self.deadline = self.started + server.limits.header_timeout
        self.last_active = server.now
        self.bytes_up = 0
        self.bytes_down = 0
        self.eof = False
        self.plain = False  # plain-HTTP mode: one request forwarded, then only its body
        self.body: LengthBody | ChunkedBody | None = None
        self.record = AccessRecord()
        self.peer = ""
        self.client_ip: IPAddress | None = None
        self.identity: ClientIdentity | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def client_namespace(self) -> str:
        """The client pod's namespace (a bounded metric label), "" for other clients."""
        identity = self.identity
        return identity.namespace if identity is not None else ""

    # --- flow.Side ---------------------------------------------------------------------------

    def other(self) -> Side | None:
        return self.upstream

    def sink(self) -> asyncio.Transport | None:
        upstream = self.upstream
        return upstream.transport if upstream is not None else None

    def carried(self, nbytes: int) -> None:
        self.bytes_up += nbytes
        self.last_active = self.server.now

    def pool(self) -> ReadPool:
        return self.server.read_pool

    def may_resume(self) -> bool:
        return self.phase != WORKING

    # --- asyncio.Protocol: client side -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        server = self.server
        transport.set_write_buffer_limits(high=server.limits.write_high_water)
        server.metrics.connections_active.inc()
        server.connections.add(self)
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        self.client_known(str(peer[0]), int(peer[1]))
        trusted = server.proxy_peers
        if trusted is not None and self.client_ip is not None and trusted.trusts(self.client_ip):
            self.phase = PREAMBLE  # the load balancer: the real client is in its header
            self.record.via = self.peer
        if len(server.connections) > server.limits.max_connections or server.state.draining:
            server.metrics.rejected.labels("overload").inc()
            self.respond(503, "overloaded", "too many connections, try again later")
        elif not server.state.serving:
            server.metrics.rejected.labels("not_ready").inc()
            self.respond(503, "not_ready", "no policy bundle loaded yet")

    def client_known(self, host: str, port: int) -> None:
        """The client's address is established: everything after this judges it.

        Called once from ``connection_made`` with the socket's peer; a connection whose
        real client address arrives later (a PROXY protocol header) calls it again before
        the request head is admitted."""
        host = host.split("%", 1)[0]
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.client_ip = _client_address(host)
        self.record.client = self.peer

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == TUNNEL:
            self.last_active = self.server.now
            if self.body is not None:
                self.forward_body(data)
                return
            self.bytes_up += len(data)
            upstream = self.upstream
            if upstream is not None and upstream.transport is not None:
                upstream.transport.write(data)
            if self.bytes_up > self.server.limits.bulk_threshold and not self.bulk:
                self.go_bulk()
            return
        if phase == HEAD:
            if not self.buffer and looks_like_proxy_header(data):
                self.refuse_proxy_header(400, REASON_PROXY_UNEXPECTED, self._unexpected_header())
                return
            self.buffer += data
            limit = self.server.limits.max_header_bytes
            try:
                end = find_head_end(self.buffer)
            except HeadError as exc:
                self.reject_early(exc.status, REASON_BAD_REQUEST, str(exc))
                return
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
            self.deadline = time.monotonic() + self.server.limits.working_timeout
            # Reading stays on while we decide and dial (pausing and resuming would cost
            # two epoll_ctl calls per tunnel); early bytes are buffered, within a bound.
            self.task = asyncio.get_running_loop().create_task(self.handle(head))
            return
        if phase == HELLO:
            self.buffer += data
            self.check_hello()
            return
        if phase == PREAMBLE:
            self.read_proxy_header(data)
            return
        if phase == WORKING:
            self.buffer += data  # e.g. a ClientHello sent before our 200: keep, bounded
            limits = self.server.limits
            if len(self.buffer) > limits.max_header_bytes + limits.max_client_hello_bytes:
                self.pause_reading()
        # LINGER, CLOSED: read and dropped

    # --- PROXY protocol ----------------------------------------------------------------------

    def read_proxy_header(self, data: bytes) -> None:
        """The peer is a trusted load balancer: the stream must start with a valid header,
        and the address in it is the client from here on (bytes after it are the request)."""
        self.buffer += data
        limit = self.server.limits.max_proxy_header_bytes
        try:
            header = parse_proxy_header(self.buffer, max_v2_bytes=limit)
        except ProxyHeaderError as exc:
            message = f"no valid PROXY protocol header from the load balancer {self.peer}: {exc}"
            self.refuse_proxy_header(400, REASON_PROXY_HEADER, message)
            return
        if header is None:
            return
        rest = bytes(self.buffer[header.length :])
        self.buffer = bytearray()
        if header.source is not None:  # None: LOCAL/UNKNOWN, the balancer itself
            self.client_known(str(header.source[0]), header.source[1])
        self.phase = HEAD
        if rest:
            self.data_received(rest)

    def _unexpected_header(self) -> str:
        if self.server.proxy_peers is None:
            return "a PROXY protocol header, but this gateway runs without --proxy-protocol"
        return (
            f"a PROXY protocol header from {self.peer}, which is not in --proxy-protocol-from:"
            " only the load balancer may name a client address"
        )

    def refuse_proxy_header(self, status: int, reason: str, message: str) -> None:
        if reason != REASON_PROXY_UNEXPECTED:  # the balancer misbehaves: say so on stderr too
            log.warning("refused a connection from %s: %s", self.peer, message)
        self.server.metrics.rejected.labels(reason).inc()
        self.reject_early(status, reason, message)

    def forward_body(self, data: bytes) -> None:
        """Plain HTTP: forward only what belongs to the one request's body."""
        assert self.body is not None
        try:
            out = self.body.feed(data)
        except BodyError as exc:
            self.record.refused(REASON_BAD_REQUEST, keep_policy=True)
            self.record.message = str(exc)
            self.server.metrics.count_request("deny", "", REASON_BAD_REQUEST)
            self.abort_quietly()
            return
        if out:
            self.bytes_up += len(out)
            upstream = self.upstream
            if upstream is not None and upstream.transport is not None:
                upstream.transport.write(out)

    def eof_received(self) -> bool:
        self.eof = True
        if self.phase == WORKING:
            return True  # half-closed before the tunnel is up: passed on when it is
        if self.phase != TUNNEL:
            if self.phase == PREAMBLE and self.buffer:  # logged as what it is
                self.record.refused(REASON_PROXY_HEADER)
                self.record.message = "the load balancer closed inside the PROXY protocol header"
                self.server.metrics.rejected.labels(REASON_PROXY_HEADER).inc()
            self.close()
            return False
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return False
        if self.plain:
            if self.body is not None and not self.body.done:
                self.close()  # the request body can never be completed
                return False
            return True  # keep reading the response
        if upstream.eof:
            self.close()
            return False
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
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left while we decided or dialled
        if self.upstream is not None:
            server.metrics.tunnels_active.dec()
            if self.upstream.transport is not None:
                self.upstream.transport.close()
        self.finish()

    # --- events from the upstream side -------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self.last_active = self.server.now
        if self.phase != TUNNEL:  # nothing reaches the client before the 200 and the SNI check
            held = self.held if self.held is not None else bytearray()
            held += data
            self.held = held
            if len(held) > self.server.limits.write_high_water and self.upstream is not None:
                self.upstream.pause_reading()
            return
        if self.plain and self.record.status is None:
            self.record.status = _status_of(data)
        self.bytes_down += len(data)
        if self.transport is not None:
            self.transport.write(data)
        if self.bytes_down > self.server.limits.bulk_threshold and not self.plain:
            upstream = self.upstream
            if upstream is not None and not upstream.bulk:
                upstream.go_bulk()

    def upstream_eof(self) -> bool:
        if self.phase != TUNNEL:
            return True  # passed on after the held bytes, once the tunnel is up
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self.eof or self.plain or not transport.can_write_eof():
            transport.close()  # flushes what is buffered first
            return False
        transport.write_eof()
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.phase == WORKING:
            return  # the tunnel start deals with it, after the 200
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- timeouts ----------------------------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        phase = self.phase
        if phase == TUNNEL:
            if now - self.last_active > self.server.limits.idle_timeout:
                if self.record.closed_by is None:
                    self.record.closed_by = access.CLOSED_IDLE
                self.close()
            return
        if time.monotonic() <= self.deadline:
            return
        if phase == PREAMBLE:
            message = f"no PROXY protocol header from the load balancer {self.peer} in time"
            self.refuse_proxy_header(408, REASON_PROXY_TIMEOUT, message)
        elif phase == HEAD:
            self.server.metrics.rejected.labels("header_timeout").inc()
            self.reject_early(408, "header_timeout", "request head not received in time")
        elif phase == WORKING:
            if self.task is not None:
                self.task.cancel()
            self.record.closed_by = access.CLOSED_DEADLINE
            self.respond(504, REASON_TIMEOUT, "no decision or connection in time")
        elif phase == HELLO:
            self.record.refused("tls_hello_timeout")
            self.record.closed_by = access.CLOSED_DEADLINE
            self.abort_quietly()
        elif phase == LINGER:
            self.close()

    # --- the request -------------------------------------------------------------------------

    async def handle(self, raw_head: bytes) -> None:
        try:
            await self._handle(raw_head)
            self.task = None  # a finished task must not ride along with an idle tunnel
        except asyncio.CancelledError:
            pass  # the client left, or the WORKING deadline passed (already answered)
        except Exception:  # a bug must cost one connection, never the process
            log.exception("internal error handling a request from %s", self.peer)
            if self.phase not in (CLOSED, LINGER):
                self.respond(502, "internal_error", "internal error")

    async def _handle(self, raw_head: bytes) -> None:
        server = self.server
        engine, resolver = server.state.engine, server.state.resolver
        assert engine is not None and resolver is not None and self.client_ip is not None
        # Who the client is: looked up once, at decision time (after any PROXY header).
        identity = self.identity = server.state.identities.lookup(self.client_ip)
        record = self.record
        record.identity = kind = engine.client_kind(self.client_ip, identity)
        server.metrics.clients.labels(kind).inc()
        if identity is not None and identity.kind == "pod":
            record.client_namespace, record.client_pod = identity.namespace, identity.name
        result = await admit(
            raw_head,
            client=self.client_ip,
            engine=engine,
            resolver=resolver,
            limits=server.limits,
            metrics=server.metrics,
            record=self.record,
            own_socket=server.is_own_socket,
            identity=identity,
        )
        if self.phase != WORKING:
            return
        if isinstance(result, Refusal):
            self.respond(result.status, result.reason, result.message)
            return
        if not await self._dial(result):
            return
        decision = result.decision
        server.metrics.count_request(
            decision.verdict, decision.policy or "", decision.reason, self.client_namespace
        )
        if result.plain is not None:
            self._start_plain_http(result)
            return
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(ESTABLISHED)
        self.record.status = 200
        if result.sni_check:
            self.phase = HELLO
            self.deadline = time.monotonic() + server.limits.tls_hello_timeout
            if self.buffer:
                self.check_hello()
            if self.phase == HELLO:
                self.resume_reading()
            return
        self._start_tunnel()

    async def _dial(self, tunnel: Tunnel) -> bool:
        server = self.server
        result = await dial(
            tunnel.addresses,
            tunnel.port,
            factory=lambda: UpstreamConnection(self),
            limits=server.limits,
            metrics=server.metrics,
        )
        if isinstance(result, DialFailure):
            self.respond(result.status, result.reason, result.message)
            return False
        upstream, address = result
        if self.phase != WORKING:  # the client left (or the deadline passed) meanwhile
            if upstream.transport is not None:
                upstream.transport.close()
            return False
        self.upstream = upstream
        server.metrics.tunnels_active.inc()
        self.record.upstream = hostport(address, tunnel.port)
        return True

    def _start_tunnel(self) -> None:
        self.phase = TUNNEL
        self.last_active = self.server.now
        held, self.held = self.held, None
        upstream = self.upstream
        if held:
            self.from_upstream(bytes(held))
        if upstream is not None:
            upstream.resume_reading()
        if self.buffer:
            early = bytes(self.buffer)
            self.buffer = bytearray()
            self.data_received(early)
        else:
            self.buffer = bytearray()
        self.resume_reading()
        if upstream is not None and upstream.eof:  # the destination closed before the 200
            self.upstream_eof()
        if upstream is not None and upstream.lost:
            self.close()
            return
        if self.eof and self.phase == TUNNEL:  # the client half-closed before the tunnel was up
            self.eof_received()

    def _start_plain_http(self, tunnel: Tunnel) -> None:
        assert tunnel.plain is not None
        upstream = self.upstream
        assert upstream is not None and upstream.transport is not None
        upstream.transport.write(tunnel.plain.head)
        framing = tunnel.plain.framing
        limit = self.server.limits.max_header_bytes
        if framing == CHUNKED:
            self.body = ChunkedBody(max_trailer=limit)
        else:
            self.body = LengthBody(framing)
        self.plain = True
        self._start_tunnel()

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
        expected = self.record.host
        if result.server_name is None:
            self._refuse_sni("the TLS ClientHello names no server (SNI)")
            return
        try:
            sni = normalize_host(result.server_name).name
        except HostError:
            sni = result.server_name
        if sni != expected:
            self.record.sni = sni
            self._refuse_sni(f"TLS SNI {sni!r} differs from the CONNECT host {expected!r}")
            return
        self._start_tunnel()

    def _refuse_sni(self, message: str) -> None:
        # The 200 is already sent, so the refusal is a closed connection, logged and counted.
        self.record.refused(REASON_SNI)
        self.record.message = message
        self.server.metrics.count_request("deny", "", REASON_SNI, self.client_namespace)
        self.abort_quietly()

    # --- responses and the end ---------------------------------------------------------------

    def reject_early(self, status: int, reason: str, message: str) -> None:
        self.record.refused(reason)
        self.respond(status, reason, message)

    def respond(self, status: int, reason: str, message: str) -> None:
        """Answer with an error and close. The log line and the metric carry the same
        (decision, policy, reason): the decision already made stays (a DNS failure after
        an allow is ``allow`` / ``dns_error``), a refusal before any decision is a deny."""
        transport = self.transport
        record = self.record
        if record.decision is None:
            record.refused(reason)
        record.reason = reason
        record.status = status
        record.message = message
        self.server.metrics.count_request(
            record.decision or "deny", record.policy or "", reason, self.client_namespace
        )
        if transport is None or transport.is_closing():
            return
        body = (message + "\n").encode("utf-8", "replace")
        transport.write(
            f"{status_line(status, reason, record.policy, record.rule)}\r\n"
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
        self.resume_reading()

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
        if not record.started:
            if not self.buffer:
                return  # connected and left without a byte: a health check, not a request
            record.refused(REASON_BAD_REQUEST)
        record.bytes_up = self.bytes_up
        record.bytes_down = self.bytes_down
        record.duration_ms = round((time.monotonic() - self.started) * 1000, 1)
        metrics = self.server.metrics
        if self.bytes_up:
            metrics.bytes_up.inc(self.bytes_up)
        if self.bytes_down:
            metrics.bytes_down.inc(self.bytes_down)
        self.server.access_log.write(record.to_json())
        self.buffer = bytearray()
        self.held = None


@functools.lru_cache(maxsize=4096)  # clients are few, connections many
def _client_address(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def _status_of(data: bytes) -> int | None:
    if data[:5] == b"HTTP/" and len(data) >= 12 and data[9:12].isdigit():
        return int(data[9:12])
    return None
