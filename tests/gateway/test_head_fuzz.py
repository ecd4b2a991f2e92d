"""Differential fuzz: the gateway's hand-written head parser against h11.

Thousands of generated request heads - built from the pieces request-smuggling reports are
made of (duplicate and comma-listed lengths, odd transfer codings, bare CR and LF, obs-fold,
control characters, odd versions) - go through both ``parse_head`` + ``request_framing``
and h11's server-side parser. The rules checked:

- whatever the gateway accepts, h11 accepts too, as the same method, target, version and
  fields, with the same body length (or both chunked);
- whatever the gateway refuses and h11 accepts shows one of the documented places where the
  gateway is stricter (``STRICTER``); anything else is a disagreement and fails the test;
- whatever h11 refuses, the gateway refuses, except a missing Host header, which the
  gateway tolerates on purpose (old CONNECT clients omit it; an absolute-form request
  carries its host in the URI).
"""

from __future__ import annotations

import re

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.gateway.httphead import HeadError, find_head_end, parse_head
from tidegate.gateway.plainhttp import CHUNKED, request_framing

MAX_HEADERS = 100

METHODS = ["GET", "POST", "CONNECT", "PUT", "HEAD", "G ET", "GET\x00", "", "get", "M-SEARCH"]
TARGETS = [
    "http://a.test/x",
    "http://a.test:8080/p?q=1",
    "a.test:443",
    "/origin",
    "*",
    "http://a.test/\x7f",
    "http://a.test/\xe9",
    "http://a.test/a b",
    "http://a.test/\tx",
    "",
]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.10", "http/1.1", "HTTP/1.1 ", "HTTP/0.9"]
NAMES = [
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "X-A",
    "x-a ",
    " X-A",
    "X-A\n",
    "X\rA",
    "",
    "X A",
    "Ü",
    "content-length",
    "TRANSFER-ENCODING",
]
VALUES = [
    "a.test",
    "a.test:8080",
    "5",
    "0",
    "05",
    "5, 5",
    "5,6",
    "-1",
    "+5",
    " 5",
    "5 ",
    "\u00b2",
    "1" * 21,
    "",
    "chunked",
    "Chunked",
    "chunked, chunked",
    "xchunked",
    "gzip",
    "chunked, gzip",
    "gzip, chunked",
    "chunked\t",
    "close",
    "transfer-encoding",
    "a\x01b",
    "a\x7fb",
    "a\x00b",
    "a\tb",
    "a  b",
    "caf\xe9",
    "a\rb",
    "a\nb",
    "a\x0bb",
]
ENDINGS = ["\r\n"] * 12 + ["\n", "\r", "\r\r\n"]

# The places where the gateway is deliberately stricter than h11 (each a smuggling vector
# somewhere, or a request no proxy needs): name -> predicate on the raw head.
STRICTER = {
    "bare LF or CR line ending": lambda raw, head: bool(re.search(rb"(?<!\r)\n|\r(?!\n)", raw)),
    "obsolete line folding": lambda raw, head: bool(re.search(rb"\r\n[ \t]", raw[:-4])),
    "empty line before the request line": lambda raw, head: raw.startswith((b"\r\n", b"\n")),
    "control character in a field value": lambda raw, head: _has_control(head),
    "Transfer-Encoding with Content-Length": lambda raw, head: (
        _has(head, b"transfer-encoding") and _has(head, b"content-length")
    ),
    "Transfer-Encoding on HTTP/1.0": lambda raw, head: (
        _has(head, b"transfer-encoding") and head.http_version == b"1.0"
    ),
    "comma-listed Content-Length": lambda raw, head: any(
        n == b"content-length" and b"," in v for n, v in _raw_fields(raw)
    ),
    "HTTP version other than 1.0 and 1.1": lambda raw, head: (
        head.http_version not in (b"1.0", b"1.1")
    ),
    "a body on CONNECT": lambda raw, head: head.method == b"CONNECT",
}


def _raw_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    lines = raw.split(b"\r\n")[1:]
    out = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep:
            out.append((name.strip().lower(), value.strip()))
    return out


def _has(head: h11.Request, name: bytes) -> bool:
    return any(n == name for n, _ in head.headers)


