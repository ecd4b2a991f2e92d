"""The gateway reconciler: one pass makes a gateway's world match its spec and policies.

A pass, for gateway ``ns/name``:

1. take the gateway and the policies pointing at it from kopf's in-memory indexes
   (no API list per pass);
2. bind: admit or refuse each policy (allowedPolicyNamespaces), keep the last accepted
   version of a policy that became invalid, leave out the rest;
3. compile the bundle; write the ConfigMap only if its sha256 changed (optimistic
   concurrency: a 409 re-reads and retries);
4. server-side apply the workload objects (a hand edit of an owned field is put back);
5. write the policies' and the gateway's status where it changed, with Events on
   transitions.

Passes are requested, not run inline: requests for one gateway coalesce, so a burst of
policy changes costs one or two passes, and passes for different gateways run in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tidegate.gateway.bundle import load_bundle
from tidegate.gateway.documents import PolicyError, parse_gateway
from tidegate.gateway.model import Gateway, Policy

from .auditgather import (
    CONDITION,
    Gathered,
    audit_status,
    fetch_reports,
    gather_from,
    same_audit,
    targets,
)
from .binding import DEFAULT_GATEWAY, PolicyEntry, Verdict, bind
from .bundlemap import (
    BundleTooLarge,
    Compiled,
    StoredBundle,
    compile_for_store,
    read_stored,
    render_bundle_configmap,
)
from .exposure import CONDITION_CLIENTS_IDENTIFIED, assess_client_identity
from .guard import guard_spec
from .guardsync import sync_guard
from .kubeapi import ApiError, KubeClient, path_of, resource_path
from .metrics import Metrics
from .proxyenv import ClusterNetwork
from .render import DEFAULT_IMAGE, Names, Owner, render_workload
from .status import (
    addresses_of,
    bundle_status,
    condition,
    gateway_readiness,
    gateway_status,
    policy_status,
    policy_status_from_verdict,
    ready_replicas_of,
    status_differs,
)

log = logging.getLogger("tidegate.operator")

GROUP_VERSION = "tidegate.io/v1alpha1"
CONFLICT_RETRIES = 5
#: What the 422 fallback's merge patch leaves out (identity, and what the server owns).
_NOT_PATCHED = frozenset({"apiVersion", "kind", "metadata", "status"})
STATUS_CONCURRENCY = 16


class Emit(Protocol):
    def __call__(
        self, body: Mapping[str, Any], *, type: str, reason: str, message: str
    ) -> None: ...


def _no_emit(body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
    log.info("event %s %s: %s", type, reason, message)


@dataclass
class Settings:
    gateway_image: str = DEFAULT_IMAGE
    default_gateway: str = DEFAULT_GATEWAY
    debounce_seconds: float = 0.2
    max_backoff_seconds: float = 60.0
    #: How often the gateway pods' audit records are gathered (at most once per pass).
    audit_interval_seconds: float = 60.0
    #: An Audit policy with no would-deny for this long gets ReadyToEnforce True.
    ready_to_enforce_after_seconds: float = 24 * 3600.0
    network: ClusterNetwork = field(default_factory=ClusterNetwork)
    #: Where EgressGateways may live (the operator's write permissions end there); None:
    #: anywhere. A gateway elsewhere is reported NotAllowed and nothing is rendered for it.
    gateway_namespaces: frozenset[str] | None = None

    def gateway_namespace_allowed(self, namespace: str) -> bool:
        return self.gateway_namespaces is None or namespace in self.gateway_namespaces


def _first(store: Iterable[Any] | None) -> Any:
    return next(iter(store), None) if store is not None else None


def _condition_of(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def _ready_of(conditions: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return _condition_of(conditions, "Ready")


class ChainedIndex(Mapping[str, Iterable[PolicyEntry]]):
    """EgressPolicy and ClusterEgressPolicy indexes (both keyed by gateway) seen as one."""

    def __init__(self, *indexes: Mapping[str, Iterable[PolicyEntry]]) -> None:
        self.indexes = indexes

    def __getitem__(self, key: str) -> Iterable[PolicyEntry]:
        found = [entry for index in self.indexes for entry in index.get(key, ())]
        if not found and not any(key in index for index in self.indexes):
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for index in self.indexes:
            for key in index:
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        return len(set().union(*(set(index) for index in self.indexes)))


@dataclass
class Views:
    """What kopf's indexes hold; each is a mapping of key to an iterable of values."""

    gateways: Mapping[str, Iterable[Mapping[str, Any]]] = field(default_factory=dict)
    policies: Mapping[str, Iterable[PolicyEntry]] = field(default_factory=dict)
    namespaces: Mapping[str, Iterable[Mapping[str, str]]] = field(default_factory=dict)

    def namespace_labels(self) -> dict[str, Mapping[str, str]]:
        return {ns: _first(labels) or {} for ns, labels in self.namespaces.items()}


