"""Request forms from attackers and from peers' test suites, through the real proxy on loopback.

Each table row is a spelling that some parser somewhere has got wrong (Squid and smokescreen
advisories, urllib's bracket checks, RFC 9112's rules for proxies): the gateway must answer
it with a clear 4xx - never an internal error - and must forward only what it judged.
"""

from __future__ import annotations

import os
import struct
import time

import pytest
from fixtures_net import (
    GatewayFactory,
    GatewayProcess,
    Net,
    connect,
    policy_doc,
    proxy_socket,
    read_reply,
    recv_until_eof,
    send_raw,
)

from tidegate.gateway.tls import NotTLS, parse_client_hello

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


#: (request head, status, reason): spellings that have fooled some proxy's parser, each
#: answered before anything is dialled. "{hp}" is the upstream's plain-HTTP port.
REFUSED = [
    ("GET http://allowed.test@evil.test/ HTTP/1.1", 400, "bad_request"),  # userinfo
    ("GET http://evil.test\\@allowed.test/ HTTP/1.1", 400, "bad_request"),
    ("GET http://denied.test#@allowed.test/ HTTP/1.1", 403, "deny_rule"),  # judged as sent
    ("GET http://denied.test?@allowed.test/ HTTP/1.1", 403, "deny_rule"),
    ("GET http://plain.test:{hp}/ HTTP/1.1\r\nHost: denied.test", 400, "bad_request"),
    ("GET http://plain.test:{hp}:{hp}/ HTTP/1.1", 400, "bad_request"),
    ("GET http://plain.test:/ HTTP/1.1", 400, "bad_request"),
    ("GET https://allowed.test/ HTTP/1.1", 400, "bad_request"),  # TLS goes by CONNECT
    ("GET / HTTP/1.1\r\nHost: allowed.test", 400, "bad_request"),  # origin-form
    ("GET allowed.test:443 HTTP/1.1", 400, "bad_request"),  # authority-form, not CONNECT
    ("connect allowed.test:443 HTTP/1.1", 400, "bad_request"),  # methods are case-sensitive
    ("CONNECT allowed.test:443@evil.test HTTP/1.1", 400, "bad_request"),
    ("CONNECT http://allowed.test:443 HTTP/1.1", 400, "bad_request"),
    ("CONNECT allowed.test HTTP/1.1", 400, "bad_request"),
    ("CONNECT allowed.test:0 HTTP/1.1", 400, "bad_request"),
    ("CONNECT allowed.test:65536 HTTP/1.1", 400, "bad_request"),
    ("CONNECT allowed.test:+443 HTTP/1.1", 400, "bad_request"),
    ("CONNECT allowed.test:-443 HTTP/1.1", 400, "bad_request"),
    ("CONNECT allowed.test:0x1bb HTTP/1.1", 400, "bad_request"),
    ("CONNECT [::1]:443 HTTP/1.1", 403, "no_rule_matched"),
    ("CONNECT [::ffff:127.0.0.1]:443 HTTP/1.1", 403, "no_rule_matched"),
    ("CONNECT [64:ff9b::7f00:1]:443 HTTP/1.1", 403, "no_rule_matched"),
    ("CONNECT [fe80::1%25lo]:443 HTTP/1.1", 403, "no_rule_matched"),
    ("CONNECT 0x7f.1:443 HTTP/1.1", 403, "no_rule_matched"),
    ("CONNECT 08.0.0.1:443 HTTP/1.1", 400, "bad_request"),  # not octal, not a name
    ("CONNECT denied.test.:443 HTTP/1.1", 403, "deny_rule"),  # trailing dot
    ("CONNECT DENIED.TEST:443 HTTP/1.1", 403, "deny_rule"),
    ("CONNECT denied..test:443 HTTP/1.1", 400, "bad_request"),
    ("PRI * HTTP/2.0\r\n\r\nSM", 505, "bad_request"),  # HTTP/2 preface
    ("GET\thttp://plain.test/ HTTP/1.1", 400, "bad_request"),
    ("GET  http://plain.test/ HTTP/1.1", 400, "bad_request"),
    ("GET http://plain.test/ HTTP/1.1\r\nHost: plain.test\r\nHost: plain.test", 400, "bad_request"),
    ("GET http://plain.test/ HTTP/1.1\r\nTransfer-Encoding : chunked", 400, "bad_request"),
    (
        "GET http://plain.test/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked",
        400,
        "bad_request",
    ),
    ("GET http://plain.test/ HTTP/1.1\r\nTransfer-Encoding: chunked, chunked", 501, "bad_request"),
    ("GET http://plain.test/ HTTP/1.1\r\nContent-Length: +1", 400, "bad_request"),
    ("GET http://plain.test/ HTTP/1.1\r\nContent-Length: 1, 1", 400, "bad_request"),
]


