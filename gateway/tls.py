"""Just enough TLS to read the server name a client asks for in its ClientHello.

Used to refuse domain fronting: a tunnel opened as ``CONNECT allowed.example:443`` whose
TLS handshake then asks for another name. We never terminate TLS; we only look at the
first record(s), which the client sends in clear.
"""

from __future__ import annotations

from dataclasses import dataclass

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0


class NotTLS(ValueError):
    """The bytes are not the start of a TLS handshake."""


@dataclass(frozen=True, slots=True)
class HelloResult:
    complete: bool  # False: need more bytes
    server_name: str | None = None


def _handshake_bytes(data: bytes, limit: int) -> bytes | None:
    """Concatenate handshake record payloads until the ClientHello is whole (or None)."""
    out = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return None
        content_type, major = data[pos], data[pos + 1]
        if content_type != _HANDSHAKE or major != 3:
            raise NotTLS("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 256:
            raise NotTLS("bad TLS record length")
        if len(data) - pos - 5 < length:
            if pos + 5 + length > limit:
                raise NotTLS("ClientHello larger than the limit")
            return None
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4:
            needed = 4 + int.from_bytes(out[1:4], "big")
            if len(out) >= needed:
                return bytes(out[:needed])
            if needed > limit:
                raise NotTLS("ClientHello larger than the limit")


def parse_client_hello(data: bytes, *, limit: int = 16 * 1024 + 5) -> HelloResult:
    """Return the SNI host name of a ClientHello (lower-case), or say more bytes are needed."""
    hello = _handshake_bytes(data, limit)
    if hello is None:
        return HelloResult(False)
    if hello[0] != _CLIENT_HELLO:
        raise NotTLS("first handshake message is not a ClientHello")
    try:
        pos = 4 + 2 + 32  # header, legacy_version, random
        pos += 1 + hello[pos]  # session id
        pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        if pos >= len(hello):
            return HelloResult(True, None)  # no extensions at all
        end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        names: list[bytes] = []
        seen_sni = False
        while pos + 4 <= end:
            ext_type = int.from_bytes(hello[pos : pos + 2], "big")
            ext_len = int.from_bytes(hello[pos + 2 : pos + 4], "big")
            body = hello[pos + 4 : pos + 4 + ext_len]
            pos += 4 + ext_len
            if ext_type != _EXT_SERVER_NAME:
                continue
            # Two server_name extensions, or two names in one, are forbidden (RFC 8446
            # 4.2, RFC 6066 3) and ambiguous: a server that reads the last one would
            # reach a name we never compared.
            if seen_sni:
                raise NotTLS("more than one server_name extension")
            seen_sni = True
            # server_name_list: u16 length, then entries of (u8 type, u16 len, name)
            inner = 2
            while inner + 3 <= len(body):
                name_len = int.from_bytes(body[inner + 1 : inner + 3], "big")
                names.append(body[inner + 3 : inner + 3 + name_len] if body[inner] == 0 else b"")
                inner += 3 + name_len
        if len(names) > 1:
            raise NotTLS("more than one name in the server_name extension")
        if names and names[0]:
            return HelloResult(True, names[0].decode("ascii", "replace").lower())
        return HelloResult(True, None)
    except IndexError:
        raise NotTLS("truncated ClientHello") from None
