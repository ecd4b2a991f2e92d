"""PROXY protocol parser tables: v1 and v2, valid, truncated, split, oversized, garbage."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tidegate.gateway.proxyproto import (
    V1_MAX_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    TrustedPeers,
    parse_proxy_header,
)

MAX_V2 = 512
REQUEST = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"


def v2(
    command: int = 0x1,
    family: int = 0x11,
    block: bytes | None = None,
    *,
    version: int = 0x2,
    length: int | None = None,
) -> bytes:
    if block is None:
        block = bytes([203, 0, 113, 7, 10, 0, 0, 5]) + struct.pack("!HH", 51000, 3128)
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + block


def v6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def parse(data: bytes) -> ProxyHeader | None:
    return parse_proxy_header(data, max_v2_bytes=MAX_V2)


def source(header: ProxyHeader | None) -> tuple[str, int] | None:
    assert header is not None
    return None if header.source is None else (str(header.source[0]), header.source[1])


# --- valid headers ----------------------------------------------------------------------------

VALID = [
    pytest.param(
        b"PROXY TCP4 203.0.113.7 10.0.0.5 51000 3128\r\n",
        (1, "proxy", ("203.0.113.7", 51000)),
        id="v1-tcp4",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        (1, "proxy", ("0.0.0.0", 0)),
        id="v1-tcp4-edges",
    ),
    pytest.param(
        b"PROXY TCP6 2001:db8::7 2001:db8::1 443 3128\r\n",
        (1, "proxy", ("2001:db8::7", 443)),
        id="v1-tcp6",
    ),
    pytest.param(
        b"PROXY TCP6 FFFF:ffff:ffff:ffff:ffff:ffff:ffff:ffff ::1 65535 65535\r\n",
        (1, "proxy", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
        id="v1-tcp6-longest",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", (1, "local", None), id="v1-unknown-short"),
    pytest.param(
        b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
        (1, "local", None),
        id="v1-unknown-long-ignored",
    ),
    pytest.param(v2(), (2, "proxy", ("203.0.113.7", 51000)), id="v2-tcp4"),
    pytest.param(
        v2(family=0x21, block=v6_block("2001:db8::7", "fd00::1", 40000, 3128)),
        (2, "proxy", ("2001:db8::7", 40000)),
        id="v2-tcp6",
    ),
    pytest.param(v2(family=0x12), (2, "proxy", ("203.0.113.7", 51000)), id="v2-udp4"),
    pytest.param(v2(command=0x0, family=0x00, block=b""), (2, "local", None), id="v2-local"),
    pytest.param(
        v2(command=0x0, family=0x11), (2, "local", None), id="v2-local-with-addresses-ignored"
    ),
    pytest.param(
        v2(command=0x0, family=0x11, block=b"\xff" * 5),
        (2, "local", None),
        id="v2-local-block-not-parsed",
    ),
    pytest.param(v2(family=0x00, block=b""), (2, "proxy", None), id="v2-proxy-unspec-keeps-peer"),
    pytest.param(v2(family=0x01, block=b""), (2, "proxy", None), id="v2-unspec-family-keeps-peer"),
    pytest.param(v2(family=0x10), (2, "proxy", None), id="v2-unspec-transport-keeps-peer"),
    pytest.param(
        v2(family=0x31, block=b"/tmp/a".ljust(108, b"\0") * 2),
        (2, "proxy", None),
        id="v2-unix-keeps-peer",
    ),
    pytest.param(
        v2(
            block=bytes([198, 51, 100, 9, 10, 0, 0, 5])
            + struct.pack("!HH", 1, 2)
            + tlv(0xEA, b"\x01vpce-0123456789abcdef0")
            + tlv(0x04, b"")
            + tlv(0x20, b"\x00" * 40)
        ),
        (2, "proxy", ("198.51.100.9", 1)),
        id="v2-tlvs-ignored",
    ),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_headers(data: bytes, expected: tuple[int, str, tuple[str, int] | None]) -> None:
    header = parse(data)
    assert header is not None
    assert (header.version, header.command, source(header)) == expected
    assert header.length == len(data)


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_request_bytes_after_the_header_are_not_consumed(
    data: bytes, expected: tuple[int, str, tuple[str, int] | None]
) -> None:
    header = parse(data + REQUEST)
    assert header is not None and header.length == len(data)
    assert source(header) == expected[2]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_split_across_reads_every_prefix_waits(
    data: bytes, expected: tuple[int, str, tuple[str, int] | None]
) -> None:
    for cut in range(len(data)):
        assert parse(data[:cut]) is None, f"prefix of {cut} bytes"
    assert source(parse(data)) == expected[2]


def test_v2_destination_and_family_are_reported() -> None:
    header = parse(v2(family=0x21, block=v6_block("2001:db8::7", "fd00::1", 40000, 3128)))
    assert header is not None and header.family == "tcp6"
    assert header.destination == (ipaddress.IPv6Address("fd00::1"), 3128)
    v1 = parse(b"PROXY TCP4 203.0.113.7 10.0.0.5 51000 3128\r\n")
    assert v1 is not None and v1.destination == (ipaddress.IPv4Address("10.0.0.5"), 3128)


def test_the_longest_v1_line_is_accepted() -> None:
    line = b"PROXY UNKNOWN " + b"f" * (V1_MAX_BYTES - 16) + b"\r\n"
    assert len(line) == V1_MAX_BYTES
    header = parse(line)
    assert header is not None and header.length == V1_MAX_BYTES


def test_v2_at_the_size_limit_is_accepted_and_one_byte_more_is_not() -> None:
    fixed = 16 + 12
    at_limit = v2(block=v2()[16:] + tlv(0x04, b"\0" * (MAX_V2 - fixed - 3)))
    assert len(at_limit) == MAX_V2
    assert parse(at_limit) is not None
    over = v2(block=v2()[16:] + tlv(0x04, b"\0" * (MAX_V2 - fixed - 2)))
    with pytest.raises(ProxyHeaderError, match="limit"):
        parse(over)


# --- refused -----------------------------------------------------------------------------------

INVALID = [
    pytest.param(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", "no PROXY", id="plain-request"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01", "no PROXY", id="tls-hello"),
    pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY", id="lowercase"),
    pytest.param(b"PROXY\r\n", "no PROXY", id="v1-no-space"),
    pytest.param(b"PROXYTCP4", "no PROXY", id="v1-no-space-glued"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CR or LF", id="v1-bare-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR or LF", id="v1-bare-cr"),
    pytest.param(b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "CR or LF", id="v1-cr-inside"),
    pytest.param(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "expected", id="v1-double-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "expected", id="v1-trailing-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected", id="v1-missing-port"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol", id="v1-tcp5"),
    pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol", id="v1-udp4"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "not an IPv4", id="v1-leading-zero-octet"),
    pytest.param(b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "not an IPv4", id="v1-octet-too-big"),
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "not an IPv4", id="v1-three-octets"),
    pytest.param(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not an IPv4", id="v1-tcp4-with-v6"),
    pytest.param(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6", id="v1-tcp6-with-v4"),
    pytest.param(b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", "not an IPv6", id="v1-tcp6-dotted-tail"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an IPv6", id="v1-tcp6-zone"),
    pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "not an IPv6", id="v1-tcp6-too-long"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "not a port", id="v1-port-too-big"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "not a port", id="v1-port-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not a port", id="v1-port-negative"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "not a port", id="v1-port-plus"),
    pytest.param(b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n", "printable", id="v1-non-ascii"),
    pytest.param(b"PROXY TCP4 1.2.3.4\x005.6.7.8", "printable", id="v1-nul-early"),
    pytest.param(b"PROXY UNKNOWN " + b"f" * 100 + b"\r\n", "no CRLF within 107", id="v1-108-bytes"),
    pytest.param(b"PROXY " + b"A" * 200, "no CRLF within 107", id="v1-endless"),
    pytest.param(V2_SIGNATURE[:11] + b"X", "no PROXY", id="v2-bad-signature"),
    pytest.param(b"\r\n\r\nGET / HTTP/1.1", "no PROXY", id="v2-signature-lookalike"),
    pytest.param(v2(version=0x1), "version 1", id="v2-version-1"),
    pytest.param(v2(version=0x3), "version 3", id="v2-version-3"),
    pytest.param(v2(command=0x2), "unknown command", id="v2-command-2"),
    pytest.param(v2(command=0xF), "unknown command", id="v2-command-f"),
    pytest.param(v2(family=0x13), "family/transport", id="v2-transport-3"),
    pytest.param(v2(family=0x41), "family/transport", id="v2-family-4"),
    pytest.param(v2(block=b"\x01\x02\x03\x04"), "needs 12", id="v2-tcp4-short-block"),
    pytest.param(v2(family=0x21), "needs 36", id="v2-tcp6-with-v4-block"),
    pytest.param(v2(family=0x31, block=b"\0" * 100), "needs 216", id="v2-unix-short-block"),
    pytest.param(v2(block=v2()[16:] + b"\x04\x00"), "truncated TLV", id="v2-tlv-truncated-head"),
    pytest.param(v2(block=v2()[16:] + b"\x04\x00\x05abc"), "past the end", id="v2-tlv-overruns"),
    pytest.param(
        v2(block=v2()[16:] + tlv(1, b"h2") + b"\xea\xff\xff"),
        "past the end",
        id="v2-second-tlv-overruns",
    ),
    pytest.param(v2(length=0xFFFF, block=b""), "limit", id="v2-announces-64k"),
]


@pytest.mark.parametrize(("data", "error"), INVALID)
def test_invalid_headers_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(ProxyHeaderError, match=error):
        parse(data)


def test_wrong_bytes_are_refused_without_waiting_for_more() -> None:
    """A slowloris or a plain client is refused on its first wrong byte, not at a timeout."""
    for data in (
        b"G",
        b"PROXX",
        b"\r\n\r\n\x00\r\nQUIX",
        V2_SIGNATURE + b"\x11",
        V2_SIGNATURE + b"\x21\x99",
    ):
        with pytest.raises(ProxyHeaderError):
            parse(data)
    with pytest.raises(ProxyHeaderError, match="limit"):  # before the 64 KiB arrive
        parse(V2_SIGNATURE + b"\x21\x11\xff\xff")


def test_truncated_headers_wait_and_never_pass() -> None:
    for data in (
        b"PROXY TCP4 203.0.113.7 10.0.0.5 51000 3128\r",
        b"PROXY TCP4 203.0.113.7",
        v2()[:-1],
        v2()[:15],
        v2(family=0x21, block=v6_block("::1", "::1", 1, 2))[:40],
    ):
        assert parse(data) is None


def test_byte_at_a_time_never_accepts_a_longer_garbage_line() -> None:
    """Fed one byte at a time, a line without CRLF is refused exactly at the 107-byte bound."""
    data = b"PROXY UNKNOWN " + b"a" * 300
    for cut in range(1, V1_MAX_BYTES):
        assert parse(data[:cut]) is None
    with pytest.raises(ProxyHeaderError):
        parse(data[:V1_MAX_BYTES])


# --- who may send one --------------------------------------------------------------------------


def test_trusted_peers() -> None:
    peers = TrustedPeers.parse(["10.0.0.0/8", "fd00::/8"])
    assert peers
    assert peers.trusts(ipaddress.ip_address("10.1.2.3"))
    assert peers.trusts(ipaddress.ip_address("::ffff:10.1.2.3"))  # dual-stack listener form
    assert peers.trusts(ipaddress.ip_address("fd12::1"))
    assert not peers.trusts(ipaddress.ip_address("192.168.1.1"))
    assert not peers.trusts(ipaddress.ip_address("::ffff:192.168.1.1"))
    assert not peers.trusts(ipaddress.ip_address("fe80::1"))
    assert not TrustedPeers([])
    assert not TrustedPeers([]).trusts(ipaddress.ip_address("10.1.2.3"))
    with pytest.raises(ValueError):
        TrustedPeers.parse(["10.0.0.1/8"])  # host bits set: a typo, refused
