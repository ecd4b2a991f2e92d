"""kopf handlers: thin adapters from watch events to reconcile requests.

Every handler does the same few things: refresh the reconciler's view of kopf's indexes,
work out which gateway(s) the event concerns, and request a pass for them. The work itself
(binding, bundle, workload, status, Events) lives in :mod:`tidegate.operator.reconcile`.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import kopf

from tidegate.gateway.kubeaccess import KubeAccess, KubeConfigError, load_access

from .binding import DEFAULT_GATEWAY, gateway_key_of, make_entry
from .defaultgwwatch import follow_default_gateway
from .identities import pod_record
from .identitypub import IdentityPublisher
from .kubeapi import KubeClient
from .metrics import Metrics
from .ownedwatch import watch_owned
from .reconcile import ChainedIndex, Reconciler, Settings, Views
from .render import Names

GROUP, VERSION = "tidegate.io", "v1alpha1"
POLICIES, GATEWAYS = "egresspolicies", "egressgateways"
CLUSTER_POLICIES = "clusteregresspolicies"
RESYNC_SECONDS = 60.0
#: Delays between retries of a failed API call (kopf's watches and patches): about ten
#: minutes of 2 s retries before kopf gives up on one call.
API_RETRY_BACKOFFS = (0.5, 1.0, 1.0, *([2.0] * 300))

log = logging.getLogger("tidegate.operator")


@dataclass
class Runtime:
    """The operator's shared state, handed to every handler through kopf's memo."""

    kubeconfig: str | None = None
    settings: Settings = field(default_factory=Settings)
    metrics: Metrics = field(default_factory=Metrics)
    resync_seconds: float = RESYNC_SECONDS
    #: "namespace/name" of the ConfigMap the default gateway is applied from (the chart's).
    default_gateway_spec: str | None = None
    access: KubeAccess | None = None
    logins: int = 0
    reconciler: Reconciler | None = None
    default_gateway_task: asyncio.Task[None] | None = None
    publisher: IdentityPublisher | None = None

    def attach(self, kwargs: Mapping[str, Any]) -> Reconciler:
        """Point the reconciler at kopf's live indexes."""
        if self.reconciler is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        self.reconciler.views = Views(
            gateways=kwargs["gateway_index"],
            policies=ChainedIndex(kwargs["policy_index"], kwargs["cluster_policy_index"]),
            namespaces=kwargs["namespace_index"],
        )
        if self.publisher is not None:
            self.publisher.pods = kwargs["pod_index"]
            self.publisher.gateways = kwargs["gateway_index"]
            self.publisher.namespaces = kwargs["namespace_index"]
        return self.reconciler

    def publish_identities(self, kwargs: Mapping[str, Any]) -> None:
        """Ask for an identities pass (pods or namespaces changed, a gateway appeared)."""
        self.attach(kwargs)
        if self.publisher is not None:
            self.publisher.request()


