"""A small asyncio client for the few Kubernetes API calls the reconciler makes.

kopf owns watching; this owns writing: server-side apply of the rendered objects, the
bundle ConfigMap with optimistic concurrency, status patches. Credentials come from
``--kubeconfig``, else in-cluster ServiceAccount files, else ``$KUBECONFIG`` or
``~/.kube/config``; the same credentials are handed to kopf by the login handler.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
FIELD_MANAGER = "tidegate-operator"


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.status in (409, 429) or self.status >= 500


@dataclass(frozen=True, slots=True)
class Credentials:
    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    default_namespace: str | None = None

    def current_token(self) -> str | None:
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError:
                return self.token
        return self.token


def _b64(value: str | None) -> bytes | None:
    return base64.b64decode(value) if value else None


def _relative(path: str | None, base: Path) -> str | None:
    if not path:
        return None
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else base / p)


def from_kubeconfig(path: str | os.PathLike[str]) -> Credentials:
    """Read the current context of one kubeconfig file (token or client certificate)."""
    file = Path(os.path.expanduser(os.fspath(path)))
    config = yaml.safe_load(file.read_text()) or {}
    base = file.parent
    current = config.get("current-context")
    contexts = {c["name"]: c.get("context") or {} for c in config.get("contexts") or []}
    if not current or current not in contexts:
        raise ValueError(f"{file}: no usable current-context")
    context = contexts[current]
    clusters = {c["name"]: c.get("cluster") or {} for c in config.get("clusters") or []}
    users = {u["name"]: u.get("user") or {} for u in config.get("users") or []}
    cluster = clusters.get(context.get("cluster"), {})
    user = users.get(context.get("user"), {})
    if not cluster.get("server"):
        raise ValueError(f"{file}: context {current!r} has no cluster server")
    return Credentials(
        server=str(cluster["server"]).rstrip("/"),
        ca_file=_relative(cluster.get("certificate-authority"), base),
        ca_data=_b64(cluster.get("certificate-authority-data")),
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        token=user.get("token"),
        token_file=_relative(user.get("tokenFile"), base),
        cert_file=_relative(user.get("client-certificate"), base),
        key_file=_relative(user.get("client-key"), base),
        cert_data=_b64(user.get("client-certificate-data")),
        key_data=_b64(user.get("client-key-data")),
        default_namespace=context.get("namespace"),
    )


def in_cluster() -> Credentials | None:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = SA_DIR / "token"
    if not host or not token.is_file():
        return None
    if ":" in host:
        host = f"[{host}]"
    namespace_file = SA_DIR / "namespace"
    return Credentials(
        server=f"https://{host}:{port}",
        ca_file=str(SA_DIR / "ca.crt"),
        token_file=str(token),
        default_namespace=(
            namespace_file.read_text().strip() if namespace_file.is_file() else None
        ),
    )


def discover(kubeconfig: str | None) -> Credentials:
    if kubeconfig:
        return from_kubeconfig(kubeconfig)
    cluster = in_cluster()
    if cluster is not None:
        return cluster
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "~/.kube/config")
    return from_kubeconfig(first)


def ssl_context(creds: Credentials) -> ssl.SSLContext | bool:
    if not creds.server.startswith("https"):
        return False
    ctx = ssl.create_default_context(cafile=creds.ca_file)
    if creds.ca_data:
        ctx.load_verify_locations(cadata=creds.ca_data.decode())
    if creds.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if creds.cert_file and creds.key_file:
        ctx.load_cert_chain(creds.cert_file, creds.key_file)
    elif creds.cert_data and creds.key_data:
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
            cert.write_bytes(creds.cert_data)
            key.write_bytes(creds.key_data)
            ctx.load_cert_chain(str(cert), str(key))
    return ctx


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
    "EgressGateway": "egressgateways",
    "Namespace": "namespaces",
    "Pod": "pods",
    "NetworkPolicy": "networkpolicies",
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

    def __init__(self, creds: Credentials, *, timeout: float = 30.0) -> None:
        self.creds = creds
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def _get_session(self) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is None or self._session.closed:
                connector = aiohttp.TCPConnector(ssl=ssl_context(self.creds), limit=32)
                self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        token = self.creds.current_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        try:
            async with session.request(
                method, self.creds.server + path, data=data, headers=headers, params=params
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
