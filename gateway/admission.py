"""Admission: from one request head to a decided destination, or a refusal with a reason.

``admit`` is everything the gateway decides before it dials: parse the head, find the
target, check the framing, ask the policy engine, resolve the name (cache first), and run
the SSRF guard and the self-loop guard on every address. It touches no socket, so it can be
tested like the Engine (``tests/gateway/test_admission.py``): give it bytes, a client
address, an engine and a resolver, get a :class:`Tunnel` or a :class:`Refusal`.

It also fills in the access record as it learns things, so the log line and the metric for
a refusal always carry the same decision and reason.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from .access import AccessRecord
from .addresses import IPAddress
from .auditrecord import AuditRecord as AuditRecord
from .dial import hostport
from .dns import ResolveError, Resolver
from .engine import (
    REASON_BAD_REQUEST,
    REASON_NO_MATCH,
    REASON_PORT,
    REASON_PRIVATE,
    REASON_RULE_DENY,
    Decision,
    Engine,
)
from .hosts import Host, HostError, normalize_host, split_host_port
from .httphead import HeadError, RequestHead, parse_head
from .identity import ClientIdentity
from .observe import Metrics
from .plainhttp import forwarded_head, request_framing
from .settings import Limits

REASON_DNS_ERROR = "dns_error"
REASON_DNS_TIMEOUT = "dns_timeout"
REASON_OWN_ADDRESS = "own_address"  # the destination is one of the gateway's own sockets

#: Engine decisions that go into the per-policy denied/would-deny record: the ones about
#: the destination (a client outside clientCIDRs is about the client, not the policy).
RECORDED_REASONS = frozenset({REASON_RULE_DENY, REASON_NO_MATCH, REASON_PORT})
#: A no-match decision is about every policy governing the client; at most this many get it.
MAX_ATTRIBUTED_POLICIES = 16

#: (address, port) -> True when it is one of the gateway's own listening sockets.
OwnSocketCheck = Callable[[IPAddress, int], bool]


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str
    message: str
    decision: Decision | None = None  # counted under its policy when the engine refused


@dataclass(frozen=True, slots=True)
class PlainRequest:
    head: bytes  # the origin-form head to send upstream, framing headers the gateway's own
    framing: int  # body length, or plainhttp.CHUNKED


@dataclass(frozen=True, slots=True)
class Tunnel:
    host: Host
    port: int
    addresses: tuple[IPAddress, ...]  # checked, in the order to dial
    decision: Decision
    plain: PlainRequest | None  # None: CONNECT
    sni_check: bool  # hold the ClientHello until its SNI matches ``host``


async def admit(
    raw_head: bytes,
    *,
    client: IPAddress,
    engine: Engine,
    resolver: Resolver,
    limits: Limits,
    metrics: Metrics,
    record: AccessRecord,
    own_socket: OwnSocketCheck | None = None,
    identity: ClientIdentity | None = None,
) -> Tunnel | Refusal:
    try:
        head = parse_head(raw_head, max_headers=limits.max_headers)
    except HeadError as exc:
        return _bad(record, exc.status, str(exc))
    record.method = head.method
    try:
        host_text, port, path = request_target(head)
        record.host, record.port = host_text, port
        host = normalize_host(host_text)
        framing = request_framing(head)
        if path is None and framing != 0:
            raise HeadError("a CONNECT request has no body")
    except HeadError as exc:
        return _bad(record, exc.status, str(exc))
    except HostError as exc:
        return _bad(record, 400, str(exc))
    record.host = host.name
    decision = engine.decide(client, host, port, identity)
    record.decision, record.reason = decision.verdict, decision.reason
    record.policy, record.rule = decision.policy, decision.rule
    if decision.verdict != "allow" and decision.reason in RECORDED_REASONS:
        record_denial(metrics.audit, engine, client, decision, host.name, port, identity)
    if not decision.allowed:
        return Refusal(403, decision.reason, decision.message, decision)
    found = await resolve(host, resolver=resolver, limits=limits, metrics=metrics)
    if isinstance(found, Refusal):
        record.reason = found.reason  # the decision stands; the lookup failed
        return found
    addresses = []
    blocked = ""
    for address in found:
        if own_socket is not None and own_socket(address, port):
            record.refused(REASON_OWN_ADDRESS)
            message = f"{hostport(address, port)} is the gateway itself"
            return Refusal(403, REASON_OWN_ADDRESS, message)
        why = engine.destination_blocked(address, client, identity, port=port)
        if why is None:
            addresses.append(address)
        else:
            blocked = blocked or f"{address} is {why}"
    if not addresses:
        record.refused(REASON_PRIVATE)
        message = f"destination {blocked}"
        return Refusal(403, REASON_PRIVATE, message, Decision("deny", REASON_PRIVATE, message))
    plain = None
    if path is not None:
        text = forwarded_head(
            head, path=path, host_header=_host_header(host.name, port), framing=framing
        )
        plain = PlainRequest(text, framing)
    sni = path is None and port == 443 and engine.gateway.require_sni_match and host.kind == "name"
    return Tunnel(host, port, tuple(addresses), decision, plain, sni)


def record_denial(
    audit: AuditRecord,
    engine: Engine,
    client: IPAddress,
    decision: Decision,
    host: str,
    port: int,
    identity: ClientIdentity | None = None,
) -> None:
    """Count a deny or would-deny against the policy it is about.

    A rule's decision names its policy. A no-match one names none: it is about every
    policy governing the client (each of them would have to allow it), in Audit mode the
    ones whose enforcing would deny it.
    """
    if decision.policy is not None:
        keys: tuple[str, ...] = (decision.policy,)
    else:
        keys = _governing(engine, client, identity)
    verdict: Literal["deny", "audit"] = "deny" if decision.verdict == "deny" else "audit"
    audit.record(keys, host, port, verdict=verdict, reason=decision.reason, now=time.time())


#: engine -> client -> the policies a no-match decision for that client is about. Clients
#: are few and a flood of refusals must not cost a walk over the policies per request.
_GOVERNING: weakref.WeakKeyDictionary[Engine, dict[object, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)
GOVERNING_CACHE_CLIENTS = 4096


def _governing(
    engine: Engine, client: IPAddress, identity: ClientIdentity | None
) -> tuple[str, ...]:
    cache = _GOVERNING.get(engine)
    if cache is None:
        cache = _GOVERNING[engine] = {}
    # A pod's address may change hands: the key is the address and who is behind it.
    key = (client, identity.selector_key if identity is not None else identity)
    keys = cache.get(key)
    if keys is None:
        if len(cache) >= GOVERNING_CACHE_CLIENTS:
            cache.clear()
        governing = engine.governing_keys(client, identity)
        keys = cache[key] = tuple(governing[:MAX_ATTRIBUTED_POLICIES])
    return keys


async def resolve(
    host: Host, *, resolver: Resolver, limits: Limits, metrics: Metrics
) -> tuple[IPAddress, ...] | Refusal:
    """The host's addresses (an IP literal is its own answer), or why there are none."""
    if host.kind == "ip":
        assert host.ip is not None
        return (host.ip,)
    try:
        found = resolver.cached(host.name)
        if found is not None:
            metrics.dns_cache_hits.inc()
            return found
        metrics.dns_cache_misses.inc()
        async with asyncio.timeout(limits.dns_timeout):
            return await resolver.resolve(host.name)
    except TimeoutError:
        return Refusal(504, REASON_DNS_TIMEOUT, f"DNS lookup of {host.name} timed out")
    except ResolveError as exc:
        return Refusal(504 if exc.timeout else 502, REASON_DNS_ERROR, str(exc))


def request_target(head: RequestHead) -> tuple[str, int, str | None]:
    """(host, port, origin-form path or None for CONNECT)."""
    if head.method == "CONNECT":
        host, port = split_host_port(head.target)
        return host, port, None
    try:
        url = urlsplit(head.target)
    except ValueError as exc:  # e.g. unbalanced or non-address brackets: "http://[a.b]/"
        raise HeadError(f"malformed request URI: {exc}") from None
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


def _bad(record: AccessRecord, status: int, message: str) -> Refusal:
    record.refused(REASON_BAD_REQUEST)
    return Refusal(status, REASON_BAD_REQUEST, message)


def _has_port(authority: str) -> bool:
    if authority.startswith("["):
        return "]:" in authority
    return ":" in authority


def _host_header(host: str, port: int) -> str:
    text = f"[{host}]" if ":" in host else host
    return text if port == 80 else f"{text}:{port}"