def _runtime(memo: Any) -> Runtime:
    runtime = getattr(memo, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise kopf.PermanentError("the operator was started without its runtime (use run())")
    return runtime


def _emit(body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
    try:
        kopf.event(
            kopf.Body(cast(Any, dict(body))), type=type, reason=reason, message=message[:1024]
        )
    except LookupError:  # outside kopf's context (tests): log only
        log.info("event %s %s: %s", type, reason, message)


# --- lifecycle ---------------------------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    runtime = _runtime(memo)
    settings.posting.level = logging.WARNING  # kopf's own chatter stays in the logs
    settings.persistence.finalizer = "tidegate.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tidegate.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="tidegate.io", key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # kopf's default back-off (1, 1, 2, 3, 5, 8, 13, 21 s) left the watches up to 21 s
    # behind an API server that came back from an outage; retry every 1-2 s instead.
    settings.networking.error_backoffs = API_RETRY_BACKOFFS
    access = await _access(runtime)
    client = KubeClient(access)
    runtime.reconciler = Reconciler(client, runtime.settings, runtime.metrics, _emit)
    if runtime.default_gateway_spec:
        runtime.default_gateway_task = asyncio.create_task(
            follow_default_gateway(
                client,
                configmap=runtime.default_gateway_spec,
                gateway=runtime.settings.default_gateway,
                emit=_emit,
            ),
            name="follow the default gateway's ConfigMap",
        )
    runtime.publisher = IdentityPublisher(
        client, namespace_allowed=runtime.settings.gateway_namespace_allowed
    )


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    runtime = _runtime(memo)
    if runtime.default_gateway_task is not None:
        runtime.default_gateway_task.cancel()
        await asyncio.gather(runtime.default_gateway_task, return_exceptions=True)
    if runtime.publisher is not None:
        await runtime.publisher.close()
    if runtime.reconciler is not None:
        await runtime.reconciler.close()
        await runtime.reconciler.client.close()


async def _access(runtime: Runtime) -> KubeAccess:
    if runtime.access is None:
        try:
            runtime.access = await load_access(runtime.kubeconfig)
        except KubeConfigError as exc:
            raise kopf.PermanentError(str(exc)) from None
    return runtime.access


@kopf.on.login()
async def login(memo: Any, **_: Any) -> kopf.AiohttpSession:
    """kopf signs in through the same credentials as the operator's writes and the gateway.

    kopf's built-in logins use the synchronous ``kubernetes`` package (or pykube), ignore
    ``--kubeconfig`` and refresh an exec plugin's token only after a 401; this hands kopf a
    session whose every request carries the shared, refreshed credentials instead. kopf
    calls it again after a 401 that survived a refresh: then the source is loaded afresh.
    """
    runtime = _runtime(memo)
    try:
        access = await _access(runtime)
        if runtime.logins:
            await access.reauthenticate(await access.authorization())
    except KubeConfigError as exc:
        raise kopf.LoginError(str(exc)) from None
    runtime.logins += 1
    return kopf.AiohttpSession(
        server=access.server,
        default_namespace=access.default_namespace,
        aiohttp_session=access.session(timeout=aiohttp.ClientTimeout(), limit=0),
    )


# --- indexes: what reconciles read instead of listing the API ----------------------------------


@kopf.index(GROUP, VERSION, GATEWAYS)
def gateway_index(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, Any]:
    return {f"{namespace or ''}/{name}": copy.deepcopy(dict(body))}


@kopf.index(GROUP, VERSION, POLICIES)
def policy_index(body: kopf.Body, memo: Any, **_: Any) -> dict[str, Any]:
    entry = make_entry(body, default_gateway=_runtime(memo).settings.default_gateway)
    return {entry.gateway: entry}


@kopf.index(GROUP, VERSION, CLUSTER_POLICIES)
def cluster_policy_index(body: kopf.Body, memo: Any, **_: Any) -> dict[str, Any]:
    entry = make_entry(body, default_gateway=_runtime(memo).settings.default_gateway)
    return {entry.gateway: entry}


@kopf.index("", "v1", "pods")
def pod_index(
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    spec: kopf.Spec,
    status: kopf.Status,
    **_: Any,
) -> dict[str, Any]:
    """address -> the pod claiming it (a few fields; the pod object itself is not kept)."""
    record = pod_record(
        namespace=namespace or "", name=name, labels=labels, spec=spec, status=status
    )
    return {} if record is None else {address: record for address in record.addresses}


@kopf.index("", "v1", "namespaces")
def namespace_index(name: str, labels: kopf.Labels, **_: Any) -> dict[str, Any]:
    return {name: dict(labels)}


# --- EgressPolicy ------------------------------------------------------------------------------


def _ref_key(spec: Any, namespace: str | None, default_gateway: str) -> str:
    return gateway_key_of(
        spec if isinstance(spec, Mapping) else {}, namespace or "", default_gateway
    )


@kopf.on.resume(GROUP, VERSION, POLICIES)
@kopf.on.create(GROUP, VERSION, POLICIES)
@kopf.on.update(GROUP, VERSION, POLICIES)
@kopf.on.resume(GROUP, VERSION, CLUSTER_POLICIES)
@kopf.on.create(GROUP, VERSION, CLUSTER_POLICIES)
@kopf.on.update(GROUP, VERSION, CLUSTER_POLICIES)
async def policy_changed(
    body: kopf.Body, old: Any, namespace: str | None, memo: Any, logger: Any, **kwargs: Any
) -> None:
    started = time.monotonic()
    runtime = _runtime(memo)
    reconciler = runtime.attach(kwargs)
    default = runtime.settings.default_gateway
    entry = make_entry(body, default_gateway=default)
    reconciler.request(entry.gateway)
    if isinstance(old, Mapping):
        previous = _ref_key(old.get("spec"), namespace or "", default)
        if previous != entry.gateway:
            reconciler.request(previous)  # it leaves that gateway's bundle
    if entry.error:
        logger.warning("invalid: %s", entry.error)
    runtime.metrics.observe(entry.kind, time.monotonic() - started, True)


@kopf.on.event(GROUP, VERSION, POLICIES)
@kopf.on.event(GROUP, VERSION, CLUSTER_POLICIES)
async def policy_event(
    type: str, body: kopf.Body, namespace: str | None, memo: Any, **kwargs: Any
) -> None:
    if type != "DELETED":
        return
    runtime = _runtime(memo)
    spec = body.get("spec")
    runtime.attach(kwargs).request(
        _ref_key(spec, namespace or "", runtime.settings.default_gateway)
    )


# --- EgressGateway -----------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, GATEWAYS)
@kopf.on.create(GROUP, VERSION, GATEWAYS)
@kopf.on.update(GROUP, VERSION, GATEWAYS)
async def gateway_changed(namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    runtime = _runtime(memo)
    runtime.attach(kwargs).request(f"{namespace or ''}/{name}")
    runtime.publish_identities(kwargs)


@kopf.daemon(GROUP, VERSION, GATEWAYS, cancellation_timeout=5)
async def gateway_resync(
    stopped: kopf.DaemonStopped, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    """Reconcile each gateway every ``--resync-seconds``, as a safety net for missed events.

    A kopf daemon rather than one loop of our own: kopf stops daemons while peering has
    paused this replica, so a standby (whose indexes no longer move) never publishes a stale
    bundle over the active replica's. The same goes for the watches of the gateway's own
    objects (:mod:`tidegate.operator.ownedwatch`), which run alongside. It carries no
    finalizer (see :func:`without_finalizer`), so it ends by itself once the gateway leaves
    the index.
    """
    runtime = _runtime(memo)
    key = f"{namespace or ''}/{name}"
    reconciler = runtime.attach(kwargs)
    watcher: asyncio.Task[None] | None = None
    if namespace and runtime.settings.gateway_namespace_allowed(namespace):
        watcher = asyncio.create_task(
            watch_owned(reconciler.client, Names(name, namespace), lambda: reconciler.request(key)),
            name=f"watch owned objects of {key}",
        )
    try:
        while not stopped:
            await stopped.wait(runtime.resync_seconds)
            if stopped or key not in kwargs["gateway_index"]:
                break  # stopped, or the gateway was deleted (no finalizer told kopf to stop us)
            runtime.attach(kwargs).request(key)
            runtime.publish_identities(kwargs)
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


def without_finalizer(fn: Any, registry: Any = None) -> int:
    """Register daemon ``fn`` without the finalizer kopf gives every daemon.

    kopf puts a finalizer on each object a daemon runs for, so that it can stop the daemon
    before the object goes. Ours needs no such care - it holds nothing and exits when the
    gateway leaves the index - and the finalizer outlived the operator: ``helm uninstall``
    removes the operator and the default EgressGateway together, the gateway then waited
    forever for a finalizer nobody would remove, and its namespace never went away. Objects
    that still carry the finalizer from an older operator lose it on their next event
    ("no handlers requiring it"). Returns how many handlers were changed.
    """
    spawning = (registry or kopf.get_default_registry())._spawning
    changed = 0
    for i, handler in enumerate(spawning._handlers):
        if getattr(handler, "fn", None) is fn and handler.requires_finalizer:
            spawning._handlers[i] = dataclasses.replace(handler, requires_finalizer=False)
            changed += 1
    return changed


without_finalizer(gateway_resync)


@kopf.on.event(GROUP, VERSION, GATEWAYS)
async def gateway_event(
    type: str, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> None:
    if type == "DELETED":  # its policies now point at nothing
        _runtime(memo).attach(kwargs).request(f"{namespace or ''}/{name}")


# --- namespaces: a label change can admit or refuse policies under a Selector ------------------


def _uses_selector(body: Mapping[str, Any]) -> bool:
    """Namespace labels matter to it: Selector admission, or a bypass guard (now or before)."""
    spec = body.get("spec") or {}
    if (spec.get("allowedPolicyNamespaces") or {}).get("from") == "Selector":
        return True
    return bool(spec.get("egressGuard") or (body.get("status") or {}).get("guardedNamespaces"))


@kopf.on.event("", "v1", "namespaces")
async def namespace_event(type: str | None, memo: Any, **kwargs: Any) -> None:
    if type is None:  # the initial listing: the gateways' own resume handlers cover it
        return
    runtime = _runtime(memo)
    runtime.attach(kwargs).request_all(_uses_selector)
    runtime.publish_identities(kwargs)  # namespaceSelector sees namespace labels


# --- pods: who is behind which client address ----------------------------------------------


@kopf.on.event("", "v1", "pods")
async def pod_event(type: str | None, memo: Any, **kwargs: Any) -> None:
    """Any pod change may move an address: publish (coalesced; unchanged shards skipped)."""
    if type is None:
        return  # the initial listing: the gateways' resume handlers publish once
    _runtime(memo).publish_identities(kwargs)


__all__ = ["DEFAULT_GATEWAY", "Runtime"]
