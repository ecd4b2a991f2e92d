"""Publishing client identities: pod churn in, a few small ConfigMap writes out.

Kept apart from the gateway reconcile pass on purpose: a pass applies the whole workload
and may rewrite a large bundle; a pod starting or stopping must cost one write of one
identities shard per gateway, within a fraction of a second. Requests coalesce (a short
debounce, then one pass over every gateway); the documents are computed once per pass
and written only where their sha256 changed. Every write carries a generation that grows
per gateway and never goes back, so a gateway can ignore anything older than it holds.

Order of writes in a pass: the shards, then the index. When the shard count changes the
gateway keeps its table until it has the new index and every shard of the new layout;
shards beyond a smaller new count are emptied last (kept, so the operator needs no
delete permission; gateways ignore shards of another layout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .identities import (
    Document,
    PodRecord,
    Resolved,
    build_documents,
    resolve,
    retired_shard,
)
from .kubeapi import ApiError, KubeClient, resource_path
from .render import (
    ANN_IDENTITIES_GENERATION,
    ANN_IDENTITIES_SHA,
    COMPONENT_IDENTITIES,
    LABEL_COMPONENT,
    MAX_IDENTITY_SHARDS,
    Names,
    Owner,
    object_meta,
)

log = logging.getLogger("tidegate.operator.identities")

DEBOUNCE_SECONDS = 0.05
CONFLICT_RETRIES = 5
IDENTITIES_KEY = "identities.json"


@dataclass
class _Stored:
    sha256: str | None
    resource_version: str | None


@dataclass
class _GatewayState:
    loaded: bool = False
    shards: int = 1
    generation: int = 0
    stored: dict[str, _Stored] = field(default_factory=dict)


def _first(store: Iterable[Any] | None) -> Any:
    return next(iter(store), None) if store is not None else None


class IdentityPublisher:
    def __init__(
        self,
        client: KubeClient,
        *,
        debounce: float = DEBOUNCE_SECONDS,
        namespace_allowed: Callable[[str], bool] = lambda _: True,
    ) -> None:
        self.client = client
        self.debounce = debounce
        # Gateways only in namespaces the operator may write to (--gateway-namespace).
        self.namespace_allowed = namespace_allowed
        self.pods: Mapping[str, Iterable[PodRecord]] = {}
        self.gateways: Mapping[str, Iterable[Mapping[str, Any]]] = {}
        self.namespaces: Mapping[str, Iterable[Mapping[str, str]]] = {}
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self._states: dict[str, _GatewayState] = {}
        self.passes = 0
        self.writes = 0

    def request(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._worker(), name="publish identities")

    async def _worker(self) -> None:
        backoff = 1.0
        while self._dirty:
            await asyncio.sleep(self.debounce)
            self._dirty = False
            try:
                await self.publish_all()
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("publishing identities failed, retrying in %.0fs: %s", backoff, exc)
                self._dirty = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def publish_all(self) -> None:
        started = time.monotonic()
        resolved = resolve(self.pods)
        namespaces = {ns: _first(labels) or {} for ns, labels in self.namespaces.items()}
        bodies = [
            (k, body)
            for k, v in list(self.gateways.items())
            if (body := _first(v))
            and self.namespace_allowed(str((body.get("metadata") or {}).get("namespace")))
        ]
        results = await asyncio.gather(
            *(self.publish(key, body, resolved, namespaces) for key, body in bodies if body),
            return_exceptions=True,
        )
        self.passes += 1
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        log.debug(
            "identities pass: %d addresses, %d withdrawn, %d gateways, %.3fs",
            sum(len(a) for _, a in resolved.pods.values()),
            len(resolved.withdrawn),
            len(bodies),
            time.monotonic() - started,
        )

    async def _load(self, names: Names, state: _GatewayState) -> None:
        """Learn what is stored (after a restart): shard count, generations, shas."""
        # Never below the wall clock (µs): gateways ignore older documents, so a count that
        # started again at 1 (the ConfigMaps deleted while the operator was down) would be
        # ignored by every running gateway. The stored generations may be higher still.
        state.generation = max(state.generation, time.time_ns() // 1000)
        for name in [names.identities] + [
            names.identity_shard(i) for i in range(MAX_IDENTITY_SHARDS)
        ]:
            live = await self.client.get(resource_path("v1", "ConfigMap", names.namespace, name))
            if live is None:
                if name != names.identities:
                    break  # shards are numbered without gaps
                continue
            meta = live.get("metadata") or {}
            annotations = meta.get("annotations") or {}
            try:
                state.generation = max(
                    state.generation, int(annotations.get(ANN_IDENTITIES_GENERATION, 0))
                )
            except (TypeError, ValueError):
                pass
            state.stored[name] = _Stored(
                annotations.get(ANN_IDENTITIES_SHA), meta.get("resourceVersion")
            )
            if name == names.identities:
                try:  # the layout in force is the index's
                    index = json.loads((live.get("data") or {}).get(IDENTITIES_KEY) or "{}")
                    state.shards = max(1, int(index.get("shards") or 1))
                except (ValueError, TypeError):
                    pass
        state.loaded = True

    async def publish(
        self,
        key: str,
        body: Mapping[str, Any],
        resolved: Resolved,
        namespaces: Mapping[str, Mapping[str, str]],
    ) -> None:
        meta = body.get("metadata") or {}
        names = Names(str(meta.get("name")), str(meta.get("namespace")))
        owner = Owner(names.gateway, str(meta.get("uid") or ""))
        state = self._states.setdefault(key, _GatewayState())
        if not state.loaded:
            await self._load(names, state)
        index, shards = build_documents(
            resolved, namespaces, index_name=names.identities, current_shards=state.shards
        )
        changed = [d for d in shards if self._differs(state, d)]
        await asyncio.gather(*(self._write(names, owner, state, d) for d in changed))
        if self._differs(state, index):
            await self._write(names, owner, state, index)
        for i in range(len(shards), state.shards):
            # A shard the smaller layout no longer uses: emptied (no stale addresses left
            # behind), not deleted; gateways ignore shards of another layout.
            retired = retired_shard(names.identity_shard(i), i, state.shards)
            if self._differs(state, retired):
                await self._write(names, owner, state, retired)
        state.shards = len(shards)

    @staticmethod
    def _differs(state: _GatewayState, doc: Document) -> bool:
        stored = state.stored.get(doc.name)
        return stored is None or stored.sha256 != doc.sha256

    async def _write(self, names: Names, owner: Owner, state: _GatewayState, doc: Document) -> None:
        path = resource_path("v1", "ConfigMap", names.namespace, doc.name)
        for attempt in range(CONFLICT_RETRIES):
            state.generation += 1
            meta = object_meta(names, owner, doc.name)
            meta["labels"][LABEL_COMPONENT] = COMPONENT_IDENTITIES
            meta["annotations"] = {
                ANN_IDENTITIES_SHA: doc.sha256,
                ANN_IDENTITIES_GENERATION: str(state.generation),
            }
            obj: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta,
                "data": {IDENTITIES_KEY: doc.payload(state.generation)},
            }
            stored = state.stored.get(doc.name)
            try:
                if stored is None or stored.resource_version is None:
                    written = await self.client.create(obj)
                else:
                    meta["resourceVersion"] = stored.resource_version
                    written = await self.client.replace(obj)
            except ApiError as exc:
                if exc.status in (404, 409) and attempt + 1 < CONFLICT_RETRIES:
                    live = await self.client.get(path)
                    version = ((live or {}).get("metadata") or {}).get("resourceVersion")
                    state.stored[doc.name] = _Stored(None, version)
                    continue
                raise
            self.writes += 1
            state.stored[doc.name] = _Stored(
                doc.sha256, (written.get("metadata") or {}).get("resourceVersion")
            )
            return
