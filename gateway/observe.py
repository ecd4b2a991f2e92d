"""Access log and Prometheus metrics.

One JSON line per connection, written when it ends (so it carries bytes and duration).
Lines are buffered and flushed on a short timer rather than one write per line: at
thousands of tunnels per second the syscalls would cost more than the proxying.

Metric labels are bounded: decision (3 values), reason (a fixed set of codes), policy
(the number of policies in the bundle), direction (2). The raw host never becomes a
label; it is in the access log.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

FLUSH_INTERVAL = 0.2
FLUSH_LINES = 256


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tidegate_requests",
            "Proxy requests (CONNECT or plain HTTP) by decision, policy and reason code.",
            ["decision", "policy", "reason"],
            registry=r,
        )
        self.tunnels_active = Gauge(
            "tidegate_tunnels_active", "Open client connections being proxied.", registry=r
        )
        self.bytes = Counter(
            "tidegate_bytes",
            "Bytes proxied, by direction (up: to the destination).",
            ["direction"],
            registry=r,
        )
        self.upstream_connect = Histogram(
            "tidegate_upstream_connect_seconds",
            "Time to open the TCP connection to the destination.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.dns_cache_hits = Counter(
            "tidegate_dns_cache_hits", "DNS answers served from the cache.", registry=r
        )
        self.dns_cache_misses = Counter(
            "tidegate_dns_cache_misses", "DNS lookups that went to a server.", registry=r
        )
        self.bundle_generation = Gauge(
            "tidegate_bundle_generation", "Generation of the policy bundle in force.", registry=r
        )
        self.bundle_rules = Gauge(
            "tidegate_bundle_rules", "Rules in the policy bundle in force.", registry=r
        )
        self.bundle_reloads = Counter(
            "tidegate_bundle_reloads",
            "Bundle reload attempts by result (success, error, unchanged).",
            ["result"],
            registry=r,
        )
        self.rejected = Counter(
            "tidegate_connections_rejected",
            "Connections refused before a decision, by reason (overload, header_timeout...).",
            ["reason"],
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self.bytes_up = self.bytes.labels("up")
        self.bytes_down = self.bytes.labels("down")

    def count_request(self, decision: str, policy: str, reason: str) -> None:
        key = (decision, policy, reason)
        child = self._request_children.get(key)
        if child is None:
            if len(self._request_children) > 10_000:  # policies churned a lot: start over
                self._request_children.clear()
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()


class AccessLog:
    """Buffered JSON-lines writer; ``stream`` None disables the log."""

    def __init__(self, stream: IO[str] | None = sys.stdout) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._handle: asyncio.TimerHandle | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None:
            return
        record["ts"] = round(time.time(), 3)
        self._lines.append(json.dumps(record, separators=(",", ":")))
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._handle = loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._lines and self._stream is not None:
            self._lines.append("")
            try:
                self._stream.write("\n".join(self._lines))
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not take the proxy down
            self._lines = []
