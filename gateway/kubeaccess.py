"""How Tidegate signs in to the Kubernetes API: one code path for the gateway and the operator.

The credentials are read by kubernetes_asyncio, the maintained asyncio Kubernetes client
(docs/kubernetes-access.md says why this library and not ``kubernetes`` or lightkube): it
merges a multi-path ``$KUBECONFIG`` the way kubectl does, runs exec credential plugins
(``aws eks get-token`` and friends), reads auth-provider, tokenFile, client certificates,
``proxy-url`` and ``tls-server-name``, and re-reads the in-cluster ServiceAccount token so
projected-token rotation works.

What this module adds on top is small and the same for every caller:

- which source applies (``--kubeconfig``, else ``$KUBECONFIG``, else the in-cluster
  ServiceAccount, else ``~/.kube/config``), with one clear error line when none does;
- *when* credentials are refreshed: shortly before an exec plugin's token expires, and at
  once after the API server answers 401 (a revoked or rotated token), by loading the source
  again - never on every request;
- one aiohttp session factory (CA, client certificate, proxy, TLS server name, and the
  current ``Authorization`` header put on each request by a middleware). The gateway's
  ConfigMap watch, the operator's writes and kopf's own watches (``kopf.AiohttpSession``)
  all use it;
- ``*-data`` fields that Python's ``ssl`` can only load from files are written once per
  content into one private directory (mode 0700) that is removed when the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import logging
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader
from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger

log = logging.getLogger("tidegate.kube")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = "~/.kube/config"
#: Refresh an exec plugin's token this long before it expires (at most a quarter of its
#: lifetime, so short-lived tokens are not refreshed on every request).
REFRESH_BEFORE_EXPIRY = 60.0
#: Where a source came from, for log lines and errors.
IN_CLUSTER = "in-cluster ServiceAccount"


class KubeConfigError(ValueError):
    """No usable credentials: the message is one line naming the source and the problem."""


# --- the private directory for ``*-data`` fields ------------------------------------------

_private_dir: str | None = None


def _temp_dir() -> str:
    """One 0700 directory per process; kubernetes_asyncio dedupes its files by content."""
    global _private_dir
    if _private_dir is None or not os.path.isdir(_private_dir):
        _private_dir = tempfile.mkdtemp(prefix="tidegate-kube-")
        atexit.register(remove_temp_files)
    return _private_dir


def remove_temp_files() -> None:
    """Remove the private directory (at exit; tests call it too)."""
    global _private_dir
    if _private_dir is not None:
        shutil.rmtree(_private_dir, ignore_errors=True)
        _private_dir = None
        # The library caches file names by content: forget the ones we just removed.
        from kubernetes_asyncio.config import kube_config

        cache: dict[str, str] = kube_config._temp_files
        for key in [k for k, v in cache.items() if not os.path.exists(v)]:
            del cache[key]


# --- sources ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where credentials come from: kubeconfig paths (``os.pathsep``-separated) or in-cluster."""

    kubeconfig: str | None = None
    context: str | None = None

    @property
    def description(self) -> str:
        return self.kubeconfig or IN_CLUSTER


def choose_source(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    sa_dir: Path = SA_DIR,
) -> Source:
    """``--kubeconfig``, else ``$KUBECONFIG``, else in-cluster, else ``~/.kube/config``.

    This is kubectl's order, with the in-cluster ServiceAccount where client-go puts it when
    nothing else is configured.
    """
    env = os.environ if environ is None else environ
    if kubeconfig:
        return Source(os.fspath(kubeconfig), context)
    if env.get("KUBECONFIG", "").strip(os.pathsep):
        return Source(env["KUBECONFIG"], context)
    if env.get("KUBERNETES_SERVICE_HOST") and (sa_dir / "token").is_file():
        return Source(None, context)
    return Source(DEFAULT_KUBECONFIG, context)


@dataclass(frozen=True, slots=True)
class Loaded:
    configuration: Configuration
    expires: datetime.datetime | None
    default_namespace: str | None


def _existing_files(paths: str) -> list[str]:
    """The files of a ``$KUBECONFIG``-style list that exist (kubectl skips the others)."""
    expanded = (os.path.expanduser(p) for p in paths.split(os.pathsep) if p.strip())
    return [p for p in expanded if os.path.isfile(p)]


async def _load_kubeconfig(source: Source) -> Loaded:
    assert source.kubeconfig is not None
    readable = _existing_files(source.kubeconfig)
    if not readable:
        raise KubeConfigError(f"kubeconfig {source.kubeconfig}: no such file")
    try:
        merger = KubeConfigMerger(os.pathsep.join(readable))
        loader = KubeConfigLoader(
            config_dict=merger.config,
            config_base_path=None,
            active_context=source.context,
            temp_file_path=_temp_dir(),
        )
        configuration = Configuration()
        await loader.load_and_set(configuration)
    except (ConfigException, KeyError, TypeError, AssertionError, OSError, ValueError) as exc:
        detail = str(exc) or type(exc).__name__
        raise KubeConfigError(f"kubeconfig {source.kubeconfig}: {detail}") from None
    if not configuration.host or configuration.host == "http://localhost":
        raise KubeConfigError(f"kubeconfig {source.kubeconfig}: the cluster has no server")
    context = loader.current_context or {}
    namespace = (context.get("context") or {}).get("namespace")
    expires = getattr(loader, "exec_plugin_expiry", None)
    return Loaded(configuration, expires, str(namespace) if namespace else None)