@pytest.mark.parametrize(("head", "status", "reason"), REFUSED)
def test_hostile_request_forms_are_refused(
    shared_gateway: GatewayProcess, net: Net, head: str, status: int, reason: str
) -> None:
    text = head.replace("{hp}", str(net.http_port)) + "\r\n\r\n"
    reply = send_raw(shared_gateway, text.encode("latin-1"))
    reply.sock.close()
    assert (reply.status, reply.reason) == (status, reason), reply


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


# --- ClientHellos with more than one server name ----------------------------------------------


def _sni(*names: bytes, name_type: int = 0, first_type: int | None = None) -> bytes:
    types = [name_type] * len(names)
    if first_type is not None:
        types[0] = first_type
    entries = b"".join(
        bytes([t]) + struct.pack(">H", len(n)) + n for t, n in zip(types, names, strict=True)
    )
    body = struct.pack(">H", len(entries)) + entries
    return struct.pack(">HH", 0, len(body)) + body


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack(">HH", kind, len(body)) + body


def _hello(*extensions: bytes) -> bytes:
    """A TLS 1.3-style ClientHello record carrying exactly these extensions."""
    block = b"".join(extensions)
    body = (
        b"\x03\x03" + os.urandom(32) + b"\x00"  # version, random, no session id
        b"\x00\x02\x13\x01\x01\x00"  # one cipher suite, null compression
         + struct.pack(">H", len(block)) + block
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


#: (hello, the name read, or None when the hello must be refused as ambiguous)
HELLOS = [
    (_hello(_sni(b"allowed.test")), "allowed.test"),
    (_hello(_sni(b"ALLOWED.test")), "allowed.test"),
    # an ECH-looking extension: the outer name is what can be checked (docs/gateway.md)
    (_hello(_sni(b"allowed.test"), _ext(0xFE0D, os.urandom(40))), "allowed.test"),
    (_hello(_sni(b"allowed.test"), _sni(b"evil.test")), None),  # two extensions
    (_hello(_sni(b"allowed.test", b"evil.test")), None),  # two names in one
    (_hello(_sni(b"evil.test", name_type=1), _sni(b"allowed.test")), None),
    (_hello(_sni(b"evil.test", b"allowed.test", first_type=1)), None),
]


HELLO_IDS = ["one", "upper", "ech", "two-ext", "two-names", "other-type-ext", "other-type-first"]


@pytest.mark.parametrize(("hello", "name"), HELLOS, ids=HELLO_IDS)
def test_a_hello_naming_more_than_one_server_is_refused(hello: bytes, name: str | None) -> None:
    """RFC 8446 4.2 and RFC 6066 3 forbid it; a server reading the last name would reach a
    name the gateway never compared, so it is refused rather than read by first match."""
    if name is None:
        with pytest.raises(NotTLS):
            parse_client_hello(hello)
    else:
        assert parse_client_hello(hello).server_name == name


def test_a_second_server_name_never_reaches_the_destination(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    if net.tls_port != 443:
        pytest.skip("cannot bind port 443 on a loopback address (needs root)")
    gw = gateway_factory()  # its own log: the shared gateway's SNI tests read theirs
    reply = connect(gw, "allowed.test:443")
    assert reply.status == 200
    reply.sock.sendall(_hello(_sni(b"allowed.test"), _sni(b"evil.test")))
    assert recv_until_eof(reply.sock) == b""  # cut by the gateway: no alert from upstream
    reply.sock.close()
    line = gw.wait_log(
        lambda r: r.get("reason") == "sni_mismatch" and "server_name" in r.get("message", "")
    )
    assert line["decision"] == "deny"


def test_a_cidr_allow_for_one_port_opens_no_other_port(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    """``allow: cidr blocked/32 ports [5432]`` and an allowed name resolving to that address:
    the name on port 80 meets the SSRF guard (the cidr rule says nothing about port 80)."""
    before = net.blocked_accepts()
    gw = gateway_factory(
        [
            policy_doc(
                "p",
                allow=[
                    {"cidr": f"{net.blocked}/32", "ports": [5432]},
                    {"host": "ssrf.test", "ports": [80, 443]},
                ],
            )
        ]
    )
    reply = send_raw(gw, b"GET http://ssrf.test/ HTTP/1.1\r\n\r\n")
    reply.sock.close()
    assert (reply.status, reply.reason) == (403, "private_address"), reply
    assert net.blocked_accepts() == before


def test_a_client_trickling_after_a_refusal_is_cut(shared_gateway: GatewayProcess) -> None:
    """Slowloris on the last phase: after an error answer the gateway reads and drops what
    the client still sends for about a second (so the answer is not lost to a reset), and
    no longer, however steadily the client keeps sending."""
    sock = proxy_socket(shared_gateway)
    sock.sendall(b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")
    assert read_reply(sock).status == 403
    started = time.monotonic()
    with pytest.raises(OSError):
        while time.monotonic() - started < 10:
            sock.sendall(b"x" * 1024)
            time.sleep(0.05)
    sock.close()
    assert time.monotonic() - started < 5  # LINGER_SECONDS (1 s) plus the sweep, loaded
