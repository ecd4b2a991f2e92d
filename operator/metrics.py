"""The operator's own Prometheus metrics, on a registry of its own (never the global one)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.errors = Counter(
            "tidegate_operator_reconcile_errors",
            "Reconciliations that failed, by resource kind.",
            ["kind"],
            registry=self.registry,
        )
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

    def observe(self, kind: str, seconds: float, ok: bool) -> None:
        self.reconciles.labels(kind=kind, result="ok" if ok else "error").inc()
        self.duration.labels(kind=kind).observe(seconds)
        if not ok:
            self.errors.labels(kind=kind).inc()
