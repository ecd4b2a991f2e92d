"""A strict, bounded parser for the one request head a forward proxy reads.

The proxy reads exactly one request head per client connection (CONNECT, or an
absolute-form plain HTTP request) and then only shuttles bytes, so a small parser that
refuses anything ambiguous is safer than a lenient general one. It accepts a subset of
what h11 accepts (``tests/gateway/test_head_fuzz.py`` checks that on generated heads) and
is stricter where leniency has caused request smuggling elsewhere:

- lines end in CRLF only: a bare LF or CR anywhere is refused (h11 accepts bare LF);
- no obsolete line folding (h11 unfolds it), no whitespace before a colon;
- field values are visible ASCII, obs-text, space and tab only (no control characters);
- no empty line before the request line; HTTP/1.0 and HTTP/1.1 only (else 505).

Body framing (Content-Length / Transfer-Encoding) is judged in ``plainhttp.request_framing``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_ANY_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*")


class HeadError(ValueError):
    """The request head is malformed; ``status`` is the response to send."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # original case and order, for forwarding

    def get(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]


def find_head_end(buffer: bytes | bytearray) -> int:
    """Index just past the blank line ending the head, or -1 if it has not arrived.

    Raises HeadError at once for a head that can never end properly (a blank line made of
    bare LFs), rather than waiting for the size or time limit.
    """
    end = buffer.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    if b"\n\n" in buffer:
        raise HeadError("bare LF line ending")
    return -1


def _field(line: bytes) -> tuple[bytes, bytes] | None:
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        return None
    value = value.strip(b" \t")
    if value and not _VALUE.fullmatch(value):
        return None
    return name, value


def valid_field_line(line: bytes) -> bool:
    """True for one ``name: value`` line (no line ending) by the same rules as the head."""
    return _field(line) is not None


def parse_head(raw: bytes, *, max_headers: int) -> RequestHead:
    if not raw.endswith(b"\r\n\r\n"):
        raise HeadError("request head not ended by an empty line")
    lines = raw[:-4].split(b"\r\n")
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise HeadError("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HeadError("malformed method")
    if not _TARGET.fullmatch(target):
        raise HeadError("malformed request target")
    if not _VERSION.fullmatch(version):
        if _ANY_VERSION.fullmatch(version):
            raise HeadError("unsupported HTTP version", 505)
        raise HeadError("malformed HTTP version")
    header_lines = lines[1:]
    if len(header_lines) > max_headers:
        raise HeadError(f"more than {max_headers} header fields", 431)
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        if line[:1] in (b" ", b"\t"):
            raise HeadError("obsolete line folding")
        field = _field(line)
        if field is None:
            if b"\r" in line or b"\n" in line:
                raise HeadError("bare CR or LF in the request head")
            raise HeadError("malformed header field")
        headers.append((field[0].decode("ascii"), field[1].decode("latin-1")))
    head = RequestHead(
        method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers
    )
    if len(head.get_all("host")) > 1:
        raise HeadError("more than one Host header")
    return head
