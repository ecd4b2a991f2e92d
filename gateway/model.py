"""Typed values of the EgressPolicy / EgressGateway API, after validation.

These are what the rest of the gateway (and the operator) work with; nothing here
parses or does I/O. Field names follow the API, in Python spelling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .addresses import IPNetwork
from .hosts import Host, HostPattern
from .selectors import LabelSelector

Mode = Literal["Enforce", "Audit"]
Action = Literal["Allow", "Deny"]
RuleKind = Literal["allow", "deny"]
PolicyKind = Literal["EgressPolicy", "ClusterEgressPolicy"]
NAMESPACED: PolicyKind = "EgressPolicy"
CLUSTER: PolicyKind = "ClusterEgressPolicy"

DEFAULT_PORTS: tuple[int, ...] = (80, 443)


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny entry: a host pattern or a CIDR, and optional ports.

    ``ports`` None means "the gateway's defaultPorts" for allow rules and "every port"
    for deny rules (a deny should never be narrower than its author expects).
    """

    kind: RuleKind
    index: int
    host: HostPattern | None = None
    cidr: IPNetwork | None = None
    ports: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.index}]"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.host is not None:
            out["host"] = self.host.text
        if self.cidr is not None:
            out["cidr"] = str(self.cidr)
        if self.ports is not None:
            out["ports"] = list(self.ports)
        return out


@dataclass(frozen=True, slots=True)
class GatewayRef:
    name: str
    namespace: str


@dataclass(frozen=True, slots=True)
class Policy:
    """An EgressPolicy or a ClusterEgressPolicy, after validation.

    Who it governs (see ``docs/policies.md``):

    - EgressPolicy (``kind`` NAMESPACED): the pods of ``namespace`` that ``pod_selector``
      matches (None: every pod of the namespace). Nothing outside its namespace.
    - ClusterEgressPolicy (``kind`` CLUSTER, ``namespace`` ""): pods whose namespace
      ``namespace_selector`` matches and whose labels ``pod_selector`` matches (when at
      least one of the two is set; the unset one matches everything), and clients whose
      address is in ``sources`` (peered VPCs, on-premises, hostNetwork, unknown addresses).
    """

    namespace: str
    name: str
    mode: Mode = "Enforce"
    gateway_ref: GatewayRef | None = None
    sources: tuple[IPNetwork, ...] | None = None
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    kind: PolicyKind = NAMESPACED
    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None

    @property
    def key(self) -> str:
        """``namespace/name``; a cluster policy's key is its bare name (never has a "/")."""
        return self.name if self.kind == CLUSTER else f"{self.namespace}/{self.name}"

    @property
    def selects_pods(self) -> bool:
        if self.kind == NAMESPACED:
            return True
        return self.pod_selector is not None or self.namespace_selector is not None

    @property
    def rule_count(self) -> int:
        return len(self.allow) + len(self.deny)


@dataclass(frozen=True, slots=True)
class DnsSettings:
    servers: tuple[str, ...] = ()
    cache_enabled: bool = True
    min_ttl: int = 5
    max_ttl: int = 300


@dataclass(frozen=True, slots=True)
class NamespaceSelection:
    """allowedPolicyNamespaces: which namespaces may bind policies to a gateway."""

    from_: Literal["All", "Same", "Selector"] = "All"
    match_labels: dict[str, str] = field(default_factory=dict)
    match_expressions: tuple[dict[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class Gateway:
    """The data-plane relevant part of an EgressGateway (workload settings stay raw)."""

    name: str = "default"
    namespace: str = "tidegate-system"
    mode: Mode = "Enforce"
    default_action: Action = "Deny"
    default_ports: tuple[int, ...] = DEFAULT_PORTS
    client_cidrs: tuple[IPNetwork, ...] = ()
    allowed_policy_namespaces: NamespaceSelection = field(default_factory=NamespaceSelection)
    block_private_destinations: bool = True
    private_destination_exceptions: tuple[IPNetwork, ...] = ()
    require_sni_match: bool = True
    dns: DnsSettings = field(default_factory=DnsSettings)
    workload: dict[str, object] = field(default_factory=dict)
    # spec.service.proxyProtocol.trustedCIDRs: None means PROXY protocol is off. A listener
    # setting (rendered into the gateway's flags), so it is not part of the bundle.
    proxy_protocol_from: tuple[IPNetwork, ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


__all__ = [
    "CLUSTER",
    "DEFAULT_PORTS",
    "NAMESPACED",
    "Action",
    "DnsSettings",
    "Gateway",
    "GatewayRef",
    "Host",
    "HostPattern",
    "Mode",
    "NamespaceSelection",
    "Policy",
    "PolicyKind",
    "Rule",
]
