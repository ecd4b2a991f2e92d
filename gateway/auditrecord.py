"""What enforcing would break: a bounded, per-policy record of denied and would-deny
destinations, kept in the gateway's memory and served as JSON on the admin port.

Why bounded, and how: a client (or a bug) can ask for millions of random names; an exact
table of them would grow until the pod dies. Each policy keeps a *space-saving* summary
(Metwally, Agrawal, El Abbadi, "Efficient computation of frequent and top-k elements in
data streams", 2005) of ``capacity`` destinations: a new destination, when the table is
full, replaces the one with the smallest count and inherits that count as its error bound.
Any destination seen more than ``total / capacity`` times is guaranteed to be in the table,
so the destinations that matter (the ones enforcement would break most often) survive a
flood of one-off names; the flood itself shows up as ``others``. Every operation is O(1):
destinations are grouped in buckets by count, and the smallest bucket is tracked.

What is reported per destination is the *exact* number of requests seen since it entered
the table (``count``), never the inherited estimate, so listed counts plus ``others`` add
up to ``total`` exactly. The number of policies is bounded by the bundle (``retain`` drops
the records of policies a reload removed) and, as a last guard, by ``max_policies``.

This module is pure: no I/O, no clock of its own (callers pass ``now``), no asyncio. The
operator imports :func:`merge_reports` to combine the records of several replicas.
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: Destinations tracked per policy (the summary's capacity).
DEFAULT_CAPACITY = 100
#: Policies tracked at most, whatever the bundle says (a last guard on memory).
DEFAULT_MAX_POLICIES = 10_000
#: Destinations listed per policy in a report.
DEFAULT_TOP = 20
REPORT_KIND = "TidegateAuditRecord"
REPORT_VERSION = 1

Verdict = Literal["deny", "audit"]
Key = tuple[str, int]  # (host, port)


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: object) -> float | None:
    """Epoch seconds of an RFC 3339 UTC time as written by :func:`rfc3339`; None if not one."""
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return parsed.replace(tzinfo=datetime.UTC).timestamp()


@dataclass(slots=True)
class Entry:
    """One tracked destination of one policy."""

    host: str
    port: int
    rank: int  # space-saving count: exact count + inherited error; orders the eviction
    error: int  # how much of ``rank`` was inherited from the evicted destination
    denied: int = 0
    would_deny: int = 0
    last_seen: float = 0.0
    reason: str = ""

    @property
    def count(self) -> int:
        return self.denied + self.would_deny

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "count": self.count,
            "denied": self.denied,
            "wouldDeny": self.would_deny,
            "lastSeen": rfc3339(self.last_seen),
            "reason": self.reason,
        }


class TopDestinations:
    """The space-saving summary of one policy's denied and would-deny destinations."""

    __slots__ = (
        "_buckets",
        "_entries",
        "_min",
        "capacity",
        "denied",
        "evictions",
        "last_denied",
        "last_would_deny",
        "would_deny",
    )

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._entries: dict[Key, Entry] = {}
        # rank -> the keys with that rank, oldest first (a dict is an ordered set).
        self._buckets: dict[int, dict[Key, None]] = {}
        self._min = 0
        self.denied = 0
        self.would_deny = 0
        self.evictions = 0
        self.last_denied = 0.0
        self.last_would_deny = 0.0

    @property
    def total(self) -> int:
        return self.denied + self.would_deny

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def _bucket_add(self, key: Key, rank: int) -> None:
        bucket = self._buckets.get(rank)
        if bucket is None:
            bucket = self._buckets[rank] = {}
        bucket[key] = None

    def _bucket_remove(self, key: Key, rank: int) -> None:
        bucket = self._buckets[rank]
        del bucket[key]
        if not bucket:
            del self._buckets[rank]

    def add(self, host: str, port: int, *, verdict: Verdict, reason: str, now: float) -> None:
        key = (host, port)
        entry = self._entries.get(key)
        if entry is not None:
            self._bucket_remove(key, entry.rank)
            if entry.rank == self._min and self._min not in self._buckets:
                self._min = entry.rank + 1
            entry.rank += 1
            self._bucket_add(key, entry.rank)
        elif len(self._entries) < self.capacity:
            entry = self._entries[key] = Entry(host, port, rank=1, error=0)
            self._bucket_add(key, 1)
            self._min = 1
        else:
            # Evict the least recently promoted destination among those of the lowest rank.
            floor = self._min
            bucket = self._buckets[floor]
            victim = next(iter(bucket))
            self._bucket_remove(victim, floor)
            del self._entries[victim]
            self.evictions += 1
            entry = self._entries[key] = Entry(host, port, rank=floor + 1, error=floor)
            self._bucket_add(key, floor + 1)
            if floor not in self._buckets:
                self._min = floor + 1
        if verdict == "deny":
            entry.denied += 1
            self.denied += 1
            self.last_denied = max(self.last_denied, now)
        else:
            entry.would_deny += 1
            self.would_deny += 1
            self.last_would_deny = max(self.last_would_deny, now)
        entry.last_seen = max(entry.last_seen, now)
        entry.reason = reason

    def top(self, n: int) -> list[Entry]:
        """The ``n`` destinations with the most requests (then the most recent first)."""
        return sorted(self._entries.values(), key=lambda e: (-e.count, -e.last_seen, e.host))[
            : max(n, 0)
        ]

    def report(self, *, top: int) -> dict[str, Any]:
        listed = self.top(top)
        out: dict[str, Any] = {
            "total": self.total,
            "denied": self.denied,
            "wouldDeny": self.would_deny,
            "others": self.total - sum(e.count for e in listed),
            "tracked": len(self._entries),
            "evictions": self.evictions,
            "destinations": [e.to_json() for e in listed],
        }
        if self.last_denied:
            out["lastDenied"] = rfc3339(self.last_denied)
        if self.last_would_deny:
            out["lastWouldDeny"] = rfc3339(self.last_would_deny)
        return out


