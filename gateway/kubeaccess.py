"""How the gateway reaches the Kubernetes API: in-cluster, or from a kubeconfig.

The gateway needs exactly one thing from the API - to watch its bundle ConfigMap - so it
carries this small reader instead of a Kubernetes client library: a bearer token (re-read
on every request, since projected tokens rotate) or a client certificate, and the CA.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class KubeAccess:
    server: str
    ca_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.token
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers


def in_cluster() -> KubeAccess:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    if not host:
        raise KubeConfigError("not in a cluster (KUBERNETES_SERVICE_HOST is unset)")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    ca = SA_DIR / "ca.crt"
    return KubeAccess(
        server=f"https://{host}:{port}",
        ca_file=str(ca) if ca.exists() else None,
        token_file=str(SA_DIR / "token"),
    )


def _materialise(data: str, suffix: str) -> str:
    """Write ``*-data`` (base64) fields to private temp files: ssl wants paths."""
    fd, path = tempfile.mkstemp(prefix="tidegate-kube-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data))
    return path


def _named(items: Any, name: Any, kind: str) -> Mapping[str, Any]:
    for item in items or []:
        if item.get("name") == name:
            return item.get(kind) or {}
    raise KubeConfigError(f"kubeconfig has no {kind} named {name!r}")


def from_kubeconfig(path: Path) -> KubeAccess:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from None
    context_name = config.get("current-context")
    context = _named(config.get("contexts"), context_name, "context")
    cluster = _named(config.get("clusters"), context.get("cluster"), "cluster")
    user = _named(config.get("users"), context.get("user"), "user")
    base = path.parent

    def local(p: str | None) -> str | None:
        return None if p is None else str((base / p) if not os.path.isabs(p) else p)

    ca = local(cluster.get("certificate-authority"))
    if cluster.get("certificate-authority-data"):
        ca = _materialise(cluster["certificate-authority-data"], ".crt")
    cert = local(user.get("client-certificate"))
    key = local(user.get("client-key"))
    if user.get("client-certificate-data"):
        cert = _materialise(user["client-certificate-data"], ".crt")
    if user.get("client-key-data"):
        key = _materialise(user["client-key-data"], ".key")
    server = cluster.get("server")
    if not server:
        raise KubeConfigError(f"kubeconfig {path}: cluster has no server")
    return KubeAccess(
        server=str(server).rstrip("/"),
        ca_file=ca,
        token=user.get("token"),
        token_file=local(user.get("tokenFile")),
        cert_file=cert,
        key_file=key,
    )
