"""Address classification for the SSRF guard, and the CIDR index, as pure functions."""

from __future__ import annotations

import ipaddress

import pytest

from tidegate.gateway.addresses import CidrIndex, classify, embedded_ipv4


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("255.255.255.255", "reserved"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (embedded in IPv6)"),
        ("::ffff:169.254.169.254", "link-local (embedded in IPv6)"),
        ("64:ff9b::a9fe:a9fe", "link-local (embedded in IPv6)"),
        ("64:ff9b::10.0.0.1", "private (embedded in IPv6)"),
        ("2002:7f00:0001::1", "loopback (embedded in IPv6)"),
        ("2002:a9fe:a9fe::", "link-local (embedded in IPv6)"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
        ("::127.0.0.1", "ipv4-compatible"),
        ("2001:db8::1", "documentation"),
    ],
)
def test_classify_blocks(address: str, category: str) -> None:
    assert classify(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize(
    "address",
    [
        "140.82.112.3",
        "1.1.1.1",
        "52.216.1.1",
        "100.128.0.1",
        "172.32.0.1",
        "2606:4700:4700::1111",
        "::ffff:140.82.112.3",
        "64:ff9b::8c52:7003",
    ],
)
def test_classify_public(address: str) -> None:
    assert classify(ipaddress.ip_address(address)) is None


def test_embedded_ipv4() -> None:
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4")) == ipaddress.IPv4Address(
        "1.2.3.4"
    )
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700::1")) is None


def test_cidr_index_lookup_returns_every_covering_network() -> None:
    index: CidrIndex[str] = CidrIndex()
    index.add(ipaddress.ip_network("10.0.0.0/8"), "wide")
    index.add(ipaddress.ip_network("10.1.0.0/16"), "narrow")
    index.add(ipaddress.ip_network("10.1.2.3/32"), "one")
    index.add(ipaddress.ip_network("::/0"), "all-v6")
    assert sorted(index.lookup(ipaddress.ip_address("10.1.2.3"))) == ["narrow", "one", "wide"]
    assert index.lookup(ipaddress.ip_address("10.2.0.1")) == ["wide"]
    assert index.lookup(ipaddress.ip_address("11.0.0.1")) == []
    assert index.lookup(ipaddress.ip_address("2001:db8::1")) == ["all-v6"]
    assert index.contains(ipaddress.ip_address("10.200.0.1"))
    assert not index.contains(ipaddress.ip_address("192.168.0.1"))
