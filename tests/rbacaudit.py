"""Compare what an identity did (a kube-apiserver audit log) with what RBAC grants it.

Pure: parsing the audit log's JSON lines, expanding RBAC rules into grants, and matching.
The grants come from the chart as rendered (Role rules are valid in the gateway
namespaces, ClusterRole rules everywhere), never from a list written down here, so the
comparison stays right as verbs are added or removed in the chart.

A ClusterRole grant counts as *used* only by a request a Role could not have served: a
cluster-wide request (a list or watch across namespaces, a cluster-scoped resource) or a
request in a namespace that is not a gateway namespace. That is what proves the
cluster-wide part of the RBAC is needed cluster-wide.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Request:
    """One API request, as the audit log records it."""

    user: str
    verb: str
    group: str
    resource: str  # with "/subresource" when there is one
    namespace: str | None
    name: str | None
    code: int
    uri: str


@dataclass(frozen=True, slots=True)
class Grant:
    """One (verb, group, resource) a rule allows, in a namespace-scope or cluster-wide."""

    verb: str
    group: str
    resource: str
    cluster_wide: bool
    names: frozenset[str] = frozenset()  # resourceNames; empty: any

    def covers(self, request: Request, gateway_namespaces: Iterable[str]) -> bool:
        if (self.verb, self.group, self.resource) != (
            request.verb,
            request.group,
            request.resource,
        ):
            return False
        if self.names and request.name not in self.names:
            return False
        if self.cluster_wide:
            return True
        return request.namespace is not None and request.namespace in set(gateway_namespaces)

    def describe(self) -> str:
        where = "cluster-wide" if self.cluster_wide else "in the gateway namespaces"
        group = self.group or "core"
        names = f" {sorted(self.names)}" if self.names else ""
        return f"{self.verb} {group}/{self.resource}{names} ({where})"


def read_audit_log(path: Path) -> list[Request]:
    """Completed requests (one per request: watches log ResponseStarted too, then Complete)."""
    seen: dict[str, Request] = {}
    if not path.exists():
        return []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # non-resource URLs (/api, /version): discovery, not RBAC resources
        resource = str(ref["resource"])
        if ref.get("subresource"):
            resource = f"{resource}/{ref['subresource']}"
        request = Request(
            user=str((event.get("user") or {}).get("username") or ""),
            verb=str(event.get("verb") or ""),
            group=str(ref.get("apiGroup") or ""),
            resource=resource,
            namespace=ref.get("namespace"),
            name=ref.get("name"),
            code=int((event.get("responseStatus") or {}).get("code") or 0),
            uri=str(event.get("requestURI") or ""),
        )
        seen[str(event.get("auditID"))] = request
        if request.verb == "patch" and request.code == 201:
            # a server-side apply that created the object: authorized as create too
            seen[f"{event.get('auditID')}/create"] = Request(
                request.user,
                "create",
                request.group,
                request.resource,
                request.namespace,
                request.name,
                request.code,
                request.uri,
            )
    return list(seen.values())


def grants_of(rbac: Iterable[Mapping[str, Any]]) -> list[Grant]:
    """Every (verb, group, resource) the ClusterRoles and Roles in ``rbac`` allow."""
    out: list[Grant] = []
    for doc in rbac:
        if doc.get("kind") not in ("ClusterRole", "Role"):
            continue
        cluster_wide = doc["kind"] == "ClusterRole"
        for rule in doc.get("rules") or []:
            names = frozenset(rule.get("resourceNames") or ())
            for group in rule.get("apiGroups") or [""]:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        out.append(Grant(verb, group, resource, cluster_wide, names))
    return out


@dataclass
class Comparison:
    unused: list[Grant]
    denied: list[Request]
    uncovered: list[Request]  # allowed by the server, yet not by the chart's RBAC
    requests: int


def compare(
    requests: Iterable[Request],
    grants: list[Grant],
    *,
    users: set[str],
    gateway_namespaces: set[str],
) -> Comparison:
    mine = [r for r in requests if r.user in users]
    # A 403 on something the chart grants is the API server's authorizer not being ready
    # (a test restarts the server to simulate an outage), not a missing permission.
    denied = [
        r
        for r in mine
        if r.code == 403 and not any(g.covers(r, gateway_namespaces) for g in grants)
    ]
    allowed = [r for r in mine if r.code != 403]
    uncovered = [r for r in allowed if not any(g.covers(r, gateway_namespaces) for g in grants)]
    used: set[Grant] = set()
    for request in allowed:
        in_gateway_ns = request.namespace is not None and request.namespace in gateway_namespaces
        for grant in grants:
            if not grant.covers(request, gateway_namespaces):
                continue
            if grant.cluster_wide and in_gateway_ns:
                # a Role could have served it: it proves nothing about the ClusterRole,
                # unless no Role grant covers it
                if any(g.covers(request, gateway_namespaces) for g in grants if not g.cluster_wide):
                    continue
            used.add(grant)
    unused = [g for g in grants if g not in used]
    return Comparison(unused=unused, denied=denied, uncovered=uncovered, requests=len(mine))
