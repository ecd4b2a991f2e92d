"""Plain-HTTP mode: one absolute-form request, forwarded with framing the gateway controls.

Request smuggling happens when two parsers disagree about where a request ends. So the
gateway never forwards the client's framing: it decides the body's length itself
(:func:`request_framing`, by RFC 9112 section 6 and stricter), writes its own framing
headers into the forwarded head, and forwards exactly that body:

- ``Content-Length: N``: N bytes, then nothing;
- ``Transfer-Encoding: chunked``: decoded chunk by chunk (:class:`ChunkedBody`) and
  re-encoded canonically (no extensions, no trailers) up to the last chunk, then nothing;
- neither: no body.

Whatever the client sends after the end of that one request - a pipelined second
request, stray bytes - is read and dropped, never forwarded. Every other transfer coding,
``Transfer-Encoding`` together with ``Content-Length``, more than one ``Transfer-Encoding``,
a coding on an HTTP/1.0 request, and a chunk-size line or chunk that is not exactly as the
grammar says are refused (400 or 501) before or instead of forwarding.
"""

from __future__ import annotations

import re

from .httphead import HeadError, RequestHead, valid_field_line

CHUNKED = -1  # request_framing's answer for a chunked body

#: Longest chunk-size line (size, extensions) accepted; real clients send a few bytes.
MAX_CHUNK_LINE = 1024
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[\x09\x20-\x7e\x80-\xff]*)?")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
        # framing: always written by the gateway itself
        "content-length",
        "transfer-encoding",
    }
)


def request_framing(head: RequestHead) -> int:
    """The request body's length in bytes, or ``CHUNKED``; HeadError when it is ambiguous."""
    codings = head.get_all("transfer-encoding")
    lengths = head.get_all("content-length")
    if codings:
        if lengths:
            raise HeadError("both Content-Length and Transfer-Encoding")
        if len(codings) > 1:
            raise HeadError("more than one Transfer-Encoding header")
        if head.version != "HTTP/1.1":
            raise HeadError("Transfer-Encoding in an HTTP/1.0 request")
        if codings[0].strip().lower() != "chunked":
            raise HeadError(f"unsupported Transfer-Encoding {codings[0]!r}", 501)
        return CHUNKED
    if not lengths:
        return 0
    values = {value.strip() for value in lengths}
    if len(values) > 1:
        raise HeadError("conflicting Content-Length")
    value = values.pop()
    if not _CONTENT_LENGTH.fullmatch(value):
        raise HeadError("invalid Content-Length")
    return int(value)


def forwarded_head(head: RequestHead, *, path: str, host_header: str, framing: int) -> bytes:
    """The origin-form head sent upstream: hop-by-hop and framing headers replaced."""
    nominated = {
        token.strip().lower() for value in head.get_all("connection") for token in value.split(",")
    }
    # RFC 9112 3.2.2: a proxy generates Host from the target URI, never forwards the
    # client's (which only had to name the same host, in whatever spelling).
    lines = [f"{head.method} {path} HTTP/1.1", f"Host: {host_header}"]
    for name, value in head.headers:
        lowered = name.lower()
        if lowered in _HOP_BY_HOP or lowered in nominated or lowered == "host":
            continue
        lines.append(f"{name}: {value}")
    if framing == CHUNKED:
        lines.append("Transfer-Encoding: chunked")
    elif framing > 0 or head.get("content-length") is not None:
        lines.append(f"Content-Length: {framing}")
    lines.append("Via: 1.1 tidegate")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class BodyError(ValueError):
    """The request body's framing is broken; the connection is cut."""


class LengthBody:
    """Forward exactly ``length`` bytes."""

    __slots__ = ("left",)

    def __init__(self, length: int) -> None:
        self.left = length

    @property
    def done(self) -> bool:
        return self.left <= 0

    def feed(self, data: bytes) -> bytes:
        if self.left <= 0:
            return b""
        piece = data[: self.left]
        self.left -= len(piece)
        return piece


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedBody:
    """Decode a chunked body incrementally and re-encode it canonically (RFC 9112 7.1)."""

    __slots__ = ("left", "line", "max_trailer", "state", "trailer_bytes")

    def __init__(self, *, max_trailer: int) -> None:
        self.state = _SIZE
        self.line = bytearray()
        self.left = 0
        self.max_trailer = max_trailer
        self.trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        i, n = 0, len(data)
        while i < n and self.state != _DONE:
            state = self.state
            if state == _DATA:
                take = min(self.left, n - i)
                out += data[i : i + take]
                i += take
                self.left -= take
                if self.left == 0:
                    self.state = _DATA_END
                continue
            # _SIZE, _DATA_END and _TRAILER are line-based
            end = data.find(b"\n", i)
            piece = data[i:] if end < 0 else data[i : end + 1]
            i += len(piece)
            self.line += piece
            if len(self.line) > (self.max_trailer if state == _TRAILER else MAX_CHUNK_LINE):
                raise BodyError("chunk-size line or trailer too long")
            if end < 0:
                continue
            line = bytes(self.line)
            self.line = bytearray()
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                raise BodyError("chunked body line not ended by CRLF")
            line = line[:-2]
            if state == _DATA_END:
                if line:
                    raise BodyError("chunk data longer than its size")
                out += b"\r\n"
                self.state = _SIZE
            elif state == _SIZE:
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise BodyError("malformed chunk size")
                size = int(match.group(1), 16)
                if size == 0:
                    self.state = _TRAILER
                else:
                    out += b"%x\r\n" % size
                    self.left = size
                    self.state = _DATA
            else:  # _TRAILER: fields are checked and dropped; an empty line ends the body
                self.trailer_bytes += len(line) + 2
                if self.trailer_bytes > self.max_trailer:
                    raise BodyError("trailer section too large")
                if not line:
                    out += b"0\r\n\r\n"
                    self.state = _DONE
                elif not valid_field_line(line):
                    raise BodyError("malformed trailer field")
        return bytes(out)
