"""Network fixtures for the gateway's integration tests: everything real, all on loopback.

- ``loopback_guard`` (autouse for tests under ``tests/gateway`` and for any test using these
  fixtures): the test process refuses to connect or send to anything outside 127.0.0.0/8
  and ::1. The gateway subprocess is confined structurally: its only DNS server is
  :class:`DnsServer` on 127.0.0.1, which refuses to hand out non-loopback answers, and
  every gateway's access log is checked at teardown for a non-loopback upstream.
- ``net`` (session): a :class:`Net` - the DNS server, a trustme CA, a TLS upstream
  (``allowed.test``, ``other.test``, ...) on 127.X.Y.1:443, a plain HTTP upstream that
  echoes the request head on 127.X.Y.1:80, TCP upstreams (refusing, resetting, echoing
  with half-close), and a "blocked" listener on 127.X.Y.2 that must never be reached.
  ``X.Y`` is random per session, so parallel sessions do not collide on ports 80/443.
- ``gateway_factory``: start ``tidegate gateway`` subprocesses (always stopped at teardown).
- ``shared_gateway`` (session): one gateway with :func:`standard_policies` for the many
  tests that only read.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
TIDEGATE = str(Path(sys.executable).with_name("tidegate"))
API = "tidegate.io/v1alpha1"
#: Small limits so timeouts are observable in a quick test run.
FAST_LIMITS = (
    "--header-timeout",
    "1",
    "--sweep-interval",
    "0.2",
    "--idle-timeout",
    "3",
    "--shutdown-grace",
    "3",
    "--reload-interval",
    "0.2",
    "--connect-timeout",
    "2",
    "--dns-timeout",
    "2",
    "--tls-hello-timeout",
    "2",
)
_NET_FIXTURES = {"net", "dns", "gateway_factory", "shared_gateway"}


# --- the loopback guard ----------------------------------------------------------------------


def is_loopback(host: object) -> bool:
    """True for a loopback IP literal (or "localhost"); names are never trusted."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _check_sockaddr(sock: socket.socket, address: object) -> None:
    if sock.family == getattr(socket, "AF_UNIX", None):
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not is_loopback(host):
        raise PermissionError(f"loopback guard: refusing to reach {address!r} from a test")


