"""Follow the chart's default-gateway ConfigMap and apply the EgressGateway it describes.

A watch of that one ConfigMap (by name, in the release namespace) rather than a kopf
handler: kopf would watch ConfigMaps in every namespace, and the operator has no business
reading every ConfigMap of the cluster. The chart grants get/list/watch on this ConfigMap
alone (``resourceNames``). Applying the same spec twice is a no-op, so a standby replica
running this too does no harm.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from .defaultgw import SpecError, gateway_from_configmap
from .kubeapi import ApiError, KubeClient, resource_path

log = logging.getLogger("tidegate.operator")

RETRY_SECONDS = (1.0, 30.0)
WATCH_TIMEOUT_SECONDS = 300


class Emit(Protocol):
    def __call__(
        self, body: Mapping[str, Any], *, type: str, reason: str, message: str
    ) -> None: ...


async def _apply(
    client: KubeClient, configmap: Mapping[str, Any], gateway: str, emit: Emit
) -> None:
    meta = configmap.get("metadata") or {}
    where = f"{meta.get('namespace')}/{meta.get('name')}"
    try:
        body = gateway_from_configmap(configmap, gateway=gateway)
    except SpecError as exc:
        message = f"the default gateway's spec in {where} is unusable: {exc}"
        log.warning("%s", message)
        emit(configmap, type="Warning", reason="DefaultGatewayRejected", message=message)
        return
    try:
        await client.apply(body)
    except ApiError as exc:
        if exc.retryable or exc.status in (403, 404):  # RBAC or the CRD not served yet
            raise
        message = f"applying the default gateway from {where}: {exc}"
        log.warning("%s", message)
        emit(configmap, type="Warning", reason="DefaultGatewayRejected", message=message)
        return
    log.info("applied the default gateway %s from %s", gateway, where)


async def follow_default_gateway(
    client: KubeClient, *, configmap: str, gateway: str, emit: Emit
) -> None:
    """Run until cancelled: apply on start and on every change of ``configmap`` (ns/name)."""
    namespace, _, name = configmap.partition("/")
    path = resource_path("v1", "ConfigMap", namespace)
    selector = f"metadata.name={name}"
    backoff = RETRY_SECONDS[0]
    while True:
        try:
            listing = await client.request("GET", path, params={"fieldSelector": selector})
            version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
            for item in listing.get("items") or []:
                await _apply(client, item, gateway, emit)
            async for event in client.watch(
                path,
                field_selector=selector,
                resource_version=version,
                timeout_seconds=WATCH_TIMEOUT_SECONDS,
            ):
                if event.get("type") in ("ADDED", "MODIFIED"):
                    await _apply(client, event.get("object") or {}, gateway, emit)
                elif event.get("type") == "ERROR":
                    break
            backoff = RETRY_SECONDS[0]
        except asyncio.CancelledError:
            raise
        except ApiError as exc:
            log.warning(
                "following the default gateway's ConfigMap %s failed, retrying in %.0fs: %s",
                configmap,
                backoff,
                exc,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_SECONDS[1])
