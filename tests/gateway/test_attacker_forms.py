"""Request forms from attackers and from peers' test suites, through the real proxy on loopback.

Each table row is a spelling that some parser somewhere has got wrong (Squid and smokescreen
advisories, urllib's bracket checks, RFC 9112's rules for proxies): the gateway must answer
it with a clear 4xx - never an internal error - and must forward only what it judged.
"""

from __future__ import annotations

import pytest
from fixtures_net import GatewayFactory, GatewayProcess, Net, policy_doc, recv_until_eof, send_raw

#: Absolute-form targets that urllib refuses with ValueError (brackets that are not an
#: IP literal, unbalanced brackets): a malformed request, 400, not a 502 internal error.
MALFORMED_URIS = [
    "http://[::1/",
    "http://a]b/",
    "http://[allowed.test]/",
    "http://[plain.test]:80/",
    "http://x[::1]/",
    "http://[::1]]/",
]


@pytest.mark.parametrize("target", MALFORMED_URIS)
def test_malformed_absolute_uri_is_a_bad_request(
    shared_gateway: GatewayProcess, target: str
) -> None:
    reply = send_raw(shared_gateway, f"GET {target} HTTP/1.1\r\n\r\n".encode())
    reply.sock.close()
    assert (reply.status, reply.reason) == (400, "bad_request"), reply


@pytest.mark.parametrize(
    "host_header",
    ["PLAIN.TEST.:{port}", "plain.test.:{port}", "Plain.Test:0{port}", "plain.test:{port}"],
)
def test_forwarded_host_is_the_one_the_gateway_judged(
    shared_gateway: GatewayProcess, net: Net, host_header: str
) -> None:
    """RFC 9112 3.2.2: the Host sent upstream comes from the target URI the policy judged,
    never the client's own spelling of it (which only had to normalise to the same host)."""
    port = net.http_port
    request = (
        f"GET http://plain.test:{port}/x HTTP/1.1\r\n"
        f"Host: {host_header.format(port=port)}\r\nAccept: */*\r\n\r\n"
    )
    reply = send_raw(shared_gateway, request.encode())
    body = reply.rest + recv_until_eof(reply.sock)
    reply.sock.close()
    assert reply.status == 200, reply
    expected = "plain.test" if port == 80 else f"plain.test:{port}"
    hosts = [line for line in body.decode("latin-1").split("\r\n") if line[:5].lower() == "host:"]
    assert hosts == [f"Host: {expected}"], body


def test_ipv6_forms_of_a_denied_address_are_denied(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    """``deny: cidr`` on an IPv4 address, defaultAction Allow: the IPv4-mapped and NAT64
    spellings of that address reach the same host, so they meet the same deny (the SSRF
    guard is opened for them here, so only the rule can stop them)."""
    up, port = net.up, net.echo.port
    forms = [up, f"[::ffff:{up}]", f"[64:ff9b::{up}]"]
    gw = gateway_factory(
        [policy_doc("p", deny=[{"cidr": f"{up}/32"}])],
        defaultAction="Allow",
        privateDestinationExceptions=[f"{up}/32", f"::ffff:{up}/128", f"64:ff9b::{up}/128"],
    )
    for form in forms:
        reply = send_raw(gw, f"CONNECT {form}:{port} HTTP/1.1\r\n\r\n".encode())
        reply.sock.close()
        assert (reply.status, reply.reason) == (403, "deny_rule"), (form, reply)
