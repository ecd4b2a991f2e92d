"""Run the gateway: load the first bundle, open both ports, reload live, stop cleanly.

The process exits 0 after a SIGTERM/SIGINT drain (see ``ProxyServer.shutdown`` for the
order), so an orchestrator's rolling update never records a failure for a clean stop.
SIGHUP re-reads the policy sources at once, as proxies do; it never stops the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from aiohttp import web

from .addresses import IPNetwork
from .admin import make_admin_app
from .kubeaccess import KubeConfigError, load_access
from .observe import AccessLog, Metrics
from .proxy import ProxyServer
from .proxyproto import TrustedPeers
from .settings import Limits
from .sources import (
    BundleFileSource,
    ConfigMapSource,
    DirectorySource,
    IdentityConfigMaps,
    IdentityFileSource,
)
from .state import GatewayState

log = logging.getLogger("tidegate.gateway")

Polled = DirectorySource | BundleFileSource | IdentityFileSource
Watched = ConfigMapSource | IdentityConfigMaps


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    listen: tuple[str, int]
    metrics_listen: tuple[str, int] | None
    policies: Path | None = None
    bundle: Path | None = None
    configmap: tuple[str, str] | None = None
    identities: Path | None = None
    identities_configmap: tuple[str, str] | None = None
    kubeconfig: Path | None = None
    reload_interval: float = 1.0
    limits: Limits = field(default_factory=Limits)
    access_log: IO[str] | None = sys.stdout
    # PROXY protocol on: the peers that must send the header (None: off).
    proxy_protocol_from: tuple[IPNetwork, ...] | None = None


def unreadable_policies(directory: Path) -> str | None:
    """Why the policies folder cannot be read at all (None when it can)."""
    if not directory.exists():
        return f"policies folder {directory}: no such directory"
    if not directory.is_dir():
        return f"policies folder {directory}: not a directory"
    try:
        next(iter(directory.iterdir()), None)
    except OSError as exc:
        return f"policies folder {directory}: {exc.strerror or exc}"
    return None


def unreadable_bundle(path: Path) -> str | None:
    """Why neither the bundle file nor its ``.gz`` form can be read (None when one can)."""
    candidates = [path, path.with_name(path.name + ".gz")]
    errors = []
    for candidate in candidates:
        try:
            with candidate.open("rb") as f:
                f.read(1)
            return None
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"{candidate}: {exc.strerror or exc}")
    return "; ".join(errors) or f"bundle {path}: no such file"


async def run_gateway(options: GatewayOptions) -> int:
    metrics = Metrics(audit_destinations=options.limits.audit_destinations)
    metrics.connections_limit.set(options.limits.max_connections)
    state = GatewayState(metrics=metrics, dns_timeout=options.limits.dns_timeout)
    access_log = AccessLog(options.access_log)
    tasks: list[asyncio.Task[None]] = []
    polled: list[Polled] = []
    watched: list[Watched] = []

    if options.policies is not None:
        problem = unreadable_policies(options.policies)
        if problem:
            log.error("cannot start: %s", problem)
            return 2
        directory = DirectorySource(options.policies, state, interval=options.reload_interval)
        await directory.load_once()
        polled.append(directory)
    if options.bundle is not None:
        # In a pod the mounted bundle may not exist yet: the ConfigMap watch supplies it.
        problem = None if options.configmap else unreadable_bundle(options.bundle)
        if problem:
            log.error("cannot start: %s", problem)
            return 2
        file_source = BundleFileSource(options.bundle, state, interval=options.reload_interval)
        await file_source.load_once()
        polled.append(file_source)
    identities = options.identities
    if identities is None and options.policies is not None:
        identities = options.policies  # ClientIdentities documents beside the policies
    if identities is not None:
        identity_files = IdentityFileSource(identities, state, interval=options.reload_interval)
        await identity_files.load_once()
        polled.append(identity_files)
    if options.configmap is not None or options.identities_configmap is not None:
        namespace, name = options.configmap or options.identities_configmap or ("", "")
        try:
            access = await load_access(options.kubeconfig)
        except KubeConfigError as exc:
            log.error("cannot watch configmap %s/%s: %s", namespace, name, exc)
            return 2
        if options.configmap is not None:
            namespace, name = options.configmap
            watched.append(ConfigMapSource(namespace, name, state, access=access))
        if options.identities_configmap is not None:
            namespace, name = options.identities_configmap
            state.identities_required = True
            watched.append(IdentityConfigMaps(namespace, name, state, access=access))
    tasks.extend(asyncio.create_task(source.run()) for source in polled)
    tasks.extend(_watch_task(source) for source in watched)
    if state.engine is None:
        log.warning("no valid policy bundle yet: answering 503 until one loads")

    peers = (
        None if options.proxy_protocol_from is None else TrustedPeers(options.proxy_protocol_from)
    )
    proxy = ProxyServer(
        state=state,
        limits=options.limits,
        metrics=metrics,
        access_log=access_log,
        proxy_peers=peers,
    )
    if peers is not None:
        log.info(
            "PROXY protocol: required from %s; other peers are direct clients",
            ", ".join(map(str, peers.networks)),
        )
    runner: web.AppRunner | None = None
    if options.metrics_listen is not None:
        runner = web.AppRunner(make_admin_app(state=state, metrics=metrics), access_log=None)
        await runner.setup()
    try:
        if runner is not None and options.metrics_listen is not None:
            await web.TCPSite(runner, *options.metrics_listen).start()
            log.info("metrics and health on %s:%d", *options.metrics_listen)
            for address in runner.addresses:
                proxy.add_own_socket(str(address[0]), int(address[1]))
        bound = await proxy.listen(*options.listen)
    except OSError as exc:  # a port in use or not ours: say so in one line, exit non-zero
        log.error("cannot listen: %s", exc)
        for task in tasks:
            task.cancel()
        if runner is not None:
            await runner.cleanup()
        return 1
    log.info("proxy listening on %s", ", ".join(f"{h}:{p}" for h, p in bound))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(_reload(polled, watched, tasks))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    log.info("stopping: draining %d connections", len(proxy.connections))
    await proxy.shutdown()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if runner is not None:
        await runner.cleanup()
    log.info("stopped")
    return 0


async def _reload(
    polled: list[Polled],
    watched: list[Watched],
    tasks: list[asyncio.Task[None]],
) -> None:
    """SIGHUP: re-read every file source now; restart the API watches (a fresh list)."""
    log.info("SIGHUP: reloading the policy sources")
    for source in polled:
        try:
            await source.reload()
        except Exception:  # a reload must never stop the gateway
            log.exception("reload of %s failed", source)
    for watch in watched:
        for i, task in enumerate(tasks):
            if getattr(task, "source", None) is watch:
                task.cancel()
                tasks[i] = _watch_task(watch)


def _watch_task(source: Watched) -> asyncio.Task[None]:
    task = asyncio.create_task(source.run())
    task.source = source  # type: ignore[attr-defined]
    return task
