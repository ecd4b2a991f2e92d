"""Every limit and timeout of the proxy, each a named setting with a default a busy
production gateway can live with. The CLI turns each into a flag (``--header-timeout``...)
with the help text below; tests shrink them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _limit(default: float, help: str) -> object:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = _limit(16 * 1024, "request head size; beyond it: 431")  # type: ignore[assignment]
    max_headers: int = _limit(100, "header fields per request; beyond it: 431")  # type: ignore[assignment]
    max_proxy_header_bytes: int = _limit(
        4096, "largest PROXY protocol v2 header (addresses and TLVs); v1 lines are 107 by spec"
    )  # type: ignore[assignment]
    header_timeout: float = _limit(
        10.0, "seconds for the whole request head to arrive (slowloris guard); then 408"
    )  # type: ignore[assignment]
    dns_timeout: float = _limit(5.0, "seconds for a DNS answer; then 504")  # type: ignore[assignment]
    connect_timeout: float = _limit(
        10.0, "seconds per upstream address tried (2x overall); then 504"
    )  # type: ignore[assignment]
    working_timeout: float = _limit(
        30.0,
        "seconds from a complete request head to an open tunnel (DNS, connect); then 504",
    )  # type: ignore[assignment]
    idle_timeout: float = _limit(
        300.0, "seconds without a byte either way before a tunnel is closed"
    )  # type: ignore[assignment]
    tls_hello_timeout: float = _limit(
        10.0, "seconds for the TLS ClientHello when the SNI check applies"
    )  # type: ignore[assignment]
    max_client_hello_bytes: int = _limit(
        16 * 1024 + 5, "largest ClientHello the SNI check will buffer"
    )  # type: ignore[assignment]
    max_connections: int = _limit(10_000, "open client connections; beyond it new ones get 503")  # type: ignore[assignment]
    shutdown_grace: float = _limit(
        30.0, "seconds open tunnels may finish after SIGTERM before they are cut"
    )  # type: ignore[assignment]
    write_high_water: int = _limit(
        256 * 1024, "bytes buffered towards one side before the other side stops reading"
    )  # type: ignore[assignment]
    read_buffer: int = _limit(
        1 << 20, "bytes read at once on a busy tunnel (one buffer shared by all of them)"
    )  # type: ignore[assignment]
    bulk_threshold: int = _limit(
        256 * 1024, "bytes one side of a tunnel carries before it switches to bulk reads"
    )  # type: ignore[assignment]
    sweep_interval: float = _limit(
        1.0, "seconds between checks of idle and header deadlines (their granularity)"
    )  # type: ignore[assignment]
    audit_destinations: int = _limit(
        100, "destinations tracked per policy in the denied/would-deny record (GET /audit)"
    )  # type: ignore[assignment]
