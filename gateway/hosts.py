"""Host normalisation: the one place where a client-supplied host becomes canonical.

Every comparison in the policy engine happens on the output of :func:`normalize_host`,
so a name can never slip past a rule by spelling: case, a trailing dot, Unicode (IDNA
2008 via UTS-46 mapping), bracketed IPv6, and the legacy numeric IPv4 forms that
``inet_aton`` accepts (``2130706433``, ``0x7f.1``, ``017700000001``, ``127.1``) all
collapse to one value here. Numeric forms become IP literals, so they meet the SSRF
guard and never match a name rule.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HostKind = Literal["name", "ip"]

MAX_NAME_LENGTH = 253
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_LABEL_RE = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class HostError(ValueError):
    """A host (or host pattern) that cannot be a destination; the message says why."""


@dataclass(frozen=True, slots=True)
class Host:
    """A canonical destination host: a lower-case ASCII name or an IP address."""

    kind: HostKind
    name: str  # canonical text: punycode name, or the compressed IP literal
    ip: IPAddress | None = None

    def __str__(self) -> str:
        return self.name


def _parse_inet_aton_part(part: str) -> int:
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if not all(c in "01234567" for c in part):
            raise HostError(f"invalid octal IPv4 component {part!r}")
        return int(part, 8)
    return int(part, 10)


def parse_numeric_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """Parse the forms ``inet_aton`` accepts; None when ``text`` is not numeric at all.

    Raises HostError for a numeric-looking host that is not a valid address (such as
    ``1.2.3.256``): browsers and libc disagree on those, so we refuse them outright.
    """
    parts = text.split(".")
    if not _NUMERIC_LABEL_RE.match(parts[-1]):
        return None
    if len(parts) > 4 or not all(_NUMERIC_LABEL_RE.match(p) for p in parts):
        raise HostError(f"{text!r} looks like an IPv4 address but is not one")
    values = [_parse_inet_aton_part(p) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise HostError(f"{text!r} looks like an IPv4 address but is out of range")
    number = 0
    for v in head:
        number = number * 256 + v
    number = (number << (8 * (4 - len(head)))) | last
    return ipaddress.IPv4Address(number)


def _ascii_name(text: str) -> str:
    if text.isascii():
        return text.lower()
    try:
        return idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise HostError(f"invalid internationalised name {text!r}: {exc}") from None


def _check_name(name: str, original: str) -> None:
    if len(name) > MAX_NAME_LENGTH:
        raise HostError(f"name {original!r} is longer than {MAX_NAME_LENGTH} characters")
    for label in name.split("."):
        if not _LABEL_RE.match(label):
            raise HostError(f"invalid label {label!r} in {original!r}")


def normalize_host(raw: str) -> Host:
    """Return the canonical form of a destination host, or raise HostError."""
    text = raw.strip()
    if not text:
        raise HostError("empty host")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            v6 = ipaddress.IPv6Address(text)
        except ValueError:
            raise HostError(f"invalid IPv6 literal {raw!r}") from None
        return Host("ip", v6.compressed, v6)
    if ":" in text:
        try:
            v6 = ipaddress.IPv6Address(text)
        except ValueError:
            raise HostError(f"invalid host {raw!r}") from None
        return Host("ip", v6.compressed, v6)
    if text.endswith("."):
        text = text[:-1]
    if not text or ".." in text:
        raise HostError(f"invalid host {raw!r}")
    name = _ascii_name(text)
    v4 = parse_numeric_ipv4(name)
    if v4 is not None:
        return Host("ip", str(v4), v4)
    _check_name(name, raw)
    return Host("name", name)


def split_host_port(target: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` (a CONNECT authority) into its parts."""
    if target.startswith("["):
        close = target.find("]")
        if close < 0 or target[close + 1 : close + 2] != ":":
            raise HostError(f"invalid authority {target!r}")
        host, port_text = target[: close + 1], target[close + 2 :]
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or ":" in host:
            raise HostError(f"authority {target!r} must be host:port")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise HostError(f"invalid port in {target!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise HostError(f"port {port} out of range in {target!r}")
    return host, port


# --- patterns ---------------------------------------------------------------------------

PatternKind = Literal["exact", "suffix", "middle"]


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A normalised host rule.

    - ``exact``: ``github.com``
    - ``suffix``: ``*.x.com`` - any name below ``x.com`` (one or more labels), never the apex
    - ``middle``: ``ec2.*.amazonaws.com`` - exactly one label, anywhere but first
    """

    kind: PatternKind
    text: str  # canonical pattern text, the index key

    @property
    def suffix(self) -> str:
        return self.text[2:] if self.kind == "suffix" else self.text


def parse_host_pattern(raw: str) -> HostPattern | Host:
    """Normalise a rule's ``host``; an IP literal comes back as a Host (a /32 or /128)."""
    text = raw.strip().lower()
    if text in ("*", "*.", ""):
        raise HostError("a bare '*' would allow everything; list the domains instead")
    if "*" not in text:
        host = normalize_host(text)
        if host.kind == "ip":
            return host
        return HostPattern("exact", host.name)
    if text.endswith("."):
        text = text[:-1]
    labels = text.split(".")
    stars = [i for i, label in enumerate(labels) if "*" in label]
    if len(stars) != 1:
        raise HostError(f"{raw!r}: at most one '*' label is allowed")
    where = stars[0]
    if labels[where] != "*":
        raise HostError(f"{raw!r}: '*' must be a whole label (like '*.example.com')")
    rest = [label for i, label in enumerate(labels) if i != where]
    if len(rest) < 2 and where == 0:
        raise HostError(f"{raw!r}: a wildcard needs at least two labels after it")
    if where == len(labels) - 1:
        raise HostError(f"{raw!r}: the wildcard cannot be the top-level label")
    canonical = []
    for i, label in enumerate(labels):
        if i == where:
            canonical.append("*")
            continue
        ascii_label = _ascii_name(label)
        if not _LABEL_RE.match(ascii_label):
            raise HostError(f"invalid label {label!r} in {raw!r}")
        canonical.append(ascii_label)
    joined = ".".join(canonical)
    if len(joined) > MAX_NAME_LENGTH:
        raise HostError(f"{raw!r} is longer than {MAX_NAME_LENGTH} characters")
    return HostPattern("suffix" if where == 0 else "middle", joined)