class Reconciler:
    def __init__(
        self,
        client: KubeClient,
        settings: Settings | None = None,
        metrics: Metrics | None = None,
        emit: Emit = _no_emit,
    ) -> None:
        self.client = client
        self.settings = settings or Settings()
        self.metrics = metrics or Metrics()
        self.emit = emit
        self.views = Views()
        self._dirty: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._hpa_absent: set[str] = set()
        self._gauged: set[str] = set()
        self._audit_due: dict[str, float] = {}  # gateway key -> monotonic time of next gather
        self._pods_forbidden_logged = False
        self._idle = asyncio.Event()
        self._idle.set()

    # --- scheduling ---------------------------------------------------------------------

    def request(self, key: str) -> None:
        """Ask for a pass over gateway ``ns/name`` soon; cheap, idempotent, coalescing."""
        self._dirty.add(key)
        wake = self._wake.get(key)
        if wake is not None:
            wake.set()  # a new change ends a retry back-off at once (e.g. after an outage)
        task = self._tasks.get(key)
        if task is None or task.done():
            self._idle.clear()
            self._tasks[key] = asyncio.create_task(self._worker(key), name=f"reconcile {key}")

    def request_all(self, predicate: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        for key, store in list(self.views.gateways.items()):
            body = _first(store)
            if body is not None and (predicate is None or predicate(body)):
                self.request(key)

    async def _worker(self, key: str) -> None:
        backoff = 1.0
        try:
            while key in self._dirty:
                await asyncio.sleep(self.settings.debounce_seconds)
                self._dirty.discard(key)
                try:
                    await self.reconcile(key)
                    backoff = 1.0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    level = logging.WARNING if isinstance(exc, ApiError) else logging.ERROR
                    log.log(
                        level,
                        "reconcile of gateway %s failed, retrying in %.0fs: %s",
                        key,
                        backoff,
                        exc,
                        exc_info=not isinstance(exc, ApiError),
                    )
                    self._dirty.add(key)
                    wake = self._wake[key] = asyncio.Event()
                    try:
                        await asyncio.wait_for(wake.wait(), backoff)
                    except TimeoutError:
                        pass
                    finally:
                        self._wake.pop(key, None)
                    backoff = min(backoff * 2, self.settings.max_backoff_seconds)
        finally:
            if all(t.done() or t is asyncio.current_task() for t in self._tasks.values()):
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # --- one pass -----------------------------------------------------------------------

    async def reconcile(self, key: str) -> None:
        started = time.monotonic()
        ok = False
        try:
            body = _first(self.views.gateways.get(key))
            if body is None:
                await self._orphaned(key)
            else:
                await self._reconcile_gateway(key, body)
            ok = True
        finally:
            self.metrics.observe("EgressGateway", time.monotonic() - started, ok)

    async def _orphaned(self, key: str) -> None:
        """The gateway does not exist: every policy pointing at it says so."""
        if key in self._gauged:
            self.metrics.forget(key)
            self._gauged.discard(key)
        verdicts = []
        for entry in self.views.policies.get(key, ()):
            if entry.policy is None:
                verdicts.append(Verdict(entry, "Invalid", f"{entry.error}", None))
            else:
                verdicts.append(
                    Verdict(entry, "GatewayNotFound", f"EgressGateway {key} does not exist", None)
                )
        await self._write_policy_statuses(verdicts)
        namespace, _, name = key.partition("/")
        if namespace and name:  # its guard NetworkPolicies live elsewhere: no owner GC
            await sync_guard(
                self.client,
                names=Names(name, namespace),
                spec=None,
                namespace_labels={},
                look=True,
            )

    async def _reconcile_gateway(self, key: str, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        namespace, name = str(meta["namespace"]), str(meta["name"])
        generation = int(meta.get("generation") or 0)
        previous = body.get("status") or {}
        if not self.settings.gateway_namespace_allowed(namespace):
            allowed = ", ".join(sorted(self.settings.gateway_namespaces or ()))
            message = (
                f"EgressGateways may only live in {allowed} (the chart's gatewayNamespaces): "
                f"nothing is rendered for {key}"
            )
            await self._gateway_invalid(body, message, generation, previous, reason="NotAllowed")
            await self._write_policy_statuses(
                [
                    Verdict(e, "GatewayInvalid", f"EgressGateway {key}: {message}", None)
                    for e in self.views.policies.get(key, ())
                ]
            )
            return
        try:
            gateway = parse_gateway(body, default_namespace=namespace)
        except PolicyError as exc:
            await self._gateway_invalid(body, str(exc), generation, previous)
            entries = list(self.views.policies.get(key, ()))
            await self._write_policy_statuses(
                [
                    Verdict(e, "GatewayInvalid", f"EgressGateway {key} is invalid: {exc}", None)
                    for e in entries
                ]
            )
            return
        names = Names(name, namespace)
        owner = Owner(name, str(meta.get("uid") or ""))

        compiled, binding_verdicts, too_large = await self._publish_bundle(
            gateway, names, owner, previous
        )
        deployment, service = await self._apply_workload(gateway, names, owner)
        guarded = await sync_guard(
            self.client,
            names=names,
            spec=guard_spec(gateway.workload),
            namespace_labels=self.views.namespace_labels(),
            look=bool(previous.get("guardedNamespaces")),
        )
        gathered = await self._gather_audit(names, binding_verdicts)
        await self._write_policy_statuses(binding_verdicts, gathered)

        ready_replicas = ready_replicas_of(deployment)
        addresses = addresses_of(service)
        wanted = int(((deployment or {}).get("spec") or {}).get("replicas") or 0)
        service_type = str(((service or {}).get("spec") or {}).get("type") or "ClusterIP")
        identity = assess_client_identity(service or {})
        identified = condition(
            CONDITION_CLIENTS_IDENTIFIED,
            ok=identity.identified,
            reason=identity.reason,
            message=identity.message,
            generation=generation,
            previous=previous.get("conditions") or (),
        )
        if too_large is not None:
            ready, reason, message = False, "BundleTooLarge", str(too_large)
        else:
            ready, reason, message = gateway_readiness(
                wanted_replicas=wanted,
                ready_replicas=ready_replicas,
                service_type=service_type,
                addresses=addresses,
            )
        status = gateway_status(
            generation=generation,
            previous=previous,
            reason=reason,
            message=message,
            ready=ready,
            policies=(
                len([v for v in binding_verdicts if v.compiled is not None])
                if compiled is not None
                else None
            ),
            bundle=bundle_status(compiled) if compiled is not None else None,
            ready_replicas=ready_replicas,
            addresses=addresses,
            guarded_namespaces=guarded,
            extra_conditions=[identified],
        )
        if compiled is not None:
            self.metrics.published(key, size=compiled.bytes, generation=compiled.generation)
            self._gauged.add(key)
        await self._write_gateway_status(body, previous, status)

    async def _gateway_invalid(
        self,
        body: Mapping[str, Any],
        message: str,
        generation: int,
        previous: Mapping[str, Any],
        *,
        reason: str = "Invalid",
    ) -> None:
        status = gateway_status(
            generation=generation,
            previous=previous,
            reason=reason,
            message=message,
            ready=False,
        )
        await self._write_gateway_status(body, previous, status)

    # --- the bundle -----------------------------------------------------------------------

    def _last_good(self, stored: StoredBundle) -> dict[str, Policy]:
        raw = stored.raw
        if raw is None:
            return {}
        try:
            return {p.key: p for p in load_bundle(raw).policies}
        except PolicyError as exc:
            log.warning("the stored bundle cannot be read back (%s); not carrying it over", exc)
            return {}

    async def _publish_bundle(
        self,
        gateway: Gateway,
        names: Names,
        owner: Owner,
        previous: Mapping[str, Any],
    ) -> tuple[Compiled | None, list[Verdict], BundleTooLarge | None]:
        path = resource_path("v1", "ConfigMap", names.namespace, names.bundle)
        known = int(((previous.get("bundle") or {}).get("generation")) or 0)
        entries = list(self.views.policies.get(names.key, ()))
        labels = self.views.namespace_labels()
        for attempt in range(CONFLICT_RETRIES):
            live = await self.client.get(path)
            stored = read_stored(live)
            needs_last_good = any(e.policy is None for e in entries)
            binding = bind(
                gateway,
                entries,
                labels,
                last_good=self._last_good(stored) if needs_last_good else None,
            )
            verdicts = list(binding.verdicts)
            try:
                compiled = compile_for_store(
                    gateway, binding.policies, stored, known_generation=known
                )
            except BundleTooLarge as exc:
                self.emit(
                    self._ref(gateway), type="Warning", reason="BundleTooLarge", message=str(exc)
                )
                return None, verdicts, exc
            if not compiled.changed:
                return compiled, verdicts, None
            obj = render_bundle_configmap(names, compiled, owner)
            try:
                if stored.resource_version is None:
                    await self.client.create(obj)
                else:
                    obj["metadata"]["resourceVersion"] = stored.resource_version
                    _keep_foreign_metadata(obj, live or {})
                    await self.client.replace(obj)
            except ApiError as exc:
                if exc.status == 409 and attempt + 1 < CONFLICT_RETRIES:
                    log.info(
                        "bundle ConfigMap %s/%s changed under us (%s); retrying",
                        names.namespace,
                        names.bundle,
                        exc.reason or "Conflict",
                    )
                    continue
                raise
            log.info(
                "published bundle %s generation %d sha256 %s (%d bytes%s, %d policies)",
                names.key,
                compiled.generation,
                compiled.sha256[:12],
                compiled.bytes,
                ", gzip" if compiled.compressed else "",
                len(binding.policies),
            )
            self.emit(
                self._ref(gateway),
                type="Normal",
                reason="BundlePublished",
                message=(
                    f"bundle generation {compiled.generation} ({compiled.sha256[:12]}): "
                    f"{len(binding.policies)} policies, {compiled.bytes} bytes"
                    + (", gzip-compressed" if compiled.compressed else "")
                ),
            )
            return compiled, verdicts, None
        raise ApiError(409, "bundle ConfigMap kept changing", "Conflict")  # pragma: no cover

    @staticmethod
    def _ref(gateway: Gateway) -> dict[str, Any]:
        return {
            "apiVersion": GROUP_VERSION,
            "kind": "EgressGateway",
            "metadata": {"name": gateway.name, "namespace": gateway.namespace},
        }

    # --- the workload ---------------------------------------------------------------------

    async def _apply_workload(
        self, gateway: Gateway, names: Names, owner: Owner
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        current_replicas: int | None = None
        autoscaling = bool(gateway.workload.get("autoscaling"))
        if autoscaling:
            live = await self.client.get(
                resource_path("apps/v1", "Deployment", names.namespace, names.workload)
            )
            if live is not None:
                value = (live.get("spec") or {}).get("replicas")
                current_replicas = value if isinstance(value, int) else None
        objects = render_workload(
            gateway,
            names,
            image=self.settings.gateway_image,
            owner=owner,
            current_replicas=current_replicas,
            network=self.settings.network,
        )
        deployment: dict[str, Any] | None = None
        service: dict[str, Any] | None = None
        for obj in objects:
            applied = await self._apply(obj)
            if obj["kind"] == "Deployment":
                deployment = applied
            elif obj["kind"] == "Service" and obj["metadata"]["name"] == names.workload:
                service = applied
        if autoscaling:
            self._hpa_absent.discard(names.key)
        elif names.key not in self._hpa_absent:
            path = resource_path(
                "autoscaling/v2", "HorizontalPodAutoscaler", names.namespace, names.workload
            )
            if await self.client.delete(path):
                log.info("deleted HorizontalPodAutoscaler %s (autoscaling unset)", path)
            self._hpa_absent.add(names.key)
        return deployment, service

    # --- the audit record ---------------------------------------------------------------------

    async def _gather_audit(self, names: Names, verdicts: list[Verdict]) -> Gathered | None:
        """The gateway pods' merged record, when a gather is due (else None: keep status)."""
        now = time.monotonic()
        if now < self._audit_due.get(names.key, 0.0):
            return None
        self._audit_due[names.key] = now + self.settings.audit_interval_seconds
        selector = ",".join(f"{k}={v}" for k, v in sorted(names.selector().items()))
        try:
            pods = await self.client.list(
                resource_path("v1", "Pod", names.namespace), label_selector=selector
            )
        except ApiError as exc:
            if exc.status == 403 and not self._pods_forbidden_logged:
                self._pods_forbidden_logged = True
                log.warning("cannot list gateway pods (%s): no audit record in status", exc)
            elif exc.status != 403:
                log.warning("listing the pods of gateway %s failed: %s", names.key, exc)
            return None
        found, total = targets(pods)
        reports, errors = await fetch_reports(found)
        for error in errors:
            log.info("audit record of gateway %s: %s", names.key, error)
        keys = [v.entry.key for v in verdicts if v.compiled is not None]
        return gather_from(
            reports, errors=errors, pods_ready=len(found), pods_total=total, keys=keys
        )

    def _with_audit(
        self, verdict: Verdict, desired: dict[str, Any], gathered: Gathered
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Add ``status.audit`` and ReadyToEnforce to ``desired``; (old, new) condition."""
        entry = verdict.entry
        policy = verdict.compiled
        if policy is None:
            return None, None
        previous = next((c for c in entry.conditions if c.get("type") == CONDITION), None)
        audit, condition = audit_status(
            key=entry.key,
            mode=policy.mode,
            gathered=gathered,
            previous_audit=entry.status_audit,
            previous_condition=previous,
            generation=entry.generation,
            quiet_seconds=self.settings.ready_to_enforce_after_seconds,
            now=time.time(),
        )
        if same_audit(entry.status_audit, audit) and entry.status_audit is not None:
            audit["observedAt"] = entry.status_audit.get("observedAt", audit["observedAt"])
        desired["audit"] = audit
        others = [c for c in desired["conditions"] if c.get("type") != CONDITION]
        desired["conditions"] = others + ([condition] if condition is not None else [])
        return (dict(previous) if previous else None), condition

    async def _apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply; when a hand edit makes that invalid (422), replace our lists.

        Server-side apply merges list entries by key: after someone changed a Service port
        from 3128 to 8080 by hand, applying port 3128 *adds* it next to 8080, both named
        ``proxy``, and the API server refuses the result (``spec.ports[1].name: Duplicate
        value``) - on every retry, forever. A JSON merge patch replaces lists whole, so it
        puts back exactly the rendered lists (maps are merged, so server-set fields such as
        ``clusterIP`` stay); the apply after it then succeeds and owns the fields again.
        """
        try:
            applied = await self.client.apply(obj)
        except ApiError as exc:
            if exc.status != 422:
                raise
            meta = obj["metadata"]
            log.warning(
                "applying %s %s/%s was refused (%s); a hand edit is in the way: replacing the"
                " rendered fields, then applying again",
                obj["kind"],
                meta.get("namespace"),
                meta["name"],
                exc.message,
            )
            body = {k: v for k, v in obj.items() if k not in _NOT_PATCHED}
            await self.client.merge_patch(path_of(obj), body)
            return await self.client.apply(obj)
        extra = hand_added_entries(obj, applied)
        if extra is None:
            return applied
        # Server-side apply leaves list entries another manager added (a port opened by
        # hand on the Service, a container added to the pod template): ours are exclusive.
        path, rendered = extra
        meta = obj["metadata"]
        log.warning(
            "%s %s/%s has hand-added %s entries; putting back the rendered list",
            obj["kind"],
            meta.get("namespace"),
            meta["name"],
            ".".join(path),
        )
        patch: dict[str, Any] = {path[-1]: rendered}
        for key in reversed(path[:-1]):
            patch = {key: patch}
        await self.client.merge_patch(path_of(obj), patch)
        return await self.client.apply(obj)

    # --- status -----------------------------------------------------------------------------

    async def _write_gateway_status(
        self, body: Mapping[str, Any], previous: Mapping[str, Any], status: dict[str, Any]
    ) -> None:
        old_ready = _ready_of(previous.get("conditions") or ()) or {}
        new_ready = status["conditions"][0]
        if not status_differs(previous, status):
            return
        old_identified = _condition_of(
            previous.get("conditions") or (), CONDITION_CLIENTS_IDENTIFIED
        )
        new_identified = _condition_of(status["conditions"], CONDITION_CLIENTS_IDENTIFIED)
        path = path_of(
            {
                "apiVersion": GROUP_VERSION,
                "kind": "EgressGateway",
                "metadata": body["metadata"],
            },
            "status",
        )
        try:
            await self.client.merge_patch(path, {"status": status})
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        if (old_ready.get("status"), old_ready.get("reason")) != (
            new_ready["status"],
            new_ready["reason"],
        ):
            kind = "Normal" if new_ready["status"] == "True" else "Warning"
            if new_ready["reason"] in ("Progressing", "AwaitingAddress"):
                kind = "Normal"
            self.emit(body, type=kind, reason=new_ready["reason"], message=new_ready["message"])
        if new_identified is not None and (
            (old_identified or {}).get("reason") != new_identified["reason"]
        ):
            unidentified = new_identified["status"] != "True"
            if unidentified or old_identified is not None:
                self.emit(
                    body,
                    type="Warning" if unidentified else "Normal",
                    reason=new_identified["reason"],
                    message=new_identified["message"],
                )

    async def _write_policy_statuses(
        self, verdicts: list[Verdict], gathered: Gathered | None = None
    ) -> None:
        semaphore = asyncio.Semaphore(STATUS_CONCURRENCY)

        async def one(verdict: Verdict) -> None:
            entry = verdict.entry
            desired = policy_status_from_verdict(verdict)
            old_cond = new_cond = None
            if gathered is not None:
                old_cond, new_cond = self._with_audit(verdict, desired, gathered)
            current = {
                "observedGeneration": entry.status_observed,
                "gateway": entry.status_gateway,
                "rules": entry.status_rules,
                "conditions": list(entry.conditions),
                "audit": entry.status_audit,
            }
            if not status_differs(current, desired):
                return
            path = resource_path(
                GROUP_VERSION, entry.kind, entry.namespace or None, entry.name, "status"
            )
            async with semaphore:
                try:
                    await self.client.merge_patch(path, {"status": desired})
                except ApiError as exc:
                    if exc.status == 404:
                        return
                    raise
            self._ready_to_enforce_event(entry.body_ref, old_cond, new_cond)
            old = _ready_of(entry.conditions) or {}
            new = desired["conditions"][0]
            if (old.get("reason"), old.get("message")) != (new["reason"], new["message"]):
                self.emit(
                    entry.body_ref,
                    type="Normal" if verdict.ready else "Warning",
                    reason=verdict.reason,
                    message=verdict.message,
                )

        await asyncio.gather(*(one(v) for v in verdicts))

    def _ready_to_enforce_event(
        self,
        ref: Mapping[str, Any],
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
    ) -> None:
        """An Event when ReadyToEnforce turns True, and when it stops being True."""
        if new is None or not _transition(old, new):
            return
        if new["status"] == "True":
            self.emit(ref, type="Normal", reason="ReadyToEnforce", message=new["message"])
        elif (old or {}).get("status") == "True":
            self.emit(ref, type="Normal", reason=new["reason"], message=new["message"])


def _transition(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> bool:
    return new is not None and (old or {}).get("status") != new.get("status")


#: Lists whose entries only the operator may set, with the fields that identify an entry.
EXCLUSIVE_LISTS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]] = {
    "Service": (("spec", "ports"), (("port", None), ("protocol", "TCP"))),
    "Deployment": (("spec", "template", "spec", "containers"), (("name", None),)),
}


def _dig(obj: Mapping[str, Any], path: tuple[str, ...]) -> list[Any]:
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return list(node) if isinstance(node, list) else []


def hand_added_entries(
    rendered: Mapping[str, Any], live: Mapping[str, Any]
) -> tuple[tuple[str, ...], list[Any]] | None:
    """(path, rendered list) when ``live`` has entries of an exclusive list we did not render."""
    spec = EXCLUSIVE_LISTS.get(str(rendered.get("kind")))
    if spec is None:
        return None
    path, keys = spec

    def ids(items: list[Any]) -> set[tuple[Any, ...]]:
        return {
            tuple(item.get(k, default) for k, default in keys)
            for item in items
            if isinstance(item, Mapping)
        }

    want = _dig(rendered, path)
    if ids(_dig(live, path)) <= ids(want):
        return None
    return path, want


def _keep_foreign_metadata(obj: dict[str, Any], live: Mapping[str, Any]) -> None:
    """A PUT replaces the whole object: keep labels and annotations others added."""
    live_meta = live.get("metadata") or {}
    for key in ("labels", "annotations"):
        merged = {**(live_meta.get(key) or {}), **(obj["metadata"].get(key) or {})}
        if merged:
            obj["metadata"][key] = merged


__all__ = ["Reconciler", "Settings", "Views", "policy_status"]
