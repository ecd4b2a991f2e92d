"""Every limit and timeout of the proxy, each a named setting with a default a busy
production gateway can live with. The CLI exposes them as flags; tests shrink them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    # Request head: beyond these the client gets 431 (too big) or 408 (too slow).
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0  # slowloris guard: the whole head must arrive in this time
    # Upstream side.
    dns_timeout: float = 5.0
    connect_timeout: float = 10.0  # per address tried; the overall budget is 2x this
    # Tunnels.
    idle_timeout: float = 300.0  # no byte either way for this long closes the tunnel
    tls_hello_timeout: float = 10.0  # SNI check: the ClientHello must arrive in this time
    max_client_hello_bytes: int = 16 * 1024 + 5
    max_connections: int = 10_000  # open client connections; beyond: 503 and close
    # Shutdown: after SIGTERM, open tunnels get this long to finish before they are cut.
    shutdown_grace: float = 30.0
    # Transport write buffer high-water mark: past it the other side stops reading.
    write_high_water: int = 256 * 1024
    # How often the sweeper checks idle and header deadlines (their granularity).
    sweep_interval: float = 1.0