@pytest.fixture(autouse=True)
def loopback_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    in_gateway_tests = "gateway" in Path(str(request.node.path)).parent.parts[-1:]
    if not in_gateway_tests and not _NET_FIXTURES & set(request.fixturenames):
        yield
        return
    mp = pytest.MonkeyPatch()
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_sendto = socket.socket.sendto
    real_create_connection = asyncio.base_events.BaseEventLoop.create_connection

    def connect(self: socket.socket, address: Any) -> None:
        _check_sockaddr(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_sockaddr(self, address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        _check_sockaddr(self, args[-1])
        return real_sendto(self, data, *args)

    async def create_connection(
        self: asyncio.AbstractEventLoop, protocol_factory: Any, host: Any = None, *a: Any, **kw: Any
    ) -> Any:
        if kw.get("sock") is None and host is not None and not is_loopback(host):
            raise PermissionError(f"loopback guard: refusing to reach {host!r} from a test")
        return await real_create_connection(self, protocol_factory, host, *a, **kw)  # type: ignore[arg-type]

    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket.socket, "connect_ex", connect_ex)
    mp.setattr(socket.socket, "sendto", sendto)
    mp.setattr(asyncio.base_events.BaseEventLoop, "create_connection", create_connection)
    # No client in a test may pick up a proxy (or a "no proxy" list) from the environment.
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        mp.delenv(name, raising=False)
        mp.delenv(name.upper(), raising=False)
    try:
        yield
    finally:
        mp.undo()


# --- DNS -----------------------------------------------------------------------------------

Answers = list[tuple[str, int]]  # (address, ttl)
AnswerHook = Callable[[int], Answers]  # n-th query (0-based) of this name and type -> answers


class DnsServer:
    """An authoritative-looking DNS server on 127.0.0.1 (UDP and TCP, one port).

    ``set(name, answers)`` with a list of ``(address, ttl)`` or a hook called with the
    number of earlier queries of that name and type (DNS rebinding). Unknown names get
    NXDOMAIN. Only loopback addresses can be served. ``queries(name, "A")`` counts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, Answers | AnswerHook] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self.errors: list[str] = []
        self.tcp_queries = 0
        self._servers: list[DNSServer] = []
        logger = DNSLogger(log="-recv,-send,-request,-reply,-truncated,-data", logf=lambda s: None)
        resolver = _Resolver(self)
        for _ in range(50):
            udp = DNSServer(resolver, address="127.0.0.1", port=0, logger=logger, handler=_Handler)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(resolver, address="127.0.0.1", port=port, tcp=True, logger=logger)
            except OSError:
                udp.server.server_close()
                continue
            self._servers = [udp, tcp]
            self.port = port
            break
        else:  # pragma: no cover
            raise RuntimeError("no free port for the DNS server")
        for server in self._servers:
            server.start_thread()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, answers: Answers | AnswerHook) -> None:
        if not callable(answers):
            for address, _ttl in answers:
                if not is_loopback(address):
                    raise ValueError(f"the test DNS server only serves loopback, not {address}")
        with self._lock:
            self._answers[name.lower().rstrip(".")] = answers

    def queries(self, name: str, qtype: str = "A") -> int:
        with self._lock:
            return self._counts[(name.lower().rstrip("."), qtype)]

    def answer(self, name: str, qtype: str) -> Answers | None:
        with self._lock:
            entry = self._answers.get(name)
            n = self._counts[(name, qtype)]
            self._counts[(name, qtype)] += 1
        if entry is None:
            return None
        answers = entry(n) if callable(entry) else entry
        for address, _ttl in answers:
            if not is_loopback(address):
                self.errors.append(f"hook for {name} returned non-loopback {address}")
                return []
        return answers

    def close(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()


class _Handler(DNSHandler):  # type: ignore[misc]
    """Like a real server, a UDP answer over 512 bytes is cut to the question with TC set,
    so the client retries over TCP (dnslib's own truncation drops the question, which a
    client rightly ignores as an unrelated packet)."""

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        packed: bytes = reply.pack()
        if self.protocol == "udp" and len(packed) > 512:
            cut = request.reply()
            cut.header.tc = 1
            packed = cut.pack()
        return packed


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, owner: DnsServer) -> None:
        self.owner = owner

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if getattr(handler, "protocol", "") == "tcp":
            self.owner.tcp_queries += 1
        answers = self.owner.answer(qname, qtype)
        if answers is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for address, ttl in answers:
            ip = ipaddress.ip_address(address)
            if qtype == "A" and ip.version == 4:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=ttl))
            elif qtype == "AAAA" and ip.version == 6:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=ttl))
        return reply


# --- upstreams -------------------------------------------------------------------------------


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512  # the default 5 drops connections under a concurrent test
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, label: str) -> None:
        super().__init__(address, handler)
        self.label = label
        self.accepts = 0
        self.lock = threading.Lock()
        self.seen: list[Any] = []  # whatever the handler records (heads, SNI names, ...)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def count(self) -> None:
        with self.lock:
            self.accepts += 1


def _read_head(sock: socket.socket, limit: int = 65536) -> tuple[bytes, bytes]:
    """(head including the blank line, bytes after it); bounded in size."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    head, sep, rest = data.partition(b"\r\n\r\n")
    return head + sep, rest


class _TlsHandler(socketserver.BaseRequestHandler):
    """HTTPS: answers any request with JSON naming this server, the SNI and the path."""

    server: _TlsServer

    def handle(self) -> None:
        self.server.count()
        self.request.settimeout(5)
        try:
            tls = self.server.context.wrap_socket(self.request, server_side=True)
            head, _ = _read_head(tls)
        except (OSError, ssl.SSLError):
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        path = parts[1] if len(parts) == 3 else ""
        sni = getattr(tls, "sni_name", None)
        with self.server.lock:
            self.server.seen.append(sni)
        body = json.dumps({"server": self.server.label, "sni": sni, "path": path}).encode()
        with contextlib.suppress(OSError):
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
            )
            tls.unwrap()
        tls.close()


