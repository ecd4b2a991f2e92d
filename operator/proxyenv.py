"""The per-gateway ConfigMap of proxy variables that workloads load with ``envFrom``.

Why a ConfigMap rather than docs alone: every workload needs the same handful of values
(the gateway's in-cluster address, and what must *not* go through it), and getting NO_PROXY
wrong either breaks in-cluster calls (the API server through the proxy) or leaks traffic
around the gateway. The operator knows the cluster's domain and ranges; workloads write
``envFrom: [{configMapRef: {name: <gateway>-proxy-env}}]`` and are done.

Clients disagree on the details, so the ConfigMap carries both spellings:

- curl reads only lowercase ``http_proxy`` (uppercase is ignored on purpose), Go, Python
  and most others read either; ``NO_PROXY`` entries are host names, ``.suffix`` domains,
  IPs and CIDRs (Go, curl >= 7.86 and requests understand CIDRs; urllib, Java and Node's
  undici do not, which is why the service/pod ranges are also covered by the ``.svc`` and
  cluster-domain suffixes where names are used);
- Java ignores the variables: ``TIDEGATE_JAVA_OPTIONS`` holds the equivalent ``-D``
  system properties for ``JAVA_TOOL_OPTIONS: $(TIDEGATE_JAVA_OPTIONS)``;
- Node's built-in ``fetch`` (undici) ignores them unless ``NODE_USE_ENV_PROXY=1`` (recent
  Node) or the program installs undici's ``EnvHttpProxyAgent``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CLUSTER_DOMAIN = "cluster.local"
API_SERVER_NAMES = ("kubernetes.default.svc", "kubernetes.default", "kubernetes")


@dataclass(frozen=True, slots=True)
class ClusterNetwork:
    """What the operator knows of the cluster's addressing (operator flags / chart values)."""

    domain: str = DEFAULT_CLUSTER_DOMAIN
    service_cidrs: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    api_server_hosts: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_environment(
        cls,
        *,
        domain: str = DEFAULT_CLUSTER_DOMAIN,
        service_cidrs: Sequence[str] = (),
        pod_cidrs: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> ClusterNetwork:
        """In a pod, KUBERNETES_SERVICE_HOST is the API server's in-cluster address."""
        env = os.environ if environ is None else environ
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        return cls(
            domain=domain.strip(".") or DEFAULT_CLUSTER_DOMAIN,
            service_cidrs=tuple(service_cidrs),
            pod_cidrs=tuple(pod_cidrs),
            api_server_hosts=(host,) if host else (),
        )


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        item = item.strip()
        if item and item not in seen:
            seen[item] = None
    return list(seen)


def no_proxy_entries(network: ClusterNetwork, extra: Iterable[str] = ()) -> list[str]:
    """Loopback, cluster names, the API server, service and pod ranges, then extras."""
    return _unique(
        [
            "localhost",
            "127.0.0.1",
            "::1",
            *API_SERVER_NAMES,
            *network.api_server_hosts,
            ".svc",
            f".{network.domain}",
            *network.service_cidrs,
            *network.pod_cidrs,
            *extra,
        ]
    )


def _java_non_proxy(entry: str) -> str | None:
    """A NO_PROXY entry as a Java http.nonProxyHosts pattern (None: Java cannot say it)."""
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        pass
    else:
        return entry if "/" not in entry else None
    if entry.startswith("."):
        return f"*{entry}"
    return entry


def java_options(host: str, port: int, entries: Iterable[str]) -> str:
    """``-D`` properties equivalent to the variables (http.nonProxyHosts serves https too)."""
    patterns = _unique(p for p in (_java_non_proxy(e) for e in entries) if p)
    return " ".join(
        [
            f"-Dhttp.proxyHost={host}",
            f"-Dhttp.proxyPort={port}",
            f"-Dhttps.proxyHost={host}",
            f"-Dhttps.proxyPort={port}",
            f"-Dhttp.nonProxyHosts={'|'.join(patterns)}",
        ]
    )


def proxy_env_data(
    *, host: str, port: int, network: ClusterNetwork, extra_no_proxy: Iterable[str] = ()
) -> dict[str, str]:
    url = f"http://{host}:{port}"
    entries = no_proxy_entries(network, extra_no_proxy)
    no_proxy = ",".join(entries)
    return {
        "HTTPS_PROXY": url,
        "https_proxy": url,
        "HTTP_PROXY": url,
        "http_proxy": url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        "NODE_USE_ENV_PROXY": "1",
        "TIDEGATE_JAVA_OPTIONS": java_options(host, port, entries),
    }


def render_proxy_env(
    *,
    network: ClusterNetwork,
    host: str,
    port: int,
    extra_no_proxy: Iterable[str],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The ``<gateway>-proxy-env`` ConfigMap (``meta`` built by the caller)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": proxy_env_data(
            host=host, port=port, network=network, extra_no_proxy=extra_no_proxy
        ),
    }
