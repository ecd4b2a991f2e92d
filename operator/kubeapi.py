"""A small asyncio client for the few Kubernetes API calls the reconciler makes.

kopf owns watching; this owns writing: server-side apply of the rendered objects, the
bundle ConfigMap with optimistic concurrency, status patches. Credentials and the HTTP
session come from :mod:`tidegate.gateway.kubeaccess`, the one sign-in code path the gateway
and kopf use too (kubernetes_asyncio reads the kubeconfig or the in-cluster ServiceAccount).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from tidegate.gateway.kubeaccess import KubeAccess, KubeConfigError

FIELD_MANAGER = "tidegate-operator"
#: A watch event is one JSON line; a bundle ConfigMap is at most ~1 MiB (etcd's limit).
MAX_WATCH_EVENT_BYTES = 8 * 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.status in (409, 429) or self.status >= 500


# --- paths ------------------------------------------------------------------------------

_PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps",
    "Service": "services",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "EgressPolicy": "egresspolicies",
    "ClusterEgressPolicy": "clusteregresspolicies",
    "EgressGateway": "egressgateways",
    "Pod": "pods",
    "NetworkPolicy": "networkpolicies",
    "Namespace": "namespaces",
}


def resource_path(
    api_version: str,
    kind: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [prefix]
    if namespace:
        parts.append(f"namespaces/{quote(namespace)}")
    parts.append(_PLURALS[kind])
    if name:
        parts.append(quote(name))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def path_of(obj: Mapping[str, Any], subresource: str | None = None) -> str:
    meta = obj["metadata"]
    return resource_path(
        obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource
    )


# --- the client ---------------------------------------------------------------------------


class KubeClient:
    """One aiohttp session to the API server. Create inside the running event loop."""

    def __init__(self, access: KubeAccess, *, timeout: float = 30.0) -> None:
        self.access = access
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def _get_session(self) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is None or self._session.closed:
                self._session = self.access.session(timeout=self._timeout, limit=32)
            return self._session

    async def _get_watch_session(self) -> aiohttp.ClientSession:
        """Watches hold a connection each: their own pool, so they never starve requests."""
        async with self._lock:
            if self._watch_session is None or self._watch_session.closed:
                self._watch_session = self.access.session(
                    timeout=aiohttp.ClientTimeout(total=None), limit=0
                )
            return self._watch_session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._watch_session is not None:
            await self._watch_session.close()
            self._watch_session = None

    async def watch(
        self,
        path: str,
        *,
        label_selector: str = "",
        field_selector: str = "",
        resource_version: str,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) of a collection, from ``resource_version``.

        Ends when the server closes the watch (after ``timeout_seconds``); an ``ERROR``
        event (e.g. 410 Gone: the version is too old) is yielded for the caller to re-list.
        """
        session = await self._get_watch_session()
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        read_timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        try:
            async with session.get(
                self.access.server + path,
                headers={"Accept": "application/json"},
                params=params,
                timeout=read_timeout,
            ) as resp:
                if resp.status >= 400:
                    text = await resp.text()
                    raise ApiError(resp.status, text[:500], resp.reason or "")
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    if len(buffer) > MAX_WATCH_EVENT_BYTES:
                        raise ApiError(502, "watch event too large", "BadGateway")
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            event = json.loads(line)
                            if isinstance(event, dict):
                                yield event
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ApiError(503, f"{type(exc).__name__}: {exc}", "Unavailable") from exc
        except KubeConfigError as exc:
            raise ApiError(401, str(exc), "Unauthorized") from exc

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        session = await self._get_session()
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        try:
            async with session.request(
                method, self.access.server + path, data=data, headers=headers, params=params
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        status = json.loads(text)
                        message = str(status.get("message", text))
                        reason = str(status.get("reason", ""))
                    except ValueError:
                        message, reason = text[:500], ""
                    raise ApiError(resp.status, message, reason)
                return dict(json.loads(text)) if text else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(503, f"{type(exc).__name__}: {exc}", "Unavailable") from exc
        except KubeConfigError as exc:  # refreshing the credentials failed (exec plugin...)
            raise ApiError(401, str(exc), "Unauthorized") from exc

    async def list(self, path: str, *, label_selector: str) -> list[dict[str, Any]]:
        """The items of a collection that match ``label_selector``."""
        found = await self.request("GET", path, params={"labelSelector": label_selector})
        items = found.get("items") or []
        return [dict(i) for i in items if isinstance(i, dict)]

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return await self.request("POST", path, body=obj, params={"fieldManager": FIELD_MANAGER})

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT; with metadata.resourceVersion set, a concurrent change makes it 409."""
        return await self.request(
            "PUT", path_of(obj), body=obj, params={"fieldManager": FIELD_MANAGER}
        )

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply: creates, or puts every field this manager owns back."""
        return await self.request(
            "PATCH",
            path_of(obj),
            body=obj,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": FIELD_MANAGER, "force": "true" if force else "false"},
        )

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str) -> bool:
        """Delete in the background (owned objects go with it); False if already gone."""
        try:
            await self.request("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
