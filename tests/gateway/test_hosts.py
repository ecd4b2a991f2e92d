"""Host normalisation and host patterns, as pure functions."""

from __future__ import annotations

import pytest

from tidegate.gateway.hosts import (
    Host,
    HostError,
    HostPattern,
    normalize_host,
    parse_host_pattern,
    split_host_port,
)


@pytest.mark.parametrize(
    ("raw", "kind", "canonical"),
    [
        ("GitHub.COM", "name", "github.com"),
        ("github.com.", "name", "github.com"),
        ("  github.com ", "name", "github.com"),
        ("bücher.example", "name", "xn--bcher-kva.example"),
        ("BÜCHER.example", "name", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "name", "xn--bcher-kva.example"),
        ("_dmarc.example.com", "name", "_dmarc.example.com"),
        ("127.0.0.1", "ip", "127.0.0.1"),
        ("2130706433", "ip", "127.0.0.1"),
        ("0x7f.1", "ip", "127.0.0.1"),
        ("0x7f000001", "ip", "127.0.0.1"),
        ("017700000001", "ip", "127.0.0.1"),
        ("127.1", "ip", "127.0.0.1"),
        ("127.0.1", "ip", "127.0.0.1"),
        ("0251.0376.0251.0376", "ip", "169.254.169.254"),
        ("[::1]", "ip", "::1"),
        ("::FFFF:127.0.0.1", "ip", "::ffff:7f00:1"),
        ("[2001:DB8::1]", "ip", "2001:db8::1"),
    ],
)
def test_normalize_host(raw: str, kind: str, canonical: str) -> None:
    host = normalize_host(raw)
    assert (host.kind, host.name) == (kind, canonical)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "a..b",
        "-lead.example",
        "trail-.example",
        "sp ace.example",
        "a" * 64 + ".example",
        ".".join(["abcdefgh"] * 40),
        "1.2.3.256",
        "1.2.3.4.5",
        "0x1g.1",
        "08.1.1.1",
        "[::1",
        "[not-v6]",
        "exa$mple.com",
        "ex\u200bample.com\u0000",
    ],
)
def test_normalize_host_rejects(raw: str) -> None:
    with pytest.raises(HostError):
        normalize_host(raw)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("github.com:443", ("github.com", 443)),
        ("[::1]:8443", ("[::1]", 8443)),
        ("a.b:1", ("a.b", 1)),
        ("a.b:65535", ("a.b", 65535)),
    ],
)
def test_split_host_port(target: str, expected: tuple[str, int]) -> None:
    assert split_host_port(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "github.com",
        "github.com:",
        "github.com:0",
        "github.com:70000",
        "::1:443",
        "[::1]443",
        "github.com:+443",
        "github.com:4 43",
        "github.com:0x1bb",
    ],
)
def test_split_host_port_rejects(target: str) -> None:
    with pytest.raises(HostError):
        split_host_port(target)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("github.com", HostPattern("exact", "github.com")),
        ("GitHub.com.", HostPattern("exact", "github.com")),
        ("*.githubusercontent.com", HostPattern("suffix", "*.githubusercontent.com")),
        ("ec2.*.amazonaws.com", HostPattern("middle", "ec2.*.amazonaws.com")),
        ("*.bücher.example", HostPattern("suffix", "*.xn--bcher-kva.example")),
        ("10.1.2.3", Host("ip", "10.1.2.3", normalize_host("10.1.2.3").ip)),
    ],
)
def test_parse_host_pattern(raw: str, expected: object) -> None:
    assert parse_host_pattern(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "*",
        "*.",
        "*.com",
        "a.*",
        "**.example.com",
        "a*.example.com",
        "*.*.example.com",
        "a.*.*.example.com",
        "exa mple.com",
        "",
    ],
)
def test_parse_host_pattern_rejects(raw: str) -> None:
    with pytest.raises(HostError):
        parse_host_pattern(raw)


def test_pattern_suffix_property() -> None:
    assert HostPattern("suffix", "*.x.com").suffix == "x.com"
    assert HostPattern("exact", "x.com").suffix == "x.com"
