"""Address classification for the SSRF guard, and a prefix index for CIDR lookups.

The guard runs on the *resolved* address, the one we will dial, so a public name that
resolves to 127.0.0.1 or 169.254.169.254 is caught. IPv6 forms that carry an IPv4
address inside (IPv4-mapped, NAT64, 6to4) are judged by the address they embed;
Teredo and IPv4-compatible forms are refused outright because the embedded address
is not the one that is reached.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4_SPECIAL: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_SPECIAL: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "ipv4-compatible"),
    ("100::/64", "discard"),
    ("2001::/32", "teredo"),
    ("2001:db8::/32", "documentation"),
    ("2001:10::/28", "reserved"),
    ("2001:20::/28", "reserved"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("64:ff9b:1::/48", "nat64-local"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")

T = TypeVar("T")


class CidrIndex(Generic[T]):
    """Maps networks to values; ``lookup(ip)`` returns the values of every covering network.

    Networks are bucketed by prefix length, so a lookup costs one dict probe per distinct
    prefix length in use (at most 33 for IPv4, 129 for IPv6), whatever the number of
    networks.
    """

    __slots__ = ("_buckets",)

    def __init__(self, items: Iterable[tuple[IPNetwork, T]] = ()) -> None:
        self._buckets: dict[tuple[int, int], dict[int, list[T]]] = {}
        for network, value in items:
            self.add(network, value)

    def add(self, network: IPNetwork, value: T) -> None:
        key = (network.version, network.prefixlen)
        bucket = self._buckets.setdefault(key, {})
        bucket.setdefault(int(network.network_address), []).append(value)

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def _hits(self, ip: IPAddress) -> Iterator[list[T]]:
        """The bucket entries of every network (of any length in use) covering ``ip``."""
        number = int(ip)
        bits = ip.max_prefixlen
        for (version, prefixlen), bucket in self._buckets.items():
            if version != ip.version:
                continue
            shift = bits - prefixlen
            hit = bucket.get((number >> shift) << shift if prefixlen else 0)
            if hit:
                yield hit

    def lookup(self, ip: IPAddress) -> list[T]:
        return [value for hit in self._hits(ip) for value in hit]

    def contains(self, ip: IPAddress) -> bool:
        return next(self._hits(ip), None) is not None


_SPECIAL: CidrIndex[str] = CidrIndex(
    (ipaddress.ip_network(net), label) for net, label in _V4_SPECIAL + _V6_SPECIAL
)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


@functools.lru_cache(maxsize=65_536)  # destinations repeat; the walk is ~30 probes
def classify(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public destination ("loopback", "private", ...), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            label = classify(inner)
            return f"{label} (embedded in IPv6)" if label else None
        if ip.scope_id:
            return "link-local"
    labels = _SPECIAL.lookup(ip)
    if not labels:
        if ip.version == 6 and not ip.is_global:
            return "reserved"
        if ip.version == 4 and int(ip) == 0xFFFFFFFF:
            return "broadcast"
        return None
    # The most specific network wins (e.g. ::1 before ::/96).
    return labels[-1] if len(labels) == 1 else _most_specific(ip)


def _most_specific(ip: IPAddress) -> str:
    best: tuple[int, str] | None = None
    for net, label in _V4_SPECIAL + _V6_SPECIAL:
        network = ipaddress.ip_network(net)
        if network.version == ip.version and ip in network:
            if best is None or network.prefixlen > best[0]:
                best = (network.prefixlen, label)
    assert best is not None
    return best[1]


def parse_network(text: str) -> IPNetwork:
    """Parse a CIDR strictly (host bits must be zero), or raise ValueError."""
    return ipaddress.ip_network(text.strip(), strict=True)
