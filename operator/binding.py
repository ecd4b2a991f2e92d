"""Which EgressPolicies bind to which EgressGateway, and which of them it admits.

A policy names its gateway with ``spec.gatewayRef``; without one it binds to the
operator's default gateway (``--default-gateway``, ``tidegate-system/default``). The
gateway then admits it or not by ``allowedPolicyNamespaces``: All, Same (only its own
namespace) or Selector (namespaces whose labels match, like a label selector).
ClusterEgressPolicies are cluster-scoped - only whoever may create cluster objects can
write them - so every gateway admits them; allowedPolicyNamespaces is about namespaces.

Admission only decides whether a policy is in a gateway's bundle. What it can reach is
fixed by its kind: an EgressPolicy governs its own namespace's pods, whatever a gateway
admits (so one tenant can never allow or deny anything for another's workloads).

Everything here is pure: the handlers feed it what kopf's indexes hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tidegate.gateway.documents import PolicyError, parse_policy
from tidegate.gateway.model import CLUSTER, NAMESPACED, Gateway, NamespaceSelection, Policy

DEFAULT_GATEWAY = "tidegate-system/default"


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One EgressPolicy as the policy index keeps it: parsed, or the reason it is not."""

    namespace: str
    name: str
    gateway: str  # "namespace/name" of the gateway it binds to
    generation: int
    uid: str
    policy: Policy | None = None
    error: str | None = None
    conditions: tuple[Mapping[str, Any], ...] = ()
    status_gateway: str | None = None
    status_observed: int | None = None
    status_rules: int | None = None
    status_audit: Mapping[str, Any] | None = None
    body_ref: Mapping[str, Any] = field(default_factory=dict)
    kind: str = NAMESPACED

    @property
    def key(self) -> str:
        """As ``Policy.key``: ``namespace/name``, a cluster policy's bare name."""
        return self.name if self.kind == CLUSTER else f"{self.namespace}/{self.name}"


def gateway_key_of(raw_spec: Mapping[str, Any], namespace: str, default_gateway: str) -> str:
    """The gateway a policy object points at, even when the rest of it is invalid."""
    ref = raw_spec.get("gatewayRef") if isinstance(raw_spec, Mapping) else None
    if isinstance(ref, Mapping) and isinstance(ref.get("name"), str) and ref["name"]:
        ref_ns = ref.get("namespace")
        return f"{ref_ns if isinstance(ref_ns, str) and ref_ns else namespace}/{ref['name']}"
    return default_gateway


def make_entry(body: Mapping[str, Any], *, default_gateway: str = DEFAULT_GATEWAY) -> PolicyEntry:
    """Parse an EgressPolicy / ClusterEgressPolicy body into an index entry; never raises."""
    meta = body.get("metadata") or {}
    kind = CLUSTER if body.get("kind") == CLUSTER else NAMESPACED
    namespace = "" if kind == CLUSTER else str(meta.get("namespace") or "default")
    name = str(meta.get("name") or "")
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    gateway = gateway_key_of(spec, namespace, default_gateway)
    policy: Policy | None = None
    error: str | None = None
    try:
        policy = parse_policy(body, default_namespace=namespace)
    except PolicyError as exc:
        error = str(exc)
    rules = status.get("rules")
    observed = status.get("observedGeneration")
    return PolicyEntry(
        namespace=namespace,
        name=name,
        gateway=gateway,
        generation=int(meta.get("generation") or 0),
        uid=str(meta.get("uid") or ""),
        policy=policy,
        error=error,
        conditions=tuple(status.get("conditions") or ()),
        status_gateway=status.get("gateway"),
        status_observed=observed if isinstance(observed, int) else None,
        status_rules=rules if isinstance(rules, int) else None,
        status_audit=status.get("audit") if isinstance(status.get("audit"), Mapping) else None,
        body_ref={
            "apiVersion": body.get("apiVersion", "tidegate.io/v1alpha1"),
            "kind": kind,
            "metadata": {"name": name, "uid": meta.get("uid")}
            | ({"namespace": namespace} if namespace else {}),
        },
        kind=kind,
    )


# --- namespace selection ----------------------------------------------------------------------


def _expression_matches(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key = str(expr.get("key", ""))
    op = expr.get("operator")
    values = {str(v) for v in expr.get("values") or ()}
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    return False  # an unknown operator matches nothing (fail closed)


def selector_matches(selection: NamespaceSelection, labels: Mapping[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selection.match_labels.items()):
        return False
    return all(_expression_matches(e, labels) for e in selection.match_expressions)


def admits(
    gateway: Gateway, policy_namespace: str, namespace_labels: Mapping[str, str] | None
) -> bool:
    """Whether the gateway accepts policies from ``policy_namespace``.

    ``namespace_labels`` None means the namespace is unknown (not in the index): a
    Selector then admits nothing, which is the safe side.
    """
    selection = gateway.allowed_policy_namespaces
    if selection.from_ == "All":
        return True
    if selection.from_ == "Same":
        return policy_namespace == gateway.namespace
    if namespace_labels is None:
        return False
    return selector_matches(selection, namespace_labels)


# --- binding ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """How one policy stands with its gateway after a reconcile."""

    entry: PolicyEntry
    reason: str  # Accepted | Invalid | NotAllowed | GatewayNotFound | GatewayInvalid
    message: str
    compiled: Policy | None  # the version that went into the bundle, if any

    @property
    def ready(self) -> bool:
        return self.reason == "Accepted"


@dataclass(frozen=True, slots=True)
class Binding:
    verdicts: tuple[Verdict, ...]

    @property
    def policies(self) -> list[Policy]:
        return [v.compiled for v in self.verdicts if v.compiled is not None]

    @property
    def accepted(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.ready]


def bind(
    gateway: Gateway,
    entries: Iterable[PolicyEntry],
    namespace_labels: Mapping[str, Mapping[str, str]],
    *,
    last_good: Mapping[str, Policy] | None = None,
) -> Binding:
    """Decide every policy pointing at ``gateway``: compiled, carried over, or left out.

    An invalid policy never breaks the others. If the previous bundle held an accepted
    version of it (``last_good``), that version stays in force until it is fixed.
    """
    last_good = last_good or {}
    verdicts: list[Verdict] = []
    for entry in sorted(entries, key=lambda e: e.key):
        if entry.gateway != gateway.key:
            continue
        if entry.kind == NAMESPACED and not admits(
            gateway, entry.namespace, namespace_labels.get(entry.namespace)
        ):
            verdicts.append(
                Verdict(
                    entry,
                    "NotAllowed",
                    f"gateway {gateway.key} does not admit policies from namespace "
                    f"{entry.namespace} (allowedPolicyNamespaces: "
                    f"{gateway.allowed_policy_namespaces.from_})",
                    None,
                )
            )
            continue
        if entry.policy is None:
            previous = last_good.get(entry.key)
            suffix = (
                "; the last accepted version stays in force"
                if previous is not None
                else "; it is not in the bundle"
            )
            verdicts.append(Verdict(entry, "Invalid", f"{entry.error}{suffix}", previous))
            continue
        verdicts.append(
            Verdict(
                entry,
                "Accepted",
                f"{entry.policy.rule_count} rules bound to {gateway.key}",
                entry.policy,
            )
        )
    return Binding(tuple(verdicts))