def _load_in_cluster(sa_dir: Path, environ: Mapping[str, str] | None) -> Loaded:
    configuration = Configuration()
    try:
        InClusterConfigLoader(
            token_filename=str(sa_dir / "token"),
            cert_filename=str(sa_dir / "ca.crt"),
            try_refresh_token=True,  # re-reads the projected token file every minute
            environ=dict(os.environ if environ is None else environ),
        ).load_and_set(configuration)
    except (ConfigException, OSError) as exc:
        raise KubeConfigError(f"{IN_CLUSTER}: {exc}") from None
    namespace_file = sa_dir / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else None
    return Loaded(configuration, None, namespace or None)


# --- access -------------------------------------------------------------------------------


Clock = Callable[[], float]


class KubeAccess:
    """Credentials for one API server, refreshed when they expire or are refused.

    Build with :func:`load_access` (it runs exec plugins, so it is async). Sessions made by
    :meth:`session` put the current ``Authorization`` header on every request.
    """

    def __init__(
        self,
        source: Source,
        loaded: Loaded,
        *,
        sa_dir: Path = SA_DIR,
        environ: Mapping[str, str] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.source = source
        self._sa_dir = sa_dir
        self._environ = environ
        self._clock = clock
        self._lock = asyncio.Lock()
        self.reloads = 0
        self._set(loaded)

    def _set(self, loaded: Loaded) -> None:
        self.configuration = loaded.configuration
        self.default_namespace = loaded.default_namespace
        self.expires = loaded.expires
        self._refresh_at: float | None = None
        if loaded.expires is not None:
            expires = loaded.expires
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=datetime.UTC)
            at = expires.timestamp()
            lifetime = max(at - self._clock(), 0.0)
            self._refresh_at = at - min(REFRESH_BEFORE_EXPIRY, lifetime / 4)

    # --- what callers read ------------------------------------------------------------

    @property
    def server(self) -> str:
        return str(self.configuration.host).rstrip("/")

    @property
    def proxy(self) -> str | None:
        proxy = self.configuration.proxy
        return str(proxy) if proxy else None

    @property
    def tls_server_name(self) -> str | None:
        name = self.configuration.tls_server_name
        return str(name) if name else None

    def ssl_context(self) -> ssl.SSLContext | bool:
        """CA, client certificate and verification exactly as the kubeconfig says."""
        cfg = self.configuration
        if not self.server.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file or None)
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def authorization(self) -> str | None:
        """The ``Authorization`` header value now, refreshed first if it is about to expire."""
        if self._refresh_at is not None and self._clock() >= self._refresh_at:
            async with self._lock:
                if self._refresh_at is not None and self._clock() >= self._refresh_at:
                    await self._reload("the token expires")
        # The library's hook re-reads an in-cluster token file here (projected tokens rotate).
        value = await self.configuration.get_api_key_with_prefix("BearerToken")
        return str(value) if value else None

    async def reauthenticate(self, refused: str | None) -> bool:
        """After a 401 with header ``refused``: load the source again. True if it changed."""
        async with self._lock:
            current = await self.configuration.get_api_key_with_prefix("BearerToken")
            if current != refused:
                return True  # another request already refreshed it
            await self._reload("the API server refused the credentials (401)")
            return await self.configuration.get_api_key_with_prefix("BearerToken") != refused

    async def _reload(self, why: str) -> None:
        self._set(await _load(self.source, self._sa_dir, self._environ))
        self.reloads += 1
        log.info("kubernetes credentials from %s reloaded: %s", self.source.description, why)

    # --- sessions ---------------------------------------------------------------------

    def session(
        self,
        *,
        timeout: aiohttp.ClientTimeout | None = None,
        limit: int = 32,
    ) -> aiohttp.ClientSession:
        """An aiohttp session to the API server (create it inside the running event loop)."""
        connector = aiohttp.TCPConnector(ssl=self.ssl_context(), limit=limit)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout or aiohttp.ClientTimeout(total=30),
            proxy=self.proxy,
            trust_env=False,  # the API server is reached directly unless proxy-url says not
            middlewares=(self._middleware,),
        )

    async def _middleware(
        self,
        request: aiohttp.ClientRequest,
        handler: Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]],
    ) -> aiohttp.ClientResponse:
        if self.tls_server_name:
            request.server_hostname = self.tls_server_name
        header = await self.authorization()
        if header:
            request.headers["Authorization"] = header
        response = await handler(request)
        if response.status != 401:
            return response
        if not await self.reauthenticate(header):
            return response
        response.release()
        header = await self.authorization()
        if header:
            request.headers["Authorization"] = header
        return await handler(request)


async def _load(source: Source, sa_dir: Path, environ: Mapping[str, str] | None) -> Loaded:
    if source.kubeconfig is None:
        return _load_in_cluster(sa_dir, environ)
    return await _load_kubeconfig(source)


async def load_access(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    sa_dir: Path = SA_DIR,
) -> KubeAccess:
    """Choose the source (see :func:`choose_source`), load it, and return the access."""
    source = choose_source(kubeconfig, context=context, environ=environ, sa_dir=sa_dir)
    loaded = await _load(source, sa_dir, environ)
    access = KubeAccess(source, loaded, sa_dir=sa_dir, environ=environ)
    log.debug("kubernetes credentials from %s for %s", source.description, access.server)
    return access


__all__ = [
    "KubeAccess",
    "KubeConfigError",
    "Source",
    "choose_source",
    "load_access",
    "remove_temp_files",
]
