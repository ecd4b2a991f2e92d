"""What enforcing would break, gathered from the gateway pods into each policy's status.

How the record travels: each gateway pod keeps its own bounded record of denied and
would-deny destinations (``tidegate.gateway.auditrecord``) and serves it on its admin port
(``GET /audit``). The operator lists the gateway's Ready pods, GETs each one by pod IP
(the port is the container port named ``metrics``), merges the answers and writes the top
destinations into every bound policy's ``status.audit``.

Why pull, not push: the other way round (each gateway writing a report into an object)
would give every gateway pod a write permission on the API server, so a compromised
gateway - the component that talks to the internet - could write what the operator then
trusts. Pulling needs one more read permission for the operator (``list`` pods, which it
already sees through the Deployments it owns), none for the gateways, and the pods'
answers are parsed strictly and bounded in size and time.

Everything but :func:`fetch_reports` is pure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from tidegate.gateway.auditrecord import ReportError, merge_reports, parse_rfc3339, rfc3339

from .render import METRICS_PORT

AUDIT_PATH = "/audit"
#: Largest /audit answer read from one pod (a full report of many policies fits easily).
MAX_REPORT_BYTES = 4 * 1024 * 1024
FETCH_TIMEOUT = 3.0
#: Destinations listed per policy in its status.
STATUS_TOP = 10
CONDITION = "ReadyToEnforce"


@dataclass(frozen=True, slots=True)
class Target:
    pod: str
    ip: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}{AUDIT_PATH}?top={STATUS_TOP * 2}"


def _ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
        if isinstance(c, Mapping)
    )


def _metrics_port(pod: Mapping[str, Any]) -> int:
    for container in (pod.get("spec") or {}).get("containers") or ():
        for port in (container or {}).get("ports") or ():
            if isinstance(port, Mapping) and port.get("name") == "metrics":
                value = port.get("containerPort")
                if isinstance(value, int) and 0 < value < 65536:
                    return value
    return METRICS_PORT


def targets(pods: Iterable[Mapping[str, Any]]) -> tuple[list[Target], int]:
    """(the Ready pods to ask, how many gateway pods exist at all)."""
    out, total = [], 0
    for pod in pods:
        total += 1
        ip = (pod.get("status") or {}).get("podIP")
        if _ready(pod) and isinstance(ip, str) and ip:
            name = str((pod.get("metadata") or {}).get("name") or ip)
            out.append(Target(name, ip, _metrics_port(pod)))
    return out, total


async def _fetch_one(
    session: aiohttp.ClientSession, target: Target
) -> tuple[Target, dict[str, Any] | str]:
    try:
        async with session.get(target.url, allow_redirects=False) as resp:
            if resp.status != 200:
                return target, f"HTTP {resp.status}"
            body = await resp.content.read(MAX_REPORT_BYTES + 1)
            if len(body) > MAX_REPORT_BYTES:
                return target, f"answer larger than {MAX_REPORT_BYTES} bytes"
            document = json.loads(body)
            if not isinstance(document, dict):
                return target, "answer is not a JSON object"
            return target, document
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return target, f"{type(exc).__name__}: {exc}"


async def fetch_reports(
    targets: Sequence[Target], *, per_pod_seconds: float = FETCH_TIMEOUT
) -> tuple[list[dict[str, Any]], list[str]]:
    """(the reports that came back, one line per pod that did not answer properly)."""
    if not targets:
        return [], []
    client_timeout = aiohttp.ClientTimeout(total=per_pod_seconds)
    async with aiohttp.ClientSession(timeout=client_timeout, trust_env=False) as session:
        results = await asyncio.gather(*(_fetch_one(session, t) for t in targets))
    reports, errors = [], []
    for target, result in results:
        if isinstance(result, str):
            errors.append(f"{target.pod} ({target.ip}): {result}")
        else:
            reports.append(result)
    return reports, errors


@dataclass(frozen=True, slots=True)
class Gathered:
    """One gateway's merged record, as the status writer needs it."""

    records: dict[str, dict[str, Any]]  # policy key -> merged record
    pods_ready: int
    pods_reporting: int
    pods_total: int
    errors: tuple[str, ...] = ()


