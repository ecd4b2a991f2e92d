"""The request-head parser and the ClientHello reader, on real bytes."""

from __future__ import annotations

import ssl

import pytest

from tidegate.gateway.httphead import HeadError, find_head_end, parse_head
from tidegate.gateway.plainhttp import request_framing
from tidegate.gateway.tls import NotTLS, parse_client_hello


def client_hello(server_name: str | None) -> bytes:
    """The first flight a real Python TLS client sends."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    if server_name is None:
        context.check_hostname = False
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("name", ["allowed.test", "a.b.example.com", "xn--bcher-kva.example"])
def test_sni_is_read_from_a_real_client_hello(name: str) -> None:
    hello = client_hello(name)
    assert parse_client_hello(hello).server_name == name
    for cut in (1, 5, 40, len(hello) - 1):
        assert not parse_client_hello(hello[:cut]).complete


def test_client_hello_without_sni() -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    result = parse_client_hello(outgoing.read())
    assert result.complete and result.server_name is None


@pytest.mark.parametrize(
    "data", [b"GET / HTTP/1.1\r\n\r\n", b"SSH-2.0-OpenSSH\r\n", b"\x16\x03\x01\x00\x00"]
)
def test_not_tls(data: bytes) -> None:
    with pytest.raises(NotTLS):
        parse_client_hello(data)


def test_parse_connect_head() -> None:
    raw = b"CONNECT github.com:443 HTTP/1.1\r\nHost: github.com:443\r\nUser-Agent: curl\r\n\r\n"
    assert find_head_end(raw) == len(raw)
    head = parse_head(raw, max_headers=10)
    assert (head.method, head.target, head.version) == ("CONNECT", "github.com:443", "HTTP/1.1")
    assert head.get("host") == "github.com:443"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"CONNECT github.com:443\r\n\r\n", 400),
        (b"CONNECT  github.com:443 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT github.com:443 HTTP/2.0\r\n\r\n", 505),
        (b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1\r\n folded\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"POST http://a/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (
            b"POST http://a/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST http://a/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET http://a/ HTTP/1.1\r\n" + b"X: y\r\n" * 11 + b"\r\n", 431),
    ],
)
def test_malformed_heads(raw: bytes, status: int) -> None:
    with pytest.raises(HeadError) as info:
        request_framing(parse_head(raw, max_headers=10))
    assert info.value.status == status