class _TlsServer(_Server):
    context: ssl.SSLContext


class _HttpEchoHandler(socketserver.BaseRequestHandler):
    """Plain HTTP: the response body is the request head exactly as received."""

    server: _Server

    def handle(self) -> None:
        self.server.count()
        self.request.settimeout(5)
        try:
            head, _ = _read_head(self.request)
        except OSError:
            return
        with self.server.lock:
            self.server.seen.append(head)
        with contextlib.suppress(OSError):
            self.request.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Upstream: %s\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                % (self.server.label.encode(), len(head))
                + head
            )


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echo every chunk at once; after the client's EOF, send ``bye <n>\\n`` and close."""

    server: _Server

    def handle(self) -> None:
        self.server.count()
        self.request.settimeout(10)
        total = 0
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                total += len(data)
                self.request.sendall(data)
            self.request.sendall(b"bye %d\n" % total)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            return


class _ResetHandler(socketserver.BaseRequestHandler):
    """Wait for the first byte, then reset the connection (RST, not FIN)."""

    server: _Server

    def handle(self) -> None:
        self.server.count()
        self.request.settimeout(5)
        with contextlib.suppress(OSError):
            self.request.recv(1)
        self.request.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        self.request.close()


def counting_chunks(n: int, chunk: int = 65536) -> Iterator[bytes]:
    """``n`` bytes in which every aligned 8-byte word is its own offset (big-endian), in
    pieces of ``chunk`` bytes (a multiple of 8): a byte lost, duplicated or moved anywhere
    changes the stream, and there is no period a reordering could hide in."""
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        words = array.array("Q", range(start, start + size + 7, 8))
        if sys.byteorder == "little":
            words.byteswap()
        yield words.tobytes()[:size]


def counting_pattern(n: int) -> bytes:
    return b"".join(counting_chunks(n))


class _SourceHandler(socketserver.BaseRequestHandler):
    """Read ``<n>\\n``, then send ``n`` bytes of :func:`counting_pattern` and close."""

    server: _Server

    def handle(self) -> None:
        self.server.count()
        self.request.settimeout(30)
        line = b""
        with contextlib.suppress(OSError):
            while not line.endswith(b"\n") and len(line) < 32:
                chunk = self.request.recv(1)
                if not chunk:
                    return
                line += chunk
            for piece in counting_chunks(int(line)):
                self.request.sendall(piece)
            self.request.shutdown(socket.SHUT_WR)


class _CountHandler(socketserver.BaseRequestHandler):
    """The blocked destination: it only counts, and any count above zero fails a test."""

    server: _Server

    def handle(self) -> None:
        self.server.count()


def _serve(server: _Server) -> _Server:
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    ).start()
    return server


def _bind_preferred(
    address: str, preferred: int, handler: type, label: str, cls: type[_Server] = _Server
) -> _Server:
    """Bind the preferred (privileged) port, or any free one when that is not possible."""
    try:
        return cls((address, preferred), handler, label)
    except OSError:
        return cls((address, 0), handler, label)


