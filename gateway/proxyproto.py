"""PROXY protocol (v1 text and v2 binary): the client address a load balancer hands on.

Why: behind a load balancer that does not preserve the client address, every connection
arrives from the balancer's own address, so clientCIDRs and policy ``sources`` would judge
the balancer instead of the client. A balancer speaking the PROXY protocol writes the
client's address in a short header before the first byte of the client's stream.

Why strict: the header decides who the client *is*, so anything that does not match the
specification exactly is refused rather than guessed at (haproxy's proxy-protocol.txt):
exact signatures, single spaces, no leading zeros, no bare CR or LF, the v1 line within
107 bytes, v2 version nibble 2, command LOCAL or PROXY, only the family/transport bytes the
specification lists, every TLV inside the announced length. Whether a peer may send a
header at all is the listener's decision (``TrustedPeers``), never this parser's.

The parser is pure and incremental: ``parse_proxy_header`` is called with everything
received so far and answers "need more" (None), a ``ProxyHeader`` with the number of bytes
it used (the request may follow in the same read), or raises ``ProxyHeaderError`` as soon
as the bytes so far can no longer become a valid header (so a wrong first byte is refused at
once, not after a timeout).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .addresses import CidrIndex, IPAddress, IPNetwork, parse_network

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_BYTES = 107  # "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n", the specification's worst case
V2_FIXED_BYTES = 16  # signature, version/command, family/transport, length
# The 14th byte: address family (high nibble) -> (name, address block size), and
# transport (low nibble) -> name. Other nibble values must be refused.
_V2_FAMILIES: dict[int, tuple[str, int]] = {0x0: ("", 0), 0x1: ("4", 12), 0x2: ("6", 36)}
_V2_FAMILIES[0x3] = ("unix", 216)
_V2_TRANSPORTS: dict[int, str] = {0x0: "", 0x1: "tcp", 0x2: "udp"}
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_TLV_HEAD = 3  # type, length high, length low
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
# Decimal without leading zeros (octal confusion); IPv6 as hex groups and colons only (no
# zone, no dotted IPv4 tail, no brackets). Range checks are left to int() and ipaddress.
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,4})\Z")
_IPV4 = re.compile(r"(?:(?:0|[1-9][0-9]{0,2})\.){3}(?:0|[1-9][0-9]{0,2})\Z")
_IPV6 = re.compile(r"[0-9A-Fa-f:]{2,39}\Z")


class ProxyHeaderError(ValueError):
    """The bytes are not (and can no longer become) a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    ``source`` is the client's address and port, or None when the header says to keep the
    connection's own peer (v2 LOCAL, a health check by the balancer itself; v1 UNKNOWN; v2
    families other than TCP/UDP over IPv4/IPv6).
    """

    version: int
    command: str  # "proxy" or "local"
    family: str  # "tcp4", "tcp6", "udp4", "udp6", "unix", "unspec", "unknown"
    source: tuple[IPAddress, int] | None
    destination: tuple[IPAddress, int] | None
    length: int  # bytes of the stream the header used


def parse_proxy_header(data: bytes | bytearray, *, max_v2_bytes: int) -> ProxyHeader | None:
    """Parse the header at the start of ``data``; None while more bytes are needed.

    ``max_v2_bytes`` bounds a v2 header (16 fixed bytes plus addresses and TLVs); a larger
    announced length is refused as soon as the fixed part has arrived.
    """
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data, max_v2_bytes)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header (the connection must start with one)")


# --- version 1 ----------------------------------------------------------------------------


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    prefix = bytes(data[: len(V1_PREFIX)])
    if not V1_PREFIX.startswith(prefix):
        raise ProxyHeaderError("no PROXY protocol header (the connection must start with one)")
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    line = bytes(data[: end if end >= 0 else V1_MAX_BYTES])
    bare = line.find(b"\r")
    if 0 <= bare < len(line) - 1 or b"\n" in line:
        raise ProxyHeaderError("v1 header: CR or LF inside the line")
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError(f"v1 header: no CRLF within {V1_MAX_BYTES} bytes")
        if _NOT_PRINTABLE.search(line[:-1] if line.endswith(b"\r") else line):
            raise ProxyHeaderError("v1 header: not printable US-ASCII")
        return None
    length = end + 2
    if _NOT_PRINTABLE.search(line):
        raise ProxyHeaderError("v1 header: not printable US-ASCII")
    parts = line.decode("ascii").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # The specification: ignore whatever follows up to the CRLF, keep the real peer.
        return ProxyHeader(1, "local", "unknown", None, None, length)
    if len(parts) != 6:
        raise ProxyHeaderError("v1 header: expected PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    _, protocol, src, dst, sport, dport = parts
    source: IPAddress
    destination: IPAddress
    if protocol == "TCP4":
        source, destination = _v1_ipv4(src), _v1_ipv4(dst)
        family = "tcp4"
    elif protocol == "TCP6":
        source, destination = _v1_ipv6(src), _v1_ipv6(dst)
        family = "tcp6"
    else:
        raise ProxyHeaderError(f"v1 header: unknown protocol {protocol[:16]!r}")
    return ProxyHeader(
        1,
        "proxy",
        family,
        (source, _v1_port(sport)),
        (destination, _v1_port(dport)),
        length,
    )


def _v1_ipv4(text: str) -> ipaddress.IPv4Address:
    if not _IPV4.match(text):
        raise ProxyHeaderError(f"v1 header: {text[:40]!r} is not an IPv4 address")
    try:
        return ipaddress.IPv4Address(text)  # octets above 255
    except ValueError:
        raise ProxyHeaderError(f"v1 header: {text[:40]!r} is not an IPv4 address") from None


def _v1_ipv6(text: str) -> ipaddress.IPv6Address:
    if not _IPV6.match(text):
        raise ProxyHeaderError(f"v1 header: {text[:40]!r} is not an IPv6 address")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: {text[:40]!r} is not an IPv6 address") from None


def _v1_port(text: str) -> int:
    if not _DECIMAL.match(text) or int(text) > 65535:
        raise ProxyHeaderError(f"v1 header: {text[:8]!r} is not a port")
    return int(text)


# --- version 2 ----------------------------------------------------------------------------


def _parse_v2(data: bytes | bytearray, max_bytes: int) -> ProxyHeader | None:
    seen = bytes(data[: len(V2_SIGNATURE)])
    if not V2_SIGNATURE.startswith(seen):
        raise ProxyHeaderError("no PROXY protocol header (the connection must start with one)")
    if len(data) > len(V2_SIGNATURE):
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            raise ProxyHeaderError(f"v2 header: version {version}, expected 2")
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyHeaderError(f"v2 header: unknown command {command:#x}")
    if len(data) > 13 and (
        data[13] >> 4 not in _V2_FAMILIES or data[13] & 0xF not in _V2_TRANSPORTS
    ):
        raise ProxyHeaderError(f"v2 header: unknown family/transport {data[13]:#04x}")
    if len(data) < V2_FIXED_BYTES:
        return None
    (announced,) = struct.unpack_from("!H", data, 14)
    total = V2_FIXED_BYTES + announced
    if total > max_bytes:
        raise ProxyHeaderError(f"v2 header: {total} bytes, more than the limit of {max_bytes}")
    if len(data) < total:
        return None
    block = bytes(data[V2_FIXED_BYTES:total])
    if data[12] & 0x0F == _V2_LOCAL:
        # The balancer's own connection (a health check): the block is ignored entirely.
        return ProxyHeader(2, "local", "unspec", None, None, total)
    address_family, size = _V2_FAMILIES[data[13] >> 4]
    transport = _V2_TRANSPORTS[data[13] & 0xF]
    if not address_family or not transport:
        # The balancer relays a connection it cannot describe: the specification says to
        # ignore the address block and use the connection's own peer.
        return ProxyHeader(2, "proxy", "unspec", None, None, total)
    family = "unix" if address_family == "unix" else transport + address_family
    if announced < size:
        raise ProxyHeaderError(f"v2 header: {announced} address bytes, {family} needs {size}")
    _check_tlvs(block[size:])
    if family == "unix":
        return ProxyHeader(2, "proxy", family, None, None, total)
    width = 4 if size == 12 else 16
    src = ipaddress.ip_address(block[:width])
    dst = ipaddress.ip_address(block[width : 2 * width])
    sport, dport = struct.unpack_from("!HH", block, 2 * width)
    return ProxyHeader(2, "proxy", family, (src, sport), (dst, dport), total)


def _check_tlvs(tail: bytes) -> None:
    """Skip the TLVs after the addresses, refusing any that runs past the header's end."""
    offset = 0
    while offset < len(tail):
        if len(tail) - offset < _TLV_HEAD:
            raise ProxyHeaderError("v2 header: truncated TLV")
        (value_length,) = struct.unpack_from("!H", tail, offset + 1)
        offset += _TLV_HEAD + value_length
        if offset > len(tail):
            raise ProxyHeaderError("v2 header: a TLV runs past the end of the header")


def looks_like_proxy_header(data: bytes | bytearray) -> bool:
    """Whether a stream starts like a PROXY protocol header (to name the mistake when one
    arrives where none is expected, instead of calling it a malformed request)."""
    return data[:6] == V1_PREFIX or data[:12] == V2_SIGNATURE


# --- who may send one ---------------------------------------------------------------------


class TrustedPeers:
    """The peer ranges whose connections must start with a PROXY header.

    A connection from any other peer is a direct client: its own address is its identity
    and any PROXY header it sends is just an invalid request. So a client can never name an
    address for itself; only a peer in these ranges (the load balancer) can.
    """

    __slots__ = ("_index", "networks")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._index: CidrIndex[bool] = CidrIndex((n, True) for n in self.networks)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> TrustedPeers:
        return cls(parse_network(text) for text in texts)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, peer: IPAddress) -> bool:
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped  # a dual-stack listener reports IPv4 peers this way
        return self._index.contains(peer)
