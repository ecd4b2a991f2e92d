"""The access record: one typed object per client connection, one JSON line when it ends.

Why a class and not a dict: the field names are written in one place (the ``F_*``
constants below, which are also the JSON keys), a misspelt field is an AttributeError
rather than a silently different log line, and ``__slots__`` keeps it as small as the
dict it replaces. A field left at ``None`` is not written.

To add a field (a client identity, a PROXY-protocol peer, ...): add a constant, a slot, a
line in ``__init__`` and an entry in ``FIELDS``; ``to_json`` picks it up in that order.
"""

from __future__ import annotations

from typing import Any

F_CLIENT = "client"
F_IDENTITY = "identity"  # pod, host_network, cidr, unknown_client (engine.client_kind)
F_CLIENT_NAMESPACE = "client_namespace"
F_CLIENT_POD = "client_pod"
F_METHOD = "method"
F_HOST = "host"
F_PORT = "port"
F_DECISION = "decision"
F_REASON = "reason"
F_POLICY = "policy"
F_RULE = "rule"
F_UPSTREAM = "upstream"
F_STATUS = "status"
F_MESSAGE = "message"
F_SNI = "sni"
F_CLOSED_BY = "closed_by"
F_BYTES_UP = "bytes_up"
F_BYTES_DOWN = "bytes_down"
F_DURATION_MS = "duration_ms"
F_VIA = "via"  # the load balancer, when the client address came from a PROXY header

#: The JSON keys, in the order they are written after the shared log shape's ``time``,
#: ``level``, ``logger`` and ``msg`` (``gateway/logshape.py``), which the writer adds.
FIELDS: tuple[str, ...] = (
    F_CLIENT,
    F_VIA,
    F_IDENTITY,
    F_CLIENT_NAMESPACE,
    F_CLIENT_POD,
    F_METHOD,
    F_HOST,
    F_PORT,
    F_DECISION,
    F_REASON,
    F_POLICY,
    F_RULE,
    F_UPSTREAM,
    F_STATUS,
    F_MESSAGE,
    F_SNI,
    F_CLOSED_BY,
    F_BYTES_UP,
    F_BYTES_DOWN,
    F_DURATION_MS,
)

# Why a connection ended, when the gateway ended it (``closed_by``).
CLOSED_IDLE = "idle_timeout"
CLOSED_SHUTDOWN = "shutdown"
CLOSED_DEADLINE = "deadline"


class AccessRecord:
    __slots__ = FIELDS

    def __init__(self) -> None:
        self.client: str | None = None
        self.via: str | None = None
        self.identity: str | None = None
        self.client_namespace: str | None = None
        self.client_pod: str | None = None
        self.method: str | None = None
        self.host: str | None = None
        self.port: int | None = None
        self.decision: str | None = None
        self.reason: str | None = None
        self.policy: str | None = None
        self.rule: str | None = None
        self.upstream: str | None = None
        self.status: int | None = None
        self.message: str | None = None
        self.sni: str | None = None
        self.closed_by: str | None = None
        self.bytes_up: int | None = None
        self.bytes_down: int | None = None
        self.duration_ms: float | None = None

    @property
    def started(self) -> bool:
        """True once anything about a request is known (a bare health check leaves none)."""
        return self.decision is not None or self.method is not None

    def refused(self, reason: str, *, keep_policy: bool = False) -> None:
        """Mark the record a deny for ``reason``; the policy and rule go unless kept."""
        self.decision = "deny"
        self.reason = reason
        if not keep_policy:
            self.policy = None
            self.rule = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out