@dataclass
class Net:
    """Everything the gateway talks to in the tests (see the module docstring)."""

    dns: DnsServer
    ca: trustme.CA
    ca_file: Path
    up: str  # the reachable upstream address (a privateDestinationException)
    blocked: str  # an address outside the exceptions: nothing may ever reach it
    tls: _TlsServer
    http: _Server
    echo: _Server
    reset: _Server
    source: _Server
    blocked_tls: _Server
    blocked_http: _Server
    refused_port: int
    _holders: list[socket.socket] = field(default_factory=list)

    NAMES = (
        "allowed.test",
        "other.test",
        "denied.test",
        "audit.test",
        "plain.test",
        "tcp.test",
        "echo.test",
        "suggest-a.test",
        "suggest-b.test",
    )

    @property
    def tls_port(self) -> int:
        return self.tls.port

    @property
    def http_port(self) -> int:
        return self.http.port

    def https_url(self, name: str, path: str = "/") -> str:
        port = "" if self.tls_port == 443 else f":{self.tls_port}"
        return f"https://{name}{port}{path}"

    def http_url(self, name: str, path: str = "/") -> str:
        port = "" if self.http_port == 80 else f":{self.http_port}"
        return f"http://{name}{port}{path}"

    def blocked_accepts(self) -> int:
        return self.blocked_tls.accepts + self.blocked_http.accepts

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def reset_dns(self) -> None:
        for name in self.NAMES:
            self.dns.set(name, [(self.up, 60)])
        self.dns.set("ssrf.test", [(self.blocked, 60)])
        self.dns.set("mixed.test", [(self.blocked, 60), (self.up, 60)])

    def close(self) -> None:
        for server in (self.tls, self.http, self.echo, self.reset, self.source, self.blocked_tls):
            server.shutdown()
            server.server_close()
        self.blocked_http.shutdown()
        self.blocked_http.server_close()
        for sock in self._holders:
            sock.close()
        self.dns.close()


