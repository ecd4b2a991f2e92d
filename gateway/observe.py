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
import bisect
import json
import platform
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

try:
    from tidegate import __version__ as _VERSION
except ImportError:  # pragma: no cover - the gateway package imported on its own
    _VERSION = "unknown"

from .auditrecord import DEFAULT_CAPACITY, AuditRecord
from .logshape import access_prefix

FLUSH_INTERVAL = 0.2
RELOAD_RESULTS = ("success", "error", "unchanged", "stale")
FLUSH_LINES = 256


class Value:
    """A plain number: ``inc`` on the hot path is an attribute update, no lock, no label
    lookup. Safe because the proxy runs on one event loop thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Labelled:
    """A family of Values keyed by label values."""

    __slots__ = ("children", "labelnames")

    def __init__(self, *labelnames: str) -> None:
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], Value] = {}

    def labels(self, *values: str) -> Value:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Value()
        return child


class Histogram:
    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


_HELP = {
    "tidegate_policy_would_deny": (
        "Requests let through in Audit mode that enforcing this policy would deny (labels: "
        "the policies of the bundle only)."
    ),
    "tidegate_policy_denied": "Requests denied under this policy (policy, no-match, port).",
    "tidegate_requests": (
        "Proxy requests (CONNECT or plain HTTP) by decision, policy, reason and the client's"
        " namespace (empty for clients that are not pods)."
    ),
    "tidegate_clients": (
        "Decisions by what the client was: pod, host_network, cidr (no identity, inside a"
        " cluster policy's sources) or unknown_client (governed by no policy)."
    ),
    "tidegate_identities_generation": "Generation of the client identity table in force.",
    "tidegate_identities_addresses": "Client addresses in the identity table in force.",
    "tidegate_identity_reloads": "Identity table updates by result (success, error, stale).",
    "tidegate_tunnels_active": "Open tunnels: client connections with a destination dialled.",
    "tidegate_event_loop_tasks": "asyncio tasks alive on the gateway's loop (a leak shows here).",
    "tidegate_connections_active": "Open client connections, tunnels and heads in progress.",
    "tidegate_bytes": "Bytes proxied, by direction (up: towards the destination).",
    "tidegate_upstream_connect_seconds": "Time to open the TCP connection to the destination.",
    "tidegate_dns_cache_hits": "DNS answers served from the cache.",
    "tidegate_dns_cache_misses": "DNS lookups that went to a server.",
    "tidegate_bundle_generation": "Generation of the policy bundle in force.",
    "tidegate_bundle_rules": "Rules in the policy bundle in force.",
    "tidegate_bundle_reloads": "Bundle reloads by result (success, error, unchanged, stale).",
    "tidegate_connections_rejected": "Connections refused before a decision, by reason.",
    "tidegate_connections_limit": "Open client connections allowed; beyond it new ones get 503.",
    "tidegate_ready": "1 while /readyz answers 200 (a bundle is loaded, not draining), else 0.",
    "tidegate_build_info": "Always 1; the labels say which tidegate and Python run.",
}


class Metrics:
    """The gateway's metrics, kept as plain numbers and exported through a collector.

    prometheus-client's own Counter takes a lock and a label lookup per ``inc``; at ten
    thousand tunnels a second with five updates each that was a measurable share of the
    CPU. Here the hot path touches attributes and the collector builds the families at
    scrape time.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        audit_destinations: int = DEFAULT_CAPACITY,
    ) -> None:
        self.requests = Labelled("decision", "policy", "reason", "client_namespace")
        self.clients = Labelled("identity")
        self.identities_generation = Value()
        self.identities_addresses = Value()
        self.identity_reloads = Labelled("result")
        # Denied and would-deny destinations per policy (served on GET /audit); its
        # per-policy totals are the two policy-labelled counters below.
        self.audit = AuditRecord(capacity=audit_destinations, started=time.time())
        self.tunnels_active = Value()
        self.loop_tasks = Value()  # set at scrape time
        self.connections_active = Value()
        self.bytes_up = Value()
        self.bytes_down = Value()
        self.upstream_connect = Histogram(
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        )
        self.dns_cache_hits = Value()
        self.dns_cache_misses = Value()
        self.bundle_generation = Value()
        self.bundle_rules = Value()
        self.bundle_reloads = Labelled("result")
        # Every result from zero: a series that first appears at 1 has no increase() in
        # Prometheus, so the first reload error would never alert.
        for result in RELOAD_RESULTS:
            self.bundle_reloads.labels(result)
        self.rejected = Labelled("reason")
        self.connections_limit = Value()
        self.ready = Value()
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        if registry is None:
            # process_* (open fds against the connection limit, memory, CPU) and python_info.
            self.registry.register(PROCESS_COLLECTOR)
            self.registry.register(PLATFORM_COLLECTOR)

    def count_request(
        self, decision: str, policy: str, reason: str, client_namespace: str = ""
    ) -> None:
        requests = self.requests.children
        key = (decision, policy, reason, client_namespace)
        child = requests.get(key)
        if child is None:
            if len(requests) > 10_000:  # policies churned a lot: start the label set over
                requests.clear()
            child = requests[key] = Value()
        child.value += 1

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "tidegate_build_info",
            _HELP["tidegate_build_info"],
            labels=["version", "component", "python"],
        )
        info.add_metric([_VERSION, "gateway", platform.python_version()], 1)
        yield info
        yield from _labelled_counter("tidegate_requests", self.requests)
        yield from _labelled_counter("tidegate_clients", self.clients)
        for name, value in (
            ("tidegate_identities_generation", self.identities_generation),
            ("tidegate_identities_addresses", self.identities_addresses),
        ):
            gauge = GaugeMetricFamily(name, _HELP[name])
            gauge.add_metric([], value.value)
            yield gauge
        yield from _labelled_counter("tidegate_identity_reloads", self.identity_reloads)
        for name, value in (
            ("tidegate_tunnels_active", self.tunnels_active),
            ("tidegate_connections_active", self.connections_active),
            ("tidegate_connections_limit", self.connections_limit),
            ("tidegate_ready", self.ready),
            ("tidegate_event_loop_tasks", self.loop_tasks),
        ):
            gauge = GaugeMetricFamily(name, _HELP[name])
            gauge.add_metric([], value.value)
            yield gauge
        counter = CounterMetricFamily(
            "tidegate_bytes", _HELP["tidegate_bytes"], labels=["direction"]
        )
        counter.add_metric(["up"], self.bytes_up.value)
        counter.add_metric(["down"], self.bytes_down.value)
        yield counter
        h = self.upstream_connect
        cumulative, buckets = 0, []
        for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
            cumulative += count
            buckets.append((_go_float(bound), cumulative))
        histogram = HistogramMetricFamily(
            "tidegate_upstream_connect_seconds", _HELP["tidegate_upstream_connect_seconds"]
        )
        histogram.add_metric([], buckets, h.total)
        yield histogram
        for name, value in (
            ("tidegate_dns_cache_hits", self.dns_cache_hits),
            ("tidegate_dns_cache_misses", self.dns_cache_misses),
        ):
            counter = CounterMetricFamily(name, _HELP[name])
            counter.add_metric([], value.value)
            yield counter
        for name, value in (
            ("tidegate_bundle_generation", self.bundle_generation),
            ("tidegate_bundle_rules", self.bundle_rules),
        ):
            gauge = GaugeMetricFamily(name, _HELP[name])
            gauge.add_metric([], value.value)
            yield gauge
        yield from _labelled_counter("tidegate_bundle_reloads", self.bundle_reloads)
        yield from _labelled_counter("tidegate_connections_rejected", self.rejected)
        would_deny = CounterMetricFamily(
            "tidegate_policy_would_deny", _HELP["tidegate_policy_would_deny"], labels=["policy"]
        )
        denied = CounterMetricFamily(
            "tidegate_policy_denied", _HELP["tidegate_policy_denied"], labels=["policy"]
        )
        for key, summary in list(self.audit.policies.items()):
            would_deny.add_metric([key], summary.would_deny)
            denied.add_metric([key], summary.denied)
        yield would_deny
        yield denied


def _go_float(value: float) -> str:
    """Bucket bounds as Prometheus writes them ("+Inf", "0.005", "1.0")."""
    return "+Inf" if value == float("inf") else repr(float(value))


def _labelled_counter(name: str, family: Labelled) -> Iterator[Metric]:
    counter = CounterMetricFamily(name, _HELP[name], labels=list(family.labelnames))
    for values, child in list(family.children.items()):
        counter.add_metric(list(values), child.value)
    yield counter


class AccessLog:
    """Buffered JSON-lines writer; ``stream`` None disables the log."""

    def __init__(self, stream: IO[str] | None = sys.stdout) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._handle: asyncio.TimerHandle | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None:
            return
        body = json.dumps(record, separators=(",", ":"))
        # The shared log shape's four fields first, then the record's own.
        self._lines.append(access_prefix(time.time()) + (body[1:] if record else "}"))
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
