"""The policy decision: pure logic, indexed, every answer with a reason.

``Engine.decide(client, host, port)`` implements the spec's semantics:

1. a client outside ``clientCIDRs`` is refused (never downgraded to audit: an open proxy
   is not something to "discover");
2. among the policies that govern the client - EgressPolicies of the client pod's own
   namespace whose podSelector matches it, ClusterEgressPolicies whose namespaceSelector
   and podSelector match it, and ClusterEgressPolicies whose ``sources.cidrs`` contain the
   client's address - a matching deny denies; else a matching allow allows (an allow whose
   host matches but whose ports do not yields "port not allowed"); else ``defaultAction``.
   Who the client is comes from the identity table (``identity.py``): a client that is no
   known pod (a hostNetwork node address, a peered VPC, an unknown address) is governed
   only by cidr sources - fail closed;
3. a deny that comes from an Audit policy, a default deny where every governing policy is
   in Audit, and every deny while the gateway is in Audit become ``audit``: allowed, and
   logged and counted as would-deny.

Which selector-chosen policies govern a pod is computed once per distinct (namespace,
namespace labels, pod labels) and memoised, so a decision costs one dict probe for the
identity and one for its policy set, whatever the number of pods or policies.

Cost does not grow with the number of rules: exact names are one dict probe, ``*.x.com``
is one probe per label of the host, ``a.*.c`` one probe per label position, and CIDRs one
probe per prefix length in use. Only the handful of rules that match are then filtered by
port and by the client's policies.

The SSRF guard on resolved addresses (``destination_blocked``) lives here too, as pure
logic, so the proxy's only job is to call it on exactly the address it will dial.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from .addresses import CidrIndex, IPAddress, classify, embedded_ipv4
from .hosts import Host
from .identity import (
    IDENTITY_CIDR,
    IDENTITY_HOST_NETWORK,
    IDENTITY_POD,
    IDENTITY_UNKNOWN,
    ClientIdentity,
)
from .model import NAMESPACED, Gateway, Policy, Rule

Verdict = Literal["allow", "deny", "audit"]

# Bounded reason codes: safe as a metric label. The message carries the detail.
REASON_RULE_ALLOW = "allow_rule"
REASON_RULE_DENY = "deny_rule"
REASON_NO_MATCH = "no_rule_matched"
REASON_DEFAULT_ALLOW = "default_allow"
REASON_PORT = "port_not_allowed"
REASON_CLIENT = "client_not_allowed"
REASON_PRIVATE = "private_address"
REASON_BAD_REQUEST = "bad_request"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    message: str
    policy: str | None = None
    rule: str | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict != "deny"


# Distinct pod label sets remembered per engine; beyond it the memo starts over.
MAX_MEMO = 100_000


@dataclass(frozen=True, slots=True)
class Governing:
    """The selector-chosen policies (indexes) that govern one pod label set."""

    members: frozenset[int]
    enforce: bool  # at least one of them is in Enforce mode


NOBODY = Governing(frozenset(), False)


@dataclass(frozen=True, slots=True)
class _RuleRef:
    policy: int  # index into Engine.policies
    rule: Rule


class Engine:
    """An immutable, indexed view of one bundle. Build once per reload; share freely."""

    def __init__(self, gateway: Gateway, policies: tuple[Policy, ...]) -> None:
        self.gateway = gateway
        self.policies = policies
        self._clients: CidrIndex[bool] = CidrIndex((n, True) for n in gateway.client_cidrs)
        self._exceptions: CidrIndex[bool] = CidrIndex(
            (n, True) for n in gateway.private_destination_exceptions
        )
        self._default_ports = frozenset(gateway.default_ports)
        self._exact: dict[str, list[_RuleRef]] = {}
        self._suffix: dict[str, list[_RuleRef]] = {}
        self._middle: dict[str, list[_RuleRef]] = {}
        self._cidr: CidrIndex[_RuleRef] = CidrIndex()
        # Cluster policies' sources are found by client address; pods by their labels.
        self._sourced: CidrIndex[int] = CidrIndex()
        self._sourced_enforce: CidrIndex[int] = CidrIndex()
        self._by_namespace: dict[str, list[int]] = {}
        self._cluster_selecting: list[int] = []
        self._memo: dict[tuple[object, ...], Governing] = {}
        for index, policy in enumerate(policies):
            if policy.kind == NAMESPACED:
                self._by_namespace.setdefault(policy.namespace, []).append(index)
            elif policy.selects_pods:
                self._cluster_selecting.append(index)
            for network in policy.sources or ():
                self._sourced.add(network, index)
                if policy.mode == "Enforce":
                    self._sourced_enforce.add(network, index)
            for rule in policy.allow + policy.deny:
                ref = _RuleRef(index, rule)
                if rule.cidr is not None:
                    self._cidr.add(rule.cidr, ref)
                elif rule.host is not None:
                    table = {"exact": self._exact, "suffix": self._suffix}.get(
                        rule.host.kind, self._middle
                    )
                    table.setdefault(rule.host.suffix, []).append(ref)
        self.rule_count = sum(p.rule_count for p in policies)

    # --- matching ----------------------------------------------------------------------------

    def _host_matches(self, host: Host) -> list[_RuleRef]:
        if host.kind == "ip":
            assert host.ip is not None
            if not self._cidr:
                return []
            found = self._cidr.lookup(host.ip)
            ip = host.ip
            inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
            if inner is not None:  # [::ffff:a.b.c.d], NAT64, 6to4: a deny of a.b.c.d holds
                found += [ref for ref in self._cidr.lookup(inner) if ref.rule.kind == "deny"]
            return found
        name = host.name
        found = list(self._exact.get(name, ()))
        if self._suffix:
            rest = name
            while True:
                dot = rest.find(".")
                if dot < 0:
                    break
                rest = rest[dot + 1 :]
                found.extend(self._suffix.get(rest, ()))
        if self._middle:
            labels = name.split(".")
            for i in range(1, len(labels) - 1):
                key = ".".join([*labels[:i], "*", *labels[i + 1 :]])
                found.extend(self._middle.get(key, ()))
        return found

    def governing(self, identity: ClientIdentity | None) -> Governing:
        """The policies a pod's selectors put it under (memoised); none for non-pods."""
        if identity is None or identity.kind != "pod":
            return NOBODY
        key = identity.selector_key
        found = self._memo.get(key)
        if found is not None:
            return found
        labels = identity.labels
        members = [
            i
            for i in self._by_namespace.get(identity.namespace, ())
            if (selector := self.policies[i].pod_selector) is None or selector.matches(labels)
        ]
        for i in self._cluster_selecting:
            policy = self.policies[i]
            ns_sel, pod_sel = policy.namespace_selector, policy.pod_selector
            if ns_sel is not None and not ns_sel.matches(identity.namespace_labels):
                continue
            if pod_sel is not None and not pod_sel.matches(labels):
                continue
            members.append(i)
        found = Governing(
            frozenset(members), any(self.policies[i].mode == "Enforce" for i in members)
        )
        if len(self._memo) >= MAX_MEMO:
            self._memo.clear()
        self._memo[key] = found
        return found

    def _governs(
        self, policy_index: int, client: IPAddress | None, pods: Governing, cache: dict[int, bool]
    ) -> bool:
        if policy_index in pods.members:
            return True
        if client is None:
            return False
        if policy_index not in cache:
            cache[policy_index] = policy_index in self._sourced.lookup(client)
        return cache[policy_index]

    def _all_governing_audit(self, client: IPAddress | None, pods: Governing) -> bool:
        """True when at least one policy governs the client and none of them enforces."""
        if client is None:
            return bool(pods.members) and not pods.enforce
        if pods.enforce or self._sourced_enforce.contains(client):
            return False
        return bool(pods.members) or self._sourced.contains(client)

    def governing_keys(
        self, client: IPAddress | None, identity: ClientIdentity | None = None
    ) -> list[str]:
        """Every policy that governs the client, by key (``tidegate check``, and who a
        no-match decision is about)."""
        members = set(self.governing(identity).members)
        if client is not None:
            members.update(self._sourced.lookup(_unmap(client)))
        return sorted(self.policies[i].key for i in members)

    def client_kind(self, client: IPAddress, identity: ClientIdentity | None) -> str:
        """pod, host_network, cidr (no identity, but in a cluster policy's sources) or
        unknown_client (governed by nothing but the defaultAction)."""
        if identity is not None:
            return IDENTITY_POD if identity.kind == "pod" else IDENTITY_HOST_NETWORK
        return IDENTITY_CIDR if self._sourced.contains(_unmap(client)) else IDENTITY_UNKNOWN

    # --- the decision ------------------------------------------------------------------------

    def client_allowed(self, client: IPAddress) -> bool:
        return self._clients.contains(_unmap(client))

    def decide(
        self,
        client: IPAddress | None,
        host: Host,
        port: int,
        identity: ClientIdentity | None = None,
    ) -> Decision:
        """Decide for ``client`` (whose pod identity, if any, is ``identity``).

        ``client`` None (``tidegate check --namespace``: a pod without an address) skips
        the clientCIDRs check and cidr sources; the proxy always has an address.
        """
        if client is not None:
            client = _unmap(client)
            if not self._clients.contains(client):
                return Decision("deny", REASON_CLIENT, f"client {client} is outside clientCIDRs")
        gateway_audit = self.gateway.mode == "Audit"
        pods = self.governing(identity)
        governing: dict[int, bool] = {}
        enforce_deny: _RuleRef | None = None
        audit_deny: _RuleRef | None = None
        allow: _RuleRef | None = None
        port_miss: _RuleRef | None = None
        for ref in self._host_matches(host):
            if not self._governs(ref.policy, client, pods, governing):
                continue
            rule = ref.rule
            if rule.kind == "deny":
                if rule.ports is not None and port not in rule.ports:
                    continue
                if self.policies[ref.policy].mode == "Audit":
                    audit_deny = audit_deny or ref
                else:
                    enforce_deny = enforce_deny or ref
            else:
                ports = rule.ports if rule.ports is not None else self._default_ports
                if port in ports:
                    allow = allow or ref
                else:
                    port_miss = port_miss or ref
        deny_ref = enforce_deny or audit_deny
        if deny_ref is not None:
            audit = gateway_audit or enforce_deny is None
            return self._from_rule(
                "audit" if audit else "deny",
                REASON_RULE_DENY,
                f"denied by {self._where(deny_ref)}",
                deny_ref,
            )
        if allow is not None:
            return self._from_rule(
                "allow", REASON_RULE_ALLOW, f"allowed by {self._where(allow)}", allow
            )
        if self.gateway.default_action == "Allow":
            return Decision("allow", REASON_DEFAULT_ALLOW, "no rule matched; defaultAction Allow")
        audit = gateway_audit or self._all_governing_audit(client, pods)
        verdict: Verdict = "audit" if audit else "deny"
        if port_miss is not None:
            return self._from_rule(
                verdict,
                REASON_PORT,
                f"port {port} is not allowed by {self._where(port_miss)}",
                port_miss,
            )
        return Decision(verdict, REASON_NO_MATCH, "no rule matched")

    def _where(self, ref: _RuleRef) -> str:
        return f"{self.policies[ref.policy].key} {ref.rule.label}"

    def _from_rule(self, verdict: Verdict, reason: str, message: str, ref: _RuleRef) -> Decision:
        return Decision(verdict, reason, message, self.policies[ref.policy].key, ref.rule.label)

    # --- SSRF guard -------------------------------------------------------------------------

    def destination_blocked(
        self,
        address: IPAddress,
        client: IPAddress,
        identity: ClientIdentity | None = None,
        *,
        port: int,
    ) -> str | None:
        """Why dialling ``address`` on ``port`` is refused (e.g. "loopback"), or None.

        Exempt: ``privateDestinationExceptions``, and an explicit ``cidr`` allow rule of a
        policy that governs this client, for the ports that rule allows (a rule opening a
        database port never opens the same address's other ports to a name resolving there).
        """
        if not self.gateway.block_private_destinations:
            return None
        category = classify(address)
        if category is None:
            return None
        if self._exceptions.contains(address):
            return None
        client = _unmap(client)
        pods = self.governing(identity)
        governing: dict[int, bool] = {}
        for ref in self._cidr.lookup(address):
            rule = ref.rule
            ports = rule.ports if rule.ports is not None else self._default_ports
            if (
                rule.kind == "allow"
                and port in ports
                and self._governs(ref.policy, client, pods, governing)
            ):
                return None
        return category


def _unmap(ip: IPAddress) -> IPAddress:
    """Clients on a dual-stack socket appear as ::ffff:a.b.c.d; judge the IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