@pytest.fixture(scope="session")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    rng = random.Random()
    prefix = f"127.{rng.randint(100, 250)}.{rng.randint(1, 250)}"
    up, blocked = f"{prefix}.1", f"{prefix}.2"
    directory = tmp_path_factory.mktemp("net")
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert(*Net.NAMES, "ssrf.test", "mixed.test", "rebind.test", "ttl.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)

    def remember_sni(sslsock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        sslsock.sni_name = name

    context.sni_callback = remember_sni
    tls = _bind_preferred(up, 443, _TlsHandler, "up-tls", _TlsServer)
    assert isinstance(tls, _TlsServer)
    tls.context = context
    holder = socket.socket()
    holder.bind((up, 0))  # bound, never listening: connecting is refused
    result = Net(
        dns=DnsServer(),
        ca=ca,
        ca_file=ca_file,
        up=up,
        blocked=blocked,
        tls=_serve(tls),  # type: ignore[arg-type]
        http=_serve(_bind_preferred(up, 80, _HttpEchoHandler, "up-http")),
        echo=_serve(_Server((up, 0), _EchoHandler, "echo")),
        reset=_serve(_Server((up, 0), _ResetHandler, "reset")),
        source=_serve(_Server((up, 0), _SourceHandler, "source")),
        blocked_tls=_serve(_bind_preferred(blocked, 443, _CountHandler, "blocked-tls")),
        blocked_http=_serve(_bind_preferred(blocked, 80, _CountHandler, "blocked-http")),
        refused_port=holder.getsockname()[1],
        _holders=[holder],
    )
    result.reset_dns()
    try:
        yield result
    finally:
        result.close()


@pytest.fixture
def dns(net: Net) -> Iterator[DnsServer]:
    """The session's DNS server; the standard answers are restored after the test."""
    yield net.dns
    net.reset_dns()


# --- policies ----------------------------------------------------------------------------------


def gateway_doc(net: Net, **spec: Any) -> dict[str, Any]:
    """An EgressGateway for tests: loopback clients, our DNS, the upstream as exception."""
    base: dict[str, Any] = {
        "clientCIDRs": ["127.0.0.0/8", "::1/128"],
        "privateDestinationExceptions": [f"{net.up}/32"],
        "dns": {
            "servers": [net.dns.address],
            "cache": {"enabled": True, "minTTLSeconds": 0, "maxTTLSeconds": 300},
        },
    }
    base.update(spec)
    servers = base.get("dns", {}).get("servers", [])
    assert servers and all(is_loopback(s.rpartition(":")[0]) for s in servers), servers
    return {
        "apiVersion": API,
        "kind": "EgressGateway",
        "metadata": {"name": "default", "namespace": "tidegate-system"},
        "spec": base,
    }


def policy_doc(name: str, namespace: str = "t", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def cluster_policy_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def standard_policies(net: Net) -> list[dict[str, Any]]:
    web_ports = sorted({80, 443, net.tls_port, net.http_port})
    return [
        policy_doc(
            "main",
            allow=[
                {"host": "allowed.test", "ports": web_ports},
                {"host": "denied.test"},
                {"host": "plain.test", "ports": web_ports},
                {"host": "ssrf.test", "ports": web_ports},
                {"host": "mixed.test", "ports": web_ports},
                {"host": "rebind.test", "ports": web_ports},
                {"host": "ttl.test", "ports": web_ports},
                {
                    "host": "tcp.test",
                    "ports": [net.refused_port, net.reset.port, net.echo.port, net.source.port],
                },
                {"host": "echo.test", "ports": [net.echo.port]},
            ],
            deny=[{"host": "denied.test"}],
        ),
        policy_doc("watch", mode="Audit", deny=[{"host": "audit.test"}]),
        policy_doc("watch-allow", allow=[{"host": "audit.test", "ports": web_ports}]),
    ]


def write_policy_dir(
    directory: Path, net: Net, policies: Sequence[dict[str, Any]], **gateway_spec: Any
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    docs = [gateway_doc(net, **gateway_spec), *policies]
    tmp = directory / ".policies.yaml.tmp"
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    os.replace(tmp, directory / "policies.yaml")  # atomic: a reload never sees half a file
    write_local_identities(directory)


def write_local_identities(directory: Path, namespace: str = "t", name: str = "local") -> None:
    """Standalone client identities: loopback clients are the pod ``t/local`` (the
    namespace ``policy_doc`` puts policies in), so those policies govern the tests."""
    folder = directory / "identities"
    folder.mkdir(exist_ok=True)
    doc = {
        "apiVersion": API,
        "kind": "ClientIdentities",
        "pods": [
            {
                "namespace": namespace,
                "name": name,
                "labels": {"app": "test"},
                "addresses": ["127.0.0.1", "::1"],
            }
        ],
    }
    (folder / "local.identities").write_text(yaml.safe_dump(doc))


# --- the gateway process --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


MetricKey = tuple[str, frozenset[tuple[str, str]]]


class Metrics(dict[MetricKey, float]):
    def get_value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.items() if n == name and want <= ls)

    def names(self) -> set[str]:
        return {n for n, _ in self}


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    proxy_port: int
    metrics_port: int
    log_path: Path
    stderr_path: Path
    workdir: Path

    @property
    def proxy_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.proxy_port)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def admin(self, path: str) -> tuple[int, str]:
        return _get(self.metrics_url + path)

    def log_lines(self) -> list[dict[str, Any]]:
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0, *, after: int = 0
    ) -> dict[str, Any]:
        """The first access-log line matching ``predicate`` (lines are flushed every 0.2 s),
        among those past the first ``after`` (a shared gateway's earlier lines: take
        ``len(gw.log_lines())`` before the request)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines()[after:]:
                if predicate(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching access-log line in {self.log_lines()!r}")
            time.sleep(0.05)

    def metrics(self) -> Metrics:
        status, text = self.admin("/metrics")
        assert status == 200, text
        out = Metrics()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                out[key] = out.get(key, 0.0) + sample.value
        return out

    def wait_metric(
        self, name: str, predicate: Callable[[float], bool], timeout: float = 5.0, **labels: str
    ) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics().get_value(name, **labels)
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} stayed at {value}")
            time.sleep(0.05)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.stderr()}")
            with contextlib.suppress(OSError):
                if self.admin("/readyz")[0] == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"gateway not ready in {timeout}s:\n{self.stderr()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 8.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; the return code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def assert_only_loopback_upstreams(self) -> None:
        for line in self.log_lines():
            upstream = line.get("upstream")
            if upstream:
                host = upstream.rpartition(":")[0].strip("[]")
                assert is_loopback(host), f"the gateway dialled {upstream}: {line}"


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_factory(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    """``factory(policies=None, *, args=None, extra_args=(), wait=True, **gateway_spec)``.

    By default writes a policy folder (``gateway_doc`` + ``policies``, the standard ones
    when None) and runs ``tidegate gateway --policies DIR``; ``args`` replaces the source
    arguments (e.g. ``["--bundle", path]``).
    """
    started: list[GatewayProcess] = []
    try:
        yield lambda *a, **kw: _start(net, tmp_path_factory, started, *a, **kw)
    finally:
        for gw in started:
            gw.stop()
        for gw in started:
            gw.assert_only_loopback_upstreams()


def _start(
    net: Net,
    tmp_path_factory: pytest.TempPathFactory,
    started: list[GatewayProcess],
    policies: Sequence[dict[str, Any]] | None = None,
    *,
    args: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    wait: bool = True,
    **gateway_spec: Any,
) -> GatewayProcess:
    workdir = tmp_path_factory.mktemp("gw")
    if args is None:
        policy_dir = workdir / "policies"
        write_policy_dir(
            policy_dir,
            net,
            standard_policies(net) if policies is None else policies,
            **gateway_spec,
        )
        args = ["--policies", str(policy_dir)]
    elif "--identities" not in args and "--identities-configmap" not in args:
        write_local_identities(workdir)  # loopback clients are the pod t/local here too
        args = [*args, "--identities", str(workdir / "identities")]
    proxy_port, metrics_port = free_port(), free_port()
    log_path, stderr_path = workdir / "access.log", workdir / "stderr.log"
    command = [
        TIDEGATE,
        "gateway",
        *args,
        "--listen",
        f"127.0.0.1:{proxy_port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--access-log",
        str(log_path),
        *FAST_LIMITS,
        *extra_args,
    ]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
    gw = GatewayProcess(proc, proxy_port, metrics_port, log_path, stderr_path, workdir)
    started.append(gw)
    if wait:
        gw.wait_ready()
    return gw


@pytest.fixture(scope="session")
def shared_gateway(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway with the standard policies, for tests that do not change its config."""
    started: list[GatewayProcess] = []
    try:
        yield _start(net, tmp_path_factory, started)
    finally:
        for gw in started:
            gw.stop()
        for gw in started:
            gw.assert_only_loopback_upstreams()


# --- a raw proxy client ---------------------------------------------------------------


@dataclass
class Reply:
    status: int
    reason_phrase: str
    headers: dict[str, str]
    rest: bytes  # bytes already read past the head
    sock: socket.socket

    @property
    def reason(self) -> str | None:
        return self.headers.get("x-tidegate-reason")


def read_reply(sock: socket.socket, timeout: float = 5.0) -> Reply:
    sock.settimeout(timeout)
    head, rest = _read_head(sock)
    if not head:
        raise ConnectionError("the proxy closed the connection without a response")
    lines = head.decode("latin-1").split("\r\n")
    version, _, status_reason = lines[0].partition(" ")
    assert version.startswith("HTTP/1."), lines[0]
    code, _, phrase = status_reason.partition(" ")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return Reply(int(code), phrase, headers, rest, sock)


def proxy_socket(gw: GatewayProcess, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(gw.proxy_addr, timeout=timeout)


def send_raw(gw: GatewayProcess, data: bytes, timeout: float = 5.0) -> Reply:
    sock = proxy_socket(gw, timeout)
    sock.sendall(data)
    return read_reply(sock, timeout)


def connect(gw: GatewayProcess, target: str, timeout: float = 5.0) -> Reply:
    """Send ``CONNECT target`` and read the proxy's response head (the socket stays open)."""
    return send_raw(gw, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(), timeout)


def recv_until_eof(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 20) -> bytes:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < limit and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def tls_get(sock: socket.socket, net: Net, server_hostname: str, path: str = "/") -> dict[str, Any]:
    """Speak HTTPS through an established tunnel; the upstream's JSON answer."""
    tls = net.ssl_context().wrap_socket(sock, server_hostname=server_hostname)
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_hostname}\r\n\r\n".encode())
    reply = read_reply(tls)
    body = reply.rest + recv_until_eof(tls)
    tls.close()
    assert reply.status == 200, reply
    return dict(json.loads(body))
