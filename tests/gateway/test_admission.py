"""Admission as a unit: request-head bytes in, a Tunnel or a Refusal out, no sockets of its
own (the resolver asks the session's loopback DNS server), and an access record whose
decision and reason always match what the metric would count."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from fixtures_net import DnsServer, Net

from tidegate.gateway.access import AccessRecord
from tidegate.gateway.admission import Refusal, Tunnel, admit
from tidegate.gateway.dns import Resolver
from tidegate.gateway.documents import parse_gateway, parse_policy
from tidegate.gateway.engine import Engine
from tidegate.gateway.identity import pod_identity
from tidegate.gateway.model import DnsSettings
from tidegate.gateway.observe import Metrics
from tidegate.gateway.plainhttp import CHUNKED
from tidegate.gateway.settings import Limits

CLIENT = ipaddress.ip_address("10.1.2.3")
# The client is a pod of the policy's namespace (policies govern their namespace's pods).
POD = pod_identity("n", "client", {"app": "client"}, {})


def make(net: Net) -> tuple[Engine, Resolver]:
    gateway = parse_gateway(
        {
            "metadata": {"name": "g", "namespace": "n"},
            "spec": {
                "clientCIDRs": ["10.0.0.0/8"],
                "privateDestinationExceptions": [f"{net.up}/32"],
            },
        }
    )
    policy = parse_policy(
        {
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {
                "allow": [{"host": "allowed.test"}, {"host": "ssrf.test"}, {"host": "x.test"}],
                "deny": [{"host": "denied.test"}],
            },
        }
    )
    resolver = Resolver(DnsSettings(servers=(net.dns.address,), min_ttl=0), timeout=1.0)
    return Engine(gateway, (policy,)), resolver


def run_admit(net: Net, raw: bytes, **kw: Any) -> tuple[Tunnel | Refusal, AccessRecord]:
    engine, resolver = make(net)
    record = AccessRecord()
    result = asyncio.run(
        admit(
            raw,
            client=kw.pop("client", CLIENT),
            identity=kw.pop("identity", POD),
            engine=engine,
            resolver=resolver,
            limits=Limits(dns_timeout=1.0),
            metrics=Metrics(),
            record=record,
            **kw,
        )
    )
    return result, record


def test_connect_allowed_gives_checked_addresses(net: Net) -> None:
    result, record = run_admit(net, b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(result, Tunnel)
    assert result.addresses == (ipaddress.ip_address(net.up),)
    assert result.plain is None and result.sni_check
    assert (record.decision, record.reason, record.policy, record.rule) == (
        "allow",
        "allow_rule",
        "n/p",
        "allow[0]",
    )


def test_plain_request_gets_the_gateways_own_framing(net: Net) -> None:
    raw = (
        b"POST http://allowed.test/up?x=1 HTTP/1.1\r\nHost: allowed.test\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: keep-alive, transfer-encoding\r\n"
        b"Keep-Alive: 5\r\n\r\n"
    )
    result, _ = run_admit(net, raw)
    assert isinstance(result, Tunnel) and result.plain is not None
    assert result.plain.framing == CHUNKED
    assert result.plain.head == (
        b"POST /up?x=1 HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n"
        b"Via: 1.1 tidegate\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("raw", "status", "reason", "decision"),
    [
        (b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n", 403, "deny_rule", "deny"),
        (b"CONNECT nosuch.test:443 HTTP/1.1\r\n\r\n", 403, "no_rule_matched", "deny"),
        (b"CONNECT ssrf.test:443 HTTP/1.1\r\n\r\n", 403, "private_address", "deny"),
        (b"CONNECT x.test:443 HTTP/1.1\r\n\r\n", 502, "dns_error", "allow"),
        (
            b"CONNECT allowed.test:443 HTTP/1.1\r\nContent-Length: 4\r\n\r\n",
            400,
            "bad_request",
            "deny",
        ),
        (
            b"POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "bad_request",
            "deny",
        ),
        (b"CONNECT allowed.test:\xc2\xb2 HTTP/1.1\r\n\r\n", 400, "bad_request", "deny"),
    ],
)
def test_refusals_and_their_records(
    net: Net, dns: DnsServer, raw: bytes, status: int, reason: str, decision: str
) -> None:
    dns.set("ssrf.test", [(net.blocked, 5)])
    result, record = run_admit(net, raw)
    assert isinstance(result, Refusal), result
    assert (result.status, result.reason) == (status, reason)
    assert (record.decision, record.reason) == (decision, reason)
    if reason in ("private_address", "bad_request"):
        assert record.policy is None  # the guard refused, not a policy


def test_client_outside_client_cidrs(net: Net) -> None:
    result, _ = run_admit(
        net, b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n", client=ipaddress.ip_address("1.2.3.4")
    )
    assert isinstance(result, Refusal) and result.reason == "client_not_allowed"


def test_own_socket_is_refused_before_the_ssrf_guard(net: Net) -> None:
    own = {(ipaddress.ip_address(net.up), 443)}
    result, record = run_admit(
        net,
        b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n",
        own_socket=lambda address, port: (address, port) in own,
    )
    assert isinstance(result, Refusal) and (result.status, result.reason) == (403, "own_address")
    assert (record.decision, record.policy) == ("deny", None)


def test_a_cancelled_caller_does_not_break_the_shared_lookup(net: Net, dns: DnsServer) -> None:
    """Two callers share one lookup of a slow name; the first gives up (as a connection
    whose deadline passed does). The second must still get the answer."""
    import time

    dns.set("slow.test", lambda n: (time.sleep(0.6), [(net.up, 5)])[1])
    _, resolver = make(net)

    async def scenario() -> object:
        first = asyncio.create_task(resolver.resolve("slow.test"))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(resolver.resolve("slow.test"))
        await asyncio.sleep(0.1)
        first.cancel()
        async with asyncio.timeout(3):
            return await second

    assert asyncio.run(scenario()) == (ipaddress.ip_address(net.up),)
