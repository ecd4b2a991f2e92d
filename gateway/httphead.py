"""A strict, bounded parser for the one request head a forward proxy reads.

The proxy reads exactly one request head per client connection (CONNECT, or an
absolute-form plain HTTP request) and then only shuttles bytes, so a small parser that
refuses anything ambiguous is safer than a lenient general one: no obsolete line
folding, no whitespace before colons, no bare CR, no duplicate Content-Length,
Transfer-Encoding together with Content-Length is refused (request smuggling).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


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
    """Index just past the blank line ending the head, or -1 if it has not arrived."""
    end = buffer.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def parse_head(raw: bytes, *, max_headers: int) -> RequestHead:
    lines = raw[:-4].split(b"\r\n") if raw.endswith(b"\r\n\r\n") else raw.split(b"\r\n")
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HeadError("malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HeadError("malformed method")
    if not _VERSION.match(version):
        raise HeadError("unsupported HTTP version", 505)
    if _FORBIDDEN_IN_VALUE.search(target) or b"\r" in request_line:
        raise HeadError("malformed request target")
    header_lines = lines[1:]
    if len(header_lines) > max_headers:
        raise HeadError(f"more than {max_headers} header fields", 431)
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HeadError("malformed header field")
        value = value.strip(b" \t")
        if _FORBIDDEN_IN_VALUE.search(value):
            raise HeadError("control character in a header value")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    head = RequestHead(
        method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"), headers
    )
    lengths = {v.strip() for v in head.get_all("content-length")}
    if len(lengths) > 1:
        raise HeadError("conflicting Content-Length")
    if lengths and head.get("transfer-encoding") is not None:
        raise HeadError("both Content-Length and Transfer-Encoding")
    if lengths and not next(iter(lengths)).isdigit():
        raise HeadError("invalid Content-Length")
    return head
