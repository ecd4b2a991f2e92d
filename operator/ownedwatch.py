"""Watch one gateway's own objects, in its own namespace only.

Why not kopf handlers on Deployments, Services and ConfigMaps: kopf watches a resource in
every namespace, so the operator would need ``list``/``watch`` on every ConfigMap of the
cluster - Secrets-adjacent data it has no business reading. These watches are namespaced
and label-selected (``tidegate.io/gateway=<name>``), so the permission they need is the
Role in each gateway namespace, nothing cluster-wide.

They run inside the gateway's kopf daemon, so they stop while peering has paused this
replica (a standby never reconciles with stale indexes). Any change to an owned object -
a pod becoming ready, a load balancer address, a hand edit of the bundle - asks for a
reconcile pass, which coalesces with any other request for the same gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .kubeapi import ApiError, KubeClient, resource_path
from .render import (
    COMPONENT_IDENTITIES,
    LABEL_COMPONENT,
    LABEL_GATEWAY,
    LABEL_MANAGED_BY,
    MANAGER,
    Names,
)

log = logging.getLogger("tidegate.operator")

#: (apiVersion, kind) of the owned objects whose changes matter between resyncs.
WATCHED = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"))
WATCH_TIMEOUT_SECONDS = 300
RETRY_SECONDS = (1.0, 30.0)


def label_selector(names: Names) -> str:
    """Owned objects, except the identities ConfigMaps: those change with every pod start
    and stop, are written by the identities publisher (which puts hand edits back on its
    next pass), and must not cost a reconcile pass each."""
    return (
        f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_GATEWAY}={names.gateway},"
        f"{LABEL_COMPONENT}!={COMPONENT_IDENTITIES}"
    )


async def _watch_kind(
    client: KubeClient, names: Names, api_version: str, kind: str, changed: Callable[[], None]
) -> None:
    path = resource_path(api_version, kind, names.namespace)
    selector = label_selector(names)
    backoff = RETRY_SECONDS[0]
    version: str | None = None
    while True:
        try:
            if version is None:
                listing = await client.request("GET", path, params={"labelSelector": selector})
                version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                changed()  # whatever happened while nobody was watching
            async for event in client.watch(
                path,
                label_selector=selector,
                resource_version=version,
                timeout_seconds=WATCH_TIMEOUT_SECONDS,
            ):
                kind_of_event = event.get("type")
                obj = event.get("object") or {}
                if kind_of_event == "ERROR":  # 410 Gone and friends: list again
                    version = None
                    break
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind_of_event != "BOOKMARK":
                    changed()
            backoff = RETRY_SECONDS[0]
        except asyncio.CancelledError:
            raise
        except ApiError as exc:
            log.warning(
                "watch of %s in %s for gateway %s failed, retrying in %.0fs: %s",
                kind,
                names.namespace,
                names.gateway,
                backoff,
                exc,
            )
            version = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_SECONDS[1])


async def watch_owned(client: KubeClient, names: Names, changed: Callable[[], None]) -> None:
    """Run the watches until cancelled; ``changed`` is called on every change."""
    await asyncio.gather(
        *(_watch_kind(client, names, api_version, kind, changed) for api_version, kind in WATCHED)
    )