def _has_control(head: h11.Request) -> bool:
    return any(re.search(rb"[\x01-\x08\x0b-\x1f\x7f]", v) for _, v in head.headers)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS) | st.from_regex(r"[A-Z]{1,7}", fullmatch=True))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from(VERSIONS[:2] * 6 + VERSIONS))
    lines = [f"{method} {target} {version}"]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):  # the framing fields, where smuggling lives
            name = draw(st.sampled_from(["Content-Length", "Transfer-Encoding", "Host"]))
            value = draw(st.sampled_from(VALUES[:24]))
        else:
            name = draw(st.sampled_from(NAMES))
            value = draw(st.sampled_from(VALUES) | st.text("abc ,;=\t\x01\x7f", max_size=6))
        sep = draw(st.sampled_from([":", ": ", ":\t", " :", "::"]))
        if draw(st.integers(0, 15)) == 0:
            lines.append(" folded")
        lines.append(f"{name}{sep}{value}")
    prefix = draw(st.sampled_from(["", "", "", "", "\r\n"]))
    text = prefix
    for line in lines:
        text += line + draw(st.sampled_from(ENDINGS))
    return (text + "\r\n").encode("latin-1")


def ours(raw: bytes) -> tuple[str, str, str, list[tuple[str, str]], int] | None:
    try:
        end = find_head_end(raw)
        if end != len(raw):
            return None
        head = parse_head(raw, max_headers=MAX_HEADERS)
        framing = request_framing(head)
        if head.method == "CONNECT" and framing != 0:
            return None  # admission refuses a body on CONNECT
    except HeadError:
        return None
    return head.method, head.target, head.version, head.headers, framing


def theirs(raw: bytes) -> tuple[h11.Request, int] | None:
    conn = h11.Connection(h11.SERVER)
    try:
        conn.receive_data(raw)
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    names = [n for n, _ in event.headers]
    if b"transfer-encoding" in names:
        return event, CHUNKED
    lengths = [v for n, v in event.headers if n == b"content-length"]
    return event, int(lengths[0]) if lengths else 0


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
def test_parser_agrees_with_h11(raw: bytes) -> None:
    mine, other = ours(raw), theirs(raw)
    if mine is not None:
        if other is None:  # the one leniency: no Host header on HTTP/1.1
            assert mine[2] == "HTTP/1.1", f"gateway accepts what h11 refuses: {raw!r}"
            assert not any(n.lower() == "host" for n, _ in mine[3]), raw
            return
        event, length = other
        method, target, version, headers, framing = mine
        assert (event.method.decode(), event.target.decode("latin-1")) == (method, target)
        assert f"HTTP/{event.http_version.decode()}" == version
        theirs_fields = [(n.decode(), v.decode("latin-1")) for n, v in event.headers]
        mine_fields = [(n.lower(), v) for n, v in headers]
        # h11 keeps one of several identical Content-Length fields
        dedup = [
            f
            for i, f in enumerate(mine_fields)
            if f[0] != "content-length"
            or i == next(j for j, g in enumerate(mine_fields) if g[0] == "content-length")
        ]
        assert dedup == theirs_fields, raw
        assert framing == length, raw
        return
    if other is None:
        return  # both refuse
    event, _ = other
    why = [name for name, check in STRICTER.items() if check(raw, event)]
    assert why, f"the gateway refuses what h11 accepts, for no documented reason: {raw!r}"


def test_h11_refusals_are_refused_except_missing_host() -> None:
    """The one deliberate leniency, shown both ways."""
    no_host = b"CONNECT a.test:443 HTTP/1.1\r\n\r\n"
    assert theirs(no_host) is None
    assert ours(no_host) is not None
    two_hosts = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"
    assert theirs(two_hosts) is None and ours(two_hosts) is None


@settings(max_examples=1000, deadline=None)
@given(heads())
def test_h11_refusals_are_refused(raw: bytes) -> None:
    if theirs(raw) is None and ours(raw) is not None:
        head = parse_head(raw, max_headers=MAX_HEADERS)
        assert head.version == "HTTP/1.1" and head.get("host") is None, raw


def test_known_smuggling_heads_are_refused() -> None:
    for raw in [
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST http://a/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nX-A\n: b\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
    ]:
        assert ours(raw) is None, raw
