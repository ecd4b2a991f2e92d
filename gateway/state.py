"""The gateway's live policy: the engine and resolver in force, swapped atomically.

The identity table (which pod is behind which client address) is separate from the
bundle: it changes with every pod start and stop, the bundle with policy edits. Each is
swapped on its own, and a connection reads both once, when it decides.

A reload builds a complete new ``Engine`` (and a new resolver if DNS settings changed)
and then replaces one reference. Connections read ``state.engine`` once, when they make
their decision, so a tunnel that is already open keeps running untouched and a new
connection sees either the old bundle or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import gc
import logging

from .bundle import Bundle
from .dns import Resolver
from .engine import Engine
from .identity import EMPTY_TABLE, IdentityTable, regresses
from .observe import Metrics

log = logging.getLogger("tidegate.gateway.state")


class GatewayState:
    def __init__(self, *, metrics: Metrics, dns_timeout: float = 5.0) -> None:
        self.metrics = metrics
        self.dns_timeout = dns_timeout
        self.engine: Engine | None = None
        self.resolver: Resolver | None = None
        self.generation = 0
        self.sha256 = ""
        self.ready = asyncio.Event()
        self.draining = False
        self._lock = asyncio.Lock()
        self.identities: IdentityTable = EMPTY_TABLE
        # In a cluster the gateway is not ready before the first identity table arrives:
        # until then every pod would be an unknown client (denied, but needlessly).
        self.identities_required = False
        self.identities_loaded = False

    def install_identities(self, table: IdentityTable, *, source: str) -> bool:
        """Swap in a new identity table (one reference; connections read it once).

        Refused (False, counted ``stale``) when it holds an older copy of some shard than
        the table in force: the identities arrive by two paths (watch and files)."""
        if self.identities_loaded and regresses(table.layout, self.identities.layout):
            self.metrics.identity_reloads.labels("stale").inc()
            log.info(
                "identities from %s hold an older shard than generation %d in force; "
                "waiting for the rest",
                source,
                self.identities.generation,
            )
            return False
        first = not self.identities_loaded
        self.identities = table
        self.identities_loaded = True
        self.metrics.identities_generation.set(table.generation)
        self.metrics.identities_addresses.set(len(table))
        self.metrics.identity_reloads.labels("success").inc()
        log.log(
            logging.INFO if first else logging.DEBUG,
            "identities generation %d (%d addresses, %d pods) in force, from %s",
            table.generation,
            len(table),
            table.pods,
            source,
        )
        return True

    def reject_identities(self, error: Exception, *, source: str) -> None:
        self.metrics.identity_reloads.labels("error").inc()
        log.error(
            "rejected identities update from %s, generation %d stays in force: %s",
            source,
            self.identities.generation,
            error,
        )

    @property
    def serving(self) -> bool:
        """Ready to decide: a bundle, and the identities when they are expected."""
        return self.engine is not None and (self.identities_loaded or not self.identities_required)

    def _install(self, bundle: Bundle, engine: Engine) -> None:
        if self.resolver is None or self.resolver.settings != bundle.gateway.dns:
            self.resolver = Resolver(bundle.gateway.dns, timeout=self.dns_timeout)
        self.engine = engine
        # The record keeps only the policies of the bundle in force: bounded by it.
        self.metrics.audit.retain({p.key for p in bundle.policies})
        self.generation = bundle.generation
        self.sha256 = bundle.sha256
        self.metrics.bundle_generation.set(bundle.generation)
        self.metrics.bundle_rules.set(engine.rule_count)
        self.ready.set()
        # The engine is hundreds of thousands of long-lived objects. Move them out of the
        # cyclic collector's way so its periodic full passes do not walk them per reload
        # (reference counting still frees the old engine when the last tunnel drops it).
        gc.collect()
        gc.freeze()

    async def apply(self, bundle: Bundle, *, source: str) -> bool:
        """Swap in ``bundle``; False when it is what we already serve or is older."""
        async with self._lock:
            if bundle.sha256 == self.sha256:
                self.metrics.bundle_reloads.labels("unchanged").inc()
                return False
            if self.engine is not None and 0 < bundle.generation < self.generation:
                log.info(
                    "ignoring bundle generation %d from %s: generation %d is in force",
                    bundle.generation,
                    source,
                    self.generation,
                )
                self.metrics.bundle_reloads.labels("stale").inc()
                return False
            # Indexing 100k rules takes a while; keep the event loop serving meanwhile.
            engine = await asyncio.to_thread(Engine, bundle.gateway, bundle.policies)
            self._install(bundle, engine)
        self.metrics.bundle_reloads.labels("success").inc()
        if not bundle.gateway.client_cidrs:
            log.warning(
                "the EgressGateway lists no clientCIDRs: every client is refused"
                " (client_not_allowed) until it does"
            )
        log.info(
            "bundle generation %d (sha256 %s, %d policies, %d rules) in force, from %s",
            bundle.generation,
            bundle.sha256[:12],
            len(bundle.policies),
            engine.rule_count,
            source,
        )
        return True

    def reject(self, error: Exception, *, source: str) -> None:
        self.metrics.bundle_reloads.labels("error").inc()
        log.error(
            "rejected policy update from %s, generation %d stays in force: %s",
            source,
            self.generation,
            error,
        )