@dataclass
class AuditRecord:
    """Every policy's :class:`TopDestinations`, keyed by policy key (``namespace/name``)."""

    capacity: int = DEFAULT_CAPACITY
    max_policies: int = DEFAULT_MAX_POLICIES
    started: float = 0.0
    policies: dict[str, TopDestinations] = field(default_factory=dict)
    dropped: int = 0  # events for policies beyond max_policies (never expected)

    def record(
        self,
        policies: Iterable[str],
        host: str,
        port: int,
        *,
        verdict: Verdict,
        reason: str,
        now: float,
    ) -> None:
        """Count one denied (``deny``) or would-deny (``audit``) request against each policy."""
        for key in policies:
            summary = self.policies.get(key)
            if summary is None:
                if len(self.policies) >= self.max_policies:
                    self.dropped += 1
                    continue
                summary = self.policies[key] = TopDestinations(self.capacity)
            summary.add(host, port, verdict=verdict, reason=reason, now=now)

    def retain(self, keys: Collection[str]) -> None:
        """Forget the policies a reload removed (the bundle bounds what is kept)."""
        for key in [k for k in self.policies if k not in keys]:
            del self.policies[key]

    def report(self, *, top: int = DEFAULT_TOP, now: float, generation: int = 0) -> dict[str, Any]:
        return {
            "kind": REPORT_KIND,
            "version": REPORT_VERSION,
            "startedAt": rfc3339(self.started or now),
            "observedAt": rfc3339(now),
            "generation": generation,
            "capacity": self.capacity,
            "policies": {
                key: summary.report(top=top) for key, summary in sorted(self.policies.items())
            },
        }


# --- combining the replicas' reports (used by the operator) ------------------------------


class ReportError(ValueError):
    """A report that is not the shape :meth:`AuditRecord.report` writes."""


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{what} is not a non-negative integer")
    return value


def _str(value: object, what: str, limit: int = 253) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ReportError(f"{what} is not a string of at most {limit} characters")
    return value


def merge_reports(
    reports: Iterable[Mapping[str, Any]],
    *,
    top: int = DEFAULT_TOP,
    keys: Collection[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Combine several replicas' reports into one record per policy.

    Destinations are summed by (host, port), the latest ``lastSeen`` wins, and the top
    ``top`` are listed; ``others`` is what the listed destinations do not account for, so
    it absorbs both each replica's own ``others`` and destinations that fell off the merged
    list. ``keys`` limits the result to those policies. A malformed report raises
    :class:`ReportError` (the caller skips that replica and says so).
    """
    merged: dict[str, dict[str, Any]] = {}
    destinations: dict[str, dict[Key, dict[str, Any]]] = {}
    for report in reports:
        if not isinstance(report, Mapping) or report.get("kind") != REPORT_KIND:
            raise ReportError(f"not a {REPORT_KIND}")
        policies = report.get("policies")
        if not isinstance(policies, Mapping):
            raise ReportError("policies is not an object")
        for key, record in policies.items():
            key = _str(key, "policy key")
            if keys is not None and key not in keys:
                continue
            if not isinstance(record, Mapping):
                raise ReportError(f"record of {key} is not an object")
            into = merged.setdefault(key, {"total": 0, "denied": 0, "wouldDeny": 0})
            for name in ("total", "denied", "wouldDeny"):
                into[name] += _int(record.get(name, 0), f"{key} {name}")
            for name in ("lastDenied", "lastWouldDeny"):
                stamp = parse_rfc3339(record.get(name))
                if stamp is not None and stamp > (parse_rfc3339(into.get(name)) or 0):
                    into[name] = rfc3339(stamp)
            table = destinations.setdefault(key, {})
            items = record.get("destinations", [])
            if not isinstance(items, list):
                raise ReportError(f"destinations of {key} is not a list")
            for item in items:
                if not isinstance(item, Mapping):
                    raise ReportError(f"a destination of {key} is not an object")
                dest = (_str(item.get("host"), "host"), _int(item.get("port"), "port"))
                seen = parse_rfc3339(item.get("lastSeen")) or 0.0
                row = table.get(dest)
                if row is None:
                    row = table[dest] = {
                        "host": dest[0],
                        "port": dest[1],
                        "count": 0,
                        "denied": 0,
                        "wouldDeny": 0,
                        "lastSeen": 0.0,
                        "reason": "",
                    }
                row["denied"] += _int(item.get("denied", 0), "denied")
                row["wouldDeny"] += _int(item.get("wouldDeny", 0), "wouldDeny")
                row["count"] = row["denied"] + row["wouldDeny"]
                if seen >= row["lastSeen"]:
                    row["lastSeen"] = seen
                    row["reason"] = _str(item.get("reason", ""), "reason", 64)
    for key, into in merged.items():
        rows = sorted(
            destinations.get(key, {}).values(),
            key=lambda r: (-r["count"], -r["lastSeen"], r["host"], r["port"]),
        )[: max(top, 0)]
        for row in rows:
            row["lastSeen"] = rfc3339(row["lastSeen"])
        into["others"] = max(into["total"] - sum(r["count"] for r in rows), 0)
        into["destinations"] = rows
    return merged


__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_TOP",
    "AuditRecord",
    "Entry",
    "ReportError",
    "TopDestinations",
    "merge_reports",
    "parse_rfc3339",
    "rfc3339",
]