def gather_from(
    reports: Sequence[Mapping[str, Any]],
    *,
    errors: Sequence[str],
    pods_ready: int,
    pods_total: int,
    keys: Iterable[str],
) -> Gathered:
    """Merge the pods' reports; a report that is malformed counts as a pod not reporting."""
    good: list[Mapping[str, Any]] = []
    problems = list(errors)
    wanted = set(keys)
    for report in reports:
        try:
            merge_reports([report], keys=wanted)
        except ReportError as exc:
            problems.append(f"malformed report: {exc}")
            continue
        good.append(report)
    records = merge_reports(good, top=STATUS_TOP, keys=wanted)
    return Gathered(records, pods_ready, len(good), pods_total, tuple(problems))


# --- the policy status ---------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _condition(
    status: str,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    transition = now
    if previous is not None and previous.get("status") == status:
        transition = str(previous.get("lastTransitionTime") or now)
    return {
        "type": CONDITION,
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "observedGeneration": generation,
        "lastTransitionTime": transition,
    }


def audit_status(
    *,
    key: str,
    mode: str,
    gathered: Gathered,
    previous_audit: Mapping[str, Any] | None,
    previous_condition: Mapping[str, Any] | None,
    generation: int,
    quiet_seconds: float,
    now: float,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(``status.audit``, the ``ReadyToEnforce`` condition or None for an Enforce policy).

    ``since`` is when the operator started watching this policy in Audit mode (kept across
    passes); ``lastWouldDeny`` never moves back, even when a gateway pod restarts and its
    counters start over. Ready means: Audit mode, at least one gateway pod reporting, and
    no would-deny for ``quiet_seconds`` since the later of the two.
    """
    previous_audit = previous_audit or {}
    record = gathered.records.get(key) or {
        "total": 0,
        "denied": 0,
        "wouldDeny": 0,
        "others": 0,
        "destinations": [],
    }
    stamp = rfc3339(now)
    audit_mode = mode == "Audit"
    since = parse_rfc3339(previous_audit.get("since")) if audit_mode else None
    if audit_mode and (since is None or previous_condition is None):
        since = now
    last_would_deny = max(
        parse_rfc3339(record.get("lastWouldDeny")) or 0.0,
        parse_rfc3339(previous_audit.get("lastWouldDeny")) or 0.0,
    )
    status: dict[str, Any] = {
        "observedAt": stamp,
        "podsReporting": gathered.pods_reporting,
        "podsReady": gathered.pods_ready,
        "total": record["total"],
        "denied": record["denied"],
        "wouldDeny": record["wouldDeny"],
        "others": record["others"],
        "destinations": record["destinations"],
    }
    if since is not None:
        status["since"] = rfc3339(since)
    if last_would_deny:
        status["lastWouldDeny"] = rfc3339(last_would_deny)
    if record.get("lastDenied"):
        status["lastDenied"] = record["lastDenied"]
    if not audit_mode:
        return status, None
    assert since is not None
    if gathered.pods_reporting == 0:
        why = "; ".join(gathered.errors[:3]) or "no Ready gateway pod"
        condition = _condition(
            "Unknown",
            "NoGatewayReports",
            f"no gateway pod reported: {why}",
            generation,
            previous_condition,
            stamp,
        )
        return status, condition
    quiet_from = max(since, last_would_deny)
    if last_would_deny and record["wouldDeny"] and last_would_deny >= now - quiet_seconds:
        top = ", ".join(
            f"{d['host']}:{d['port']} ({d['wouldDeny']})"
            for d in record["destinations"]
            if d.get("wouldDeny")
        )
        message = (
            f"{record['wouldDeny']} would-deny requests, the last at {rfc3339(last_would_deny)}; "
            f"enforcing would break: {top or 'destinations counted under others'}"
        )
        condition = _condition("False", "WouldDeny", message, generation, previous_condition, stamp)
    elif now - quiet_from >= quiet_seconds:
        message = (
            f"no would-deny since {rfc3339(quiet_from)} (at least {_duration(quiet_seconds)}):"
            " enforcing now would break nothing the gateway pods saw"
        )
        condition = _condition(
            "True", "NoWouldDeny", message, generation, previous_condition, stamp
        )
    else:
        message = (
            f"no would-deny since {rfc3339(quiet_from)}; ready at "
            f"{rfc3339(quiet_from + quiet_seconds)} if none comes"
        )
        condition = _condition("False", "Observing", message, generation, previous_condition, stamp)
    return status, condition


def same_audit(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Equal but for ``observedAt``: a quiet policy is not rewritten every pass."""
    if not isinstance(current, Mapping):
        return False
    strip = {k: v for k, v in desired.items() if k != "observedAt"}
    return {k: v for k, v in current.items() if k != "observedAt"} == strip
