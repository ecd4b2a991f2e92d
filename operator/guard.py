"""The bypass guard: NetworkPolicies that leave a namespace's pods only the gateway.

A forward proxy governs only the traffic sent to it; a pod that connects straight to the
internet is not stopped by it. ``spec.egressGuard`` selects namespaces by label, and for
each one the operator keeps a NetworkPolicy that selects every pod there and allows egress
only to cluster DNS, to the gateway's pods on the proxy port, and to ``allowedCIDRs``.

NetworkPolicies live in the guarded namespaces, not the gateway's, and an ownerReference
cannot cross namespaces (the garbage collector would delete the object at once), so the
operator owns them by label instead and removes them itself: when a namespace stops
matching, when the guard is removed, and when the gateway is deleted.

Some namespaces are never guarded, whatever the selector says: the gateway's own (its pods
must reach the internet), the DNS namespace, and the cluster's ``kube-*`` system namespaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from tidegate.gateway.model import NamespaceSelection

from .binding import selector_matches
from .render import LABEL_GATEWAY, LABEL_MANAGED_BY, MANAGER, Names

LABEL_GATEWAY_NAMESPACE = "tidegate.io/gateway-namespace"
LABEL_COMPONENT = "app.kubernetes.io/component"
COMPONENT = "egress-guard"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
DEFAULT_DNS_NAMESPACE = "kube-system"
DEFAULT_DNS_LABELS = {"k8s-app": "kube-dns"}
DNS_PORT = 53
MAX_NAME = 253


def _mapping(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def guard_spec(workload: Mapping[str, Any]) -> dict[str, Any] | None:
    """``spec.egressGuard`` of a gateway, or None when it has none."""
    spec = workload.get("egressGuard")
    return dict(spec) if isinstance(spec, Mapping) else None


def _selection(spec: Mapping[str, Any]) -> NamespaceSelection:
    selector = _mapping(spec.get("namespaceSelector"))
    labels = {str(k): str(v) for k, v in _mapping(selector.get("matchLabels")).items()}
    exprs = tuple(_mapping(e) for e in selector.get("matchExpressions") or [])
    return NamespaceSelection("Selector", labels, exprs)


def dns_namespace(spec: Mapping[str, Any]) -> str:
    return str(_mapping(spec.get("dns")).get("namespace") or DEFAULT_DNS_NAMESPACE)


def never_guarded(names: Names, spec: Mapping[str, Any]) -> frozenset[str]:
    return SYSTEM_NAMESPACES | {names.namespace, dns_namespace(spec)}


def guarded_namespaces(
    names: Names, spec: Mapping[str, Any], namespace_labels: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """Namespaces whose labels match the selector, less the ones never guarded, sorted.

    An empty selector matches nothing here (the CRD refuses it too): guarding every
    namespace by accident would cut the cluster off.
    """
    selection = _selection(spec)
    if not selection.match_labels and not selection.match_expressions:
        return []
    skip = never_guarded(names, spec)
    return sorted(
        ns
        for ns, labels in namespace_labels.items()
        if ns not in skip and selector_matches(selection, labels)
    )


def policy_name(names: Names) -> str:
    """``tidegate-guard-<gateway namespace>-<gateway>``, shortened with a hash if too long."""
    name = f"tidegate-guard-{names.namespace}-{names.gateway}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(names.key.encode()).hexdigest()[:10]
    return f"{name[: MAX_NAME - 11]}-{digest}"


def guard_labels(names: Names) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_COMPONENT: COMPONENT,
        LABEL_GATEWAY: names.gateway,
        LABEL_GATEWAY_NAMESPACE: names.namespace,
    }


def guard_label_selector(names: Names) -> str:
    return ",".join(f"{k}={v}" for k, v in guard_labels(names).items())


def render_guard_policy(
    names: Names, namespace: str, spec: Mapping[str, Any], *, proxy_port: int
) -> dict[str, Any]:
    """The NetworkPolicy for one guarded namespace."""
    dns = _mapping(spec.get("dns"))
    dns_labels = {str(k): str(v) for k, v in _mapping(dns.get("podLabels")).items()}
    egress: list[dict[str, Any]] = [
        {
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {NAMESPACE_NAME_LABEL: dns_namespace(spec)}
                    },
                    "podSelector": {"matchLabels": dns_labels or dict(DEFAULT_DNS_LABELS)},
                }
            ],
            "ports": [
                {"protocol": "UDP", "port": DNS_PORT},
                {"protocol": "TCP", "port": DNS_PORT},
            ],
        },
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: names.namespace}},
                    "podSelector": {"matchLabels": names.selector()},
                }
            ],
            "ports": [{"protocol": "TCP", "port": proxy_port}],
        },
    ]
    cidrs = [str(c) for c in spec.get("allowedCIDRs") or []]
    if cidrs:
        egress.append({"to": [{"ipBlock": {"cidr": c}} for c in cidrs]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": policy_name(names),
            "namespace": namespace,
            "labels": guard_labels(names),
            "annotations": {"tidegate.io/egress-gateway": names.key},
        },
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": egress},
    }


def stale(existing: Iterable[Mapping[str, Any]], wanted: Iterable[str]) -> list[tuple[str, str]]:
    """(namespace, name) of guard policies that exist but are no longer wanted."""
    keep = set(wanted)
    out: list[tuple[str, str]] = []
    for obj in existing:
        meta = _mapping(obj.get("metadata"))
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        if namespace and name and namespace not in keep:
            out.append((namespace, name))
    return sorted(out)
