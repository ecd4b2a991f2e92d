"""Pure builders of the ``status`` the operator writes on its two resources.

Conditions follow the Kubernetes convention: ``lastTransitionTime`` changes only when the
condition's status does, so rewriting the same verdict is a no-op patch.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .binding import Verdict
from .bundlemap import Compiled


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str,
    *,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: Iterable[Mapping[str, Any]] = (),
    now: str | None = None,
) -> dict[str, Any]:
    """One status condition; its transition time survives rewrites of the same status."""
    status = "True" if ok else "False"
    transition = now or now_rfc3339()
    for cond in previous:
        if cond.get("type") == type_ and cond.get("status") == status:
            transition = str(cond.get("lastTransitionTime") or transition)
            break
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition,
    }


def ready_condition(
    *,
    ready: bool,
    reason: str,
    message: str,
    generation: int,
    previous: Iterable[Mapping[str, Any]] = (),
    now: str | None = None,
) -> dict[str, Any]:
    return condition(
        "Ready",
        ok=ready,
        reason=reason,
        message=message,
        generation=generation,
        previous=previous,
        now=now,
    )


def policy_status(
    verdict_reason: str,
    message: str,
    *,
    generation: int,
    gateway: str,
    rules: int | None,
    previous: Sequence[Mapping[str, Any]] = (),
    now: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "gateway": gateway,
        "conditions": [
            ready_condition(
                ready=verdict_reason == "Accepted",
                reason=verdict_reason,
                message=message,
                generation=generation,
                previous=previous,
                now=now,
            ),
            # Other conditions (ReadyToEnforce) are written with the audit record; a merge
            # patch replaces the whole list, so they are carried over here.
            *(dict(c) for c in previous if c.get("type") != "Ready"),
        ],
    }
    status["rules"] = rules if rules is not None else 0
    return status


def policy_status_from_verdict(verdict: Verdict, *, now: str | None = None) -> dict[str, Any]:
    entry = verdict.entry
    rules = verdict.compiled.rule_count if verdict.ready and verdict.compiled else 0
    return policy_status(
        verdict.reason,
        verdict.message,
        generation=entry.generation,
        gateway=entry.gateway,
        rules=rules,
        previous=entry.conditions,
        now=now,
    )


def status_differs(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether writing ``desired`` would change anything in ``current``."""
    current = current or {}
    return any(current.get(k) != v for k, v in desired.items())


def addresses_of(service: Mapping[str, Any] | None) -> list[str]:
    """Load balancer addresses (IPs and hostnames) from a Service's status."""
    if not service:
        return []
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    out: list[str] = []
    for item in ingress:
        for key in ("ip", "hostname"):
            value = item.get(key) if isinstance(item, Mapping) else None
            if value and value not in out:
                out.append(str(value))
    return out


def ready_replicas_of(deployment: Mapping[str, Any] | None) -> int:
    if not deployment:
        return 0
    value = (deployment.get("status") or {}).get("readyReplicas")
    return int(value) if isinstance(value, int) else 0


def bundle_status(compiled: Compiled) -> dict[str, Any]:
    return {
        "generation": compiled.generation,
        "sha256": compiled.sha256,
        "bytes": compiled.bytes,
        "configMaps": 1,
        "compressed": compiled.compressed,
    }


def gateway_status(
    *,
    generation: int,
    previous: Mapping[str, Any] | None,
    reason: str,
    message: str,
    ready: bool,
    policies: int | None = None,
    bundle: Mapping[str, Any] | None = None,
    ready_replicas: int | None = None,
    addresses: list[str] | None = None,
    guarded_namespaces: list[str] | None = None,
    extra_conditions: Sequence[Mapping[str, Any]] = (),
    now: str | None = None,
) -> dict[str, Any]:
    """The EgressGateway status; fields left None keep their previous value.

    Ready comes first; ``extra_conditions`` (built with :func:`condition`) follow.
    """
    previous = previous or {}
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [
            ready_condition(
                ready=ready,
                reason=reason,
                message=message,
                generation=generation,
                previous=previous.get("conditions") or (),
                now=now,
            ),
            *(dict(c) for c in extra_conditions),
        ],
    }
    for key, value in (
        ("policies", policies),
        ("bundle", bundle),
        ("readyReplicas", ready_replicas),
        ("addresses", addresses),
        ("guardedNamespaces", guarded_namespaces),
    ):
        if value is not None:
            status[key] = value
        elif key in previous:
            status[key] = previous[key]
    return status


def gateway_readiness(
    *, wanted_replicas: int, ready_replicas: int, service_type: str, addresses: list[str]
) -> tuple[bool, str, str]:
    """Ready, reason and message for a gateway whose bundle is published."""
    if wanted_replicas == 0:
        return False, "ScaledToZero", "replicas is 0: no gateway pod is serving"
    if ready_replicas == 0:
        return False, "Progressing", f"0/{wanted_replicas} gateway pods ready"
    if service_type == "LoadBalancer" and not addresses:
        return (
            False,
            "AwaitingAddress",
            f"{ready_replicas}/{wanted_replicas} gateway pods ready; "
            "the load balancer has no address yet",
        )
    where = ", ".join(addresses) if addresses else "the cluster"
    return True, "Available", f"{ready_replicas}/{wanted_replicas} gateway pods ready at {where}"
