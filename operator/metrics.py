"""The operator's own Prometheus metrics, on a registry of its own (never the global one).

Failed reconciliations are ``tidegate_operator_reconciles_total{result="error"}``: one
counter with a result label, so ok and error always add up to the total.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from tidegate import __version__


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.reconciles = Counter(
            "tidegate_operator_reconciles",
            "Reconciliations by resource kind and result (ok, error).",
            ["kind", "result"],
            registry=self.registry,
        )
        # process_* (open fds, memory, CPU) and python_info, like the gateway's.
        self.registry.register(PROCESS_COLLECTOR)
        self.registry.register(PLATFORM_COLLECTOR)
        self.build_info = Gauge(
            "tidegate_build_info",
            "Always 1; the labels say which tidegate and Python run.",
            ["version", "component", "python"],
            registry=self.registry,
        )
        self.build_info.labels(
            version=__version__, component="operator", python=platform.python_version()
        ).set(1)
        self.duration = Histogram(
            "tidegate_operator_reconcile_seconds",
            "Time one reconciliation took, by resource kind.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.bundle_bytes = Gauge(
            "tidegate_operator_bundle_bytes",
            "Size of the gateway's current policy bundle (uncompressed).",
            ["gateway"],
            registry=self.registry,
        )
        self.bundle_generation = Gauge(
            "tidegate_operator_bundle_generation",
            "Generation of the policy bundle last published for the gateway; its pods "
            "report theirs as tidegate_bundle_generation.",
            ["gateway"],
            registry=self.registry,
        )

    def published(self, gateway: str, *, size: int, generation: int) -> None:
        self.bundle_bytes.labels(gateway=gateway).set(size)
        self.bundle_generation.labels(gateway=gateway).set(generation)

    def forget(self, gateway: str) -> None:
        for gauge in (self.bundle_bytes, self.bundle_generation):
            try:
                gauge.remove(gateway)
            except KeyError:
                pass

    def observe(self, kind: str, seconds: float, ok: bool) -> None:
        self.reconciles.labels(kind=kind, result="ok" if ok else "error").inc()
        self.duration.labels(kind=kind).observe(seconds)
