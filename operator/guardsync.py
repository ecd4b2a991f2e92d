"""Keep a gateway's bypass-guard NetworkPolicies in line with its spec and the namespaces.

Separate from the pure renderers in :mod:`tidegate.operator.guard`: this is the part that
talks to the API server. One cluster-wide list by label finds what exists (the policies
sit in other namespaces, so there is no owner to garbage-collect them); wanted ones are
server-side applied, the rest deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .guard import guard_label_selector, guarded_namespaces, render_guard_policy, stale
from .kubeapi import KubeClient, resource_path
from .render import PROXY_PORT, Names

log = logging.getLogger("tidegate.operator")

API_VERSION = "networking.k8s.io/v1"
KIND = "NetworkPolicy"


async def sync_guard(
    client: KubeClient,
    *,
    names: Names,
    spec: Mapping[str, object] | None,
    namespace_labels: Mapping[str, Mapping[str, str]],
    look: bool,
) -> list[str]:
    """Apply the wanted guard policies, delete stale ones; return the guarded namespaces.

    ``look``: whether to list existing policies even without a guard in the spec (the
    gateway guarded namespaces before, or it was deleted) - skipped otherwise, so a
    gateway that never used the guard costs no API call.
    """
    wanted = guarded_namespaces(names, spec, namespace_labels) if spec is not None else []
    if spec is None and not look:
        return []
    existing = await client.list(
        resource_path(API_VERSION, KIND, None), label_selector=guard_label_selector(names)
    )
    for namespace in wanted:
        assert spec is not None
        await client.apply(render_guard_policy(names, namespace, spec, proxy_port=PROXY_PORT))
    for namespace, name in stale(existing, wanted):
        if await client.delete(resource_path(API_VERSION, KIND, namespace, name)):
            log.info(
                "deleted egress guard NetworkPolicy %s/%s (gateway %s no longer guards it)",
                namespace,
                name,
                names.key,
            )
    return wanted
