"""Parse and validate EgressPolicy / EgressGateway documents (the YAML one would apply).

Validation is strict on purpose: a misspelt field is an error, not a silently ignored
key, because an ignored ``deny`` is a hole. Every error names where it happened - the
file, the document's position in it, the object, and the field path - and why, so a
person can fix it without reading code. The operator uses the same functions on the
objects it gets from the API server.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import yaml

from .addresses import IPNetwork, parse_network
from .hosts import Host, HostError, parse_host_pattern
from .model import (
    CLUSTER,
    DEFAULT_PORTS,
    DnsSettings,
    Gateway,
    GatewayRef,
    NamespaceSelection,
    Policy,
    Rule,
)
from .selectors import LabelSelector, SelectorError, parse_selector

API_VERSION = "tidegate.io/v1alpha1"
MAX_RULES_PER_POLICY = 10_000
IDENTITIES_KIND = "ClientIdentities"  # standalone client identities, beside the policies


class PolicyError(ValueError):
    """A document that cannot be accepted; ``str()`` says where and why."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        source: str | None = None,
        document: int | None = None,
        obj: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.source = source
        self.document = document
        self.obj = obj

    def located(
        self, *, source: str | None = None, document: int | None = None, obj: str | None = None
    ) -> PolicyError:
        return PolicyError(
            self.message,
            field=self.field,
            source=source if source is not None else self.source,
            document=document if document is not None else self.document,
            obj=obj if obj is not None else self.obj,
        )

    def __str__(self) -> str:
        where = []
        if self.source:
            where.append(self.source)
        if self.document is not None:
            where.append(f"document {self.document}")
        if self.obj:
            where.append(self.obj)
        prefix = ": ".join(where)
        field = f"{self.field}: " if self.field else ""
        return f"{prefix}: {field}{self.message}" if prefix else f"{field}{self.message}"


@dataclass(frozen=True, slots=True)
class Documents:
    """What a folder or a stream of YAML held."""

    policies: tuple[Policy, ...]
    gateway: Gateway | None


# --- small typed accessors that raise PolicyError with the field path -----------------------


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"must be a mapping, got {type(value).__name__}", field=path)
    return cast(Mapping[str, Any], value)


def _list(value: object, path: str, *, max_items: int = 10_000) -> Sequence[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"must be a list, got {type(value).__name__}", field=path)
    if len(value) > max_items:
        raise PolicyError(f"has {len(value)} items, at most {max_items} allowed", field=path)
    return value


def _str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError("must be a non-empty string", field=path)
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError("must be true or false", field=path)
    return value


def _int(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError("must be an integer", field=path)
    if not low <= value <= high:
        raise PolicyError(f"{value} is out of range {low}..{high}", field=path)
    return value


def _choice(value: object, path: str, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise PolicyError(f"{value!r} is not one of {', '.join(choices)}", field=path)
    return value


def _no_unknown(spec: Mapping[str, Any], path: str, known: Iterable[str]) -> None:
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise PolicyError(
            f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})",
            field=path,
        )


def _ports(value: object, path: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = _list(value, path, max_items=1024)
    if not items:
        raise PolicyError("must list at least one port (omit it for the defaults)", field=path)
    return tuple(sorted({_int(p, f"{path}[{i}]", 1, 65535) for i, p in enumerate(items)}))


def _networks(value: object, path: str) -> tuple[IPNetwork, ...]:
    out = []
    for i, item in enumerate(_list(value, path)):
        try:
            out.append(parse_network(_str(item, f"{path}[{i}]")))
        except ValueError as exc:
            raise PolicyError(f"invalid CIDR {item!r}: {exc}", field=f"{path}[{i}]") from None
    return tuple(out)


# --- EgressPolicy -----------------------------------------------------------------------------


def _rule(raw: object, kind: str, index: int, path: str) -> Rule:
    spec = _mapping(raw, path)
    _no_unknown(spec, path, ("host", "cidr", "ports"))
    ports = _ports(spec.get("ports"), f"{path}.ports")
    has_host, has_cidr = spec.get("host") is not None, spec.get("cidr") is not None
    if has_host == has_cidr:
        raise PolicyError("needs exactly one of 'host' or 'cidr'", field=path)
    rule_kind = cast(Any, kind)
    if has_host:
        text = _str(spec["host"], f"{path}.host")
        try:
            pattern = parse_host_pattern(text)
        except HostError as exc:
            raise PolicyError(str(exc), field=f"{path}.host") from None
        if isinstance(pattern, Host):  # an IP literal written as a host: a one-address CIDR
            assert pattern.ip is not None
            return Rule(rule_kind, index, cidr=ipaddress.ip_network(pattern.ip), ports=ports)
        return Rule(rule_kind, index, host=pattern, ports=ports)
    try:
        cidr = parse_network(_str(spec["cidr"], f"{path}.cidr"))
    except ValueError as exc:
        raise PolicyError(f"invalid CIDR: {exc}", field=f"{path}.cidr") from None
    return Rule(rule_kind, index, cidr=cidr, ports=ports)


SOURCES_MOVED = (
    "an EgressPolicy governs the pods of its own namespace and has no 'sources'; clients "
    "that are not pods (peered VPCs, on-premises) are selected by a ClusterEgressPolicy's "
    "spec.sources.cidrs (see docs/policies.md, 'Migrating sources')"
)


def _selector(raw: object, path: str) -> LabelSelector | None:
    if raw is None:
        return None
    try:
        return parse_selector(raw)
    except SelectorError as exc:
        field = f"{path}.{exc.field}" if exc.field else path
        raise PolicyError(exc.message, field=field) from None


def _gateway_ref(spec: Mapping[str, Any], namespace: str) -> GatewayRef | None:
    if spec.get("gatewayRef") is None:
        return None
    raw_ref = _mapping(spec["gatewayRef"], "spec.gatewayRef")
    _no_unknown(raw_ref, "spec.gatewayRef", ("name", "namespace"))
    if not namespace and raw_ref.get("namespace") is None:
        raise PolicyError(
            "a ClusterEgressPolicy must name the gateway's namespace",
            field="spec.gatewayRef.namespace",
        )
    return GatewayRef(
        _str(raw_ref.get("name"), "spec.gatewayRef.name"),
        _str(raw_ref.get("namespace", namespace), "spec.gatewayRef.namespace"),
    )


def _rules(spec: Mapping[str, Any]) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
    allow_raw = _list(spec.get("allow"), "spec.allow", max_items=MAX_RULES_PER_POLICY)
    deny_raw = _list(spec.get("deny"), "spec.deny", max_items=MAX_RULES_PER_POLICY)
    allow = tuple(_rule(r, "allow", i, f"spec.allow[{i}]") for i, r in enumerate(allow_raw))
    deny = tuple(_rule(r, "deny", i, f"spec.deny[{i}]") for i, r in enumerate(deny_raw))
    return allow, deny


def parse_policy(obj: Mapping[str, Any], *, default_namespace: str = "default") -> Policy:
    """Validate one EgressPolicy (or, by its ``kind``, ClusterEgressPolicy) object."""
    if obj.get("kind") == CLUSTER:
        return parse_cluster_policy(obj)
    metadata = _mapping(obj.get("metadata"), "metadata")
    name = _str(metadata.get("name"), "metadata.name")
    namespace = metadata.get("namespace") or default_namespace
    where = f"EgressPolicy {namespace}/{name}"
    try:
        spec = _mapping(obj.get("spec"), "spec")
        if spec.get("sources") is not None:
            raise PolicyError(SOURCES_MOVED, field="spec.sources")
        _no_unknown(spec, "spec", ("gatewayRef", "mode", "podSelector", "allow", "deny"))
        mode = _choice(spec.get("mode"), "spec.mode", ("Enforce", "Audit"), "Enforce")
        ref = _gateway_ref(spec, namespace)
        pods = _selector(spec.get("podSelector"), "spec.podSelector")
        allow, deny = _rules(spec)
    except PolicyError as exc:
        raise exc.located(obj=where) from None
    return Policy(
        namespace=namespace,
        name=name,
        mode=cast(Any, mode),
        gateway_ref=ref,
        allow=allow,
        deny=deny,
        pod_selector=pods,
    )


def parse_cluster_policy(obj: Mapping[str, Any]) -> Policy:
    """Validate one ClusterEgressPolicy: selectors and/or source CIDRs, and rules."""
    metadata = _mapping(obj.get("metadata"), "metadata")
    name = _str(metadata.get("name"), "metadata.name")
    where = f"ClusterEgressPolicy {name}"
    try:
        spec = _mapping(obj.get("spec"), "spec")
        known = ("gatewayRef", "mode", "namespaceSelector", "podSelector", "sources")
        _no_unknown(spec, "spec", (*known, "allow", "deny"))
        mode = _choice(spec.get("mode"), "spec.mode", ("Enforce", "Audit"), "Enforce")
        ref = _gateway_ref(spec, "")
        namespaces = _selector(spec.get("namespaceSelector"), "spec.namespaceSelector")
        pods = _selector(spec.get("podSelector"), "spec.podSelector")
        sources = None
        if spec.get("sources") is not None:
            raw_sources = _mapping(spec["sources"], "spec.sources")
            _no_unknown(raw_sources, "spec.sources", ("cidrs",))
            sources = _networks(raw_sources.get("cidrs"), "spec.sources.cidrs")
            if not sources:
                raise PolicyError("must list at least one CIDR", field="spec.sources.cidrs")
        if namespaces is None and pods is None and sources is None:
            raise PolicyError(
                'selects no clients: set namespaceSelector and/or podSelector ("{}" selects'
                " every pod) or sources.cidrs",
                field="spec",
            )
        allow, deny = _rules(spec)
    except PolicyError as exc:
        raise exc.located(obj=where) from None
    return Policy(
        namespace="",
        name=name,
        mode=cast(Any, mode),
        gateway_ref=ref,
        sources=sources,
        allow=allow,
        deny=deny,
        kind=CLUSTER,
        pod_selector=pods,
        namespace_selector=namespaces,
    )


# --- EgressGateway ----------------------------------------------------------------------------

_GATEWAY_DATA_FIELDS = (
    "mode",
    "defaultAction",
    "defaultPorts",
    "clientCIDRs",
    "allowedPolicyNamespaces",
    "blockPrivateDestinations",
    "privateDestinationExceptions",
    "tls",
    "dns",
)
_GATEWAY_WORKLOAD_FIELDS = (
    "replicas",
    "autoscaling",
    "service",
    "resources",
    "nodeSelector",
    "tolerations",
    "affinity",
    "topologySpread",
    "image",
    "egressGuard",
    "proxyEnv",
)


def _dns_server(text: str, path: str) -> str:
    """Accept ``IP``, ``IP:port`` and ``[IPv6]:port``; names would need DNS to find DNS."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise PolicyError(
            f"{text!r} must be an IP address, optionally with :port", field=path
        ) from None
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise PolicyError(f"invalid port in {text!r}", field=path)
    return text


def _dns(raw: object) -> DnsSettings:
    spec = _mapping(raw, "spec.dns")
    _no_unknown(spec, "spec.dns", ("servers", "cache"))
    servers = tuple(
        _dns_server(_str(s, f"spec.dns.servers[{i}]"), f"spec.dns.servers[{i}]")
        for i, s in enumerate(_list(spec.get("servers"), "spec.dns.servers", max_items=8))
    )
    cache = _mapping(spec.get("cache"), "spec.dns.cache")
    _no_unknown(cache, "spec.dns.cache", ("enabled", "minTTLSeconds", "maxTTLSeconds"))
    enabled = _bool(cache.get("enabled", True), "spec.dns.cache.enabled")
    min_ttl = _int(cache.get("minTTLSeconds", 5), "spec.dns.cache.minTTLSeconds", 0, 86400)
    max_ttl = _int(cache.get("maxTTLSeconds", 300), "spec.dns.cache.maxTTLSeconds", 0, 86400)
    if min_ttl > max_ttl:
        raise PolicyError("minTTLSeconds is larger than maxTTLSeconds", field="spec.dns.cache")
    return DnsSettings(servers, enabled, min_ttl, max_ttl)


def _namespaces(raw: object) -> NamespaceSelection:
    path = "spec.allowedPolicyNamespaces"
    spec = _mapping(raw, path)
    _no_unknown(spec, path, ("from", "selector"))
    kind = _choice(spec.get("from"), f"{path}.from", ("All", "Same", "Selector"), "All")
    selector = _mapping(spec.get("selector"), f"{path}.selector")
    if kind == "Selector" and not selector:
        raise PolicyError("from: Selector needs a selector", field=path)
    _no_unknown(selector, f"{path}.selector", ("matchLabels", "matchExpressions"))
    labels = {
        str(k): _str(v, f"{path}.selector.matchLabels.{k}")
        for k, v in _mapping(selector.get("matchLabels"), f"{path}.selector.matchLabels").items()
    }
    exprs = tuple(
        dict(_mapping(e, f"{path}.selector.matchExpressions[{i}]"))
        for i, e in enumerate(_list(selector.get("matchExpressions"), f"{path}.selector"))
    )
    return NamespaceSelection(cast(Any, kind), labels, exprs)


def _proxy_protocol(service: object) -> tuple[IPNetwork, ...] | None:
    """spec.service.proxyProtocol: present means on, and then trusted ranges are required
    (without them any client could name its own address)."""
    path = "spec.service.proxyProtocol"
    if not isinstance(service, Mapping) or service.get("proxyProtocol") is None:
        return None
    spec = _mapping(service["proxyProtocol"], path)
    _no_unknown(spec, path, ("trustedCIDRs",))
    trusted = _networks(spec.get("trustedCIDRs"), f"{path}.trustedCIDRs")
    if not trusted:
        raise PolicyError(
            "needs at least one CIDR: the load balancer's addresses or subnets",
            field=f"{path}.trustedCIDRs",
        )
    return trusted


def parse_gateway(obj: Mapping[str, Any], *, default_namespace: str = "tidegate-system") -> Gateway:
    """Validate one EgressGateway object; workload settings are kept raw for the operator."""
    metadata = _mapping(obj.get("metadata"), "metadata")
    name = _str(metadata.get("name"), "metadata.name")
    namespace = metadata.get("namespace") or default_namespace
    try:
        spec = _mapping(obj.get("spec"), "spec")
        _no_unknown(spec, "spec", _GATEWAY_DATA_FIELDS + _GATEWAY_WORKLOAD_FIELDS)
        mode = _choice(spec.get("mode"), "spec.mode", ("Enforce", "Audit"), "Enforce")
        action = _choice(spec.get("defaultAction"), "spec.defaultAction", ("Allow", "Deny"), "Deny")
        ports = _ports(spec.get("defaultPorts"), "spec.defaultPorts") or DEFAULT_PORTS
        # Omitted means nobody, as with no EgressGateway: never an open proxy by default.
        clients = _networks(spec.get("clientCIDRs"), "spec.clientCIDRs")
        block = _bool(spec.get("blockPrivateDestinations", True), "spec.blockPrivateDestinations")
        exceptions = _networks(
            spec.get("privateDestinationExceptions"), "spec.privateDestinationExceptions"
        )
        tls = _mapping(spec.get("tls"), "spec.tls")
        _no_unknown(tls, "spec.tls", ("requireSNIMatch",))
        sni = _bool(tls.get("requireSNIMatch", True), "spec.tls.requireSNIMatch")
        workload = {k: spec[k] for k in _GATEWAY_WORKLOAD_FIELDS if k in spec}
        if "replicas" in workload:
            _int(workload["replicas"], "spec.replicas", 0, 1000)
        gateway = Gateway(
            name=name,
            namespace=namespace,
            mode=cast(Any, mode),
            default_action=cast(Any, action),
            default_ports=ports,
            client_cidrs=clients,
            allowed_policy_namespaces=_namespaces(spec.get("allowedPolicyNamespaces")),
            block_private_destinations=block,
            private_destination_exceptions=exceptions,
            require_sni_match=sni,
            dns=_dns(spec.get("dns")),
            workload=workload,
            proxy_protocol_from=_proxy_protocol(spec.get("service")),
        )
    except PolicyError as exc:
        raise exc.located(obj=f"EgressGateway {namespace}/{name}") from None
    return gateway


# --- streams and folders ------------------------------------------------------------------------


def parse_documents(text: str, *, source: str = "<stream>") -> Documents:
    """Parse a multi-document YAML stream of EgressPolicy, ClusterEgressPolicy and
    EgressGateway objects."""
    try:
        raw_docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid YAML: {exc}", source=source) from None
    policies: list[Policy] = []
    gateway: Gateway | None = None
    for position, doc in enumerate(raw_docs):
        if doc is None:
            continue
        try:
            if not isinstance(doc, Mapping):
                raise PolicyError("a document must be a mapping")
            if doc.get("apiVersion") == "v1" and doc.get("kind") == "Namespace":
                continue  # lets one file serve kubectl apply (which needs it) and a folder
            if doc.get("apiVersion") == API_VERSION and doc.get("kind") == IDENTITIES_KIND:
                continue  # client identities: read by the identity source (identity.py)
            if doc.get("apiVersion") != API_VERSION:
                raise PolicyError(
                    f"apiVersion {doc.get('apiVersion')!r} is not {API_VERSION}",
                    field="apiVersion",
                )
            kind = doc.get("kind")
            if kind in ("EgressPolicy", CLUSTER):
                policies.append(parse_policy(doc))
            elif kind == "EgressGateway":
                if gateway is not None:
                    raise PolicyError("only one EgressGateway per folder", field="kind")
                gateway = parse_gateway(doc)
            else:
                raise PolicyError(
                    f"kind {kind!r} is not EgressPolicy, ClusterEgressPolicy or EgressGateway",
                    field="kind",
                )
        except PolicyError as exc:
            raise exc.located(source=source, document=position) from None
    return Documents(tuple(policies), gateway)


def merge_documents(parts: Iterable[tuple[str, Documents]]) -> Documents:
    """Combine several files' documents; duplicate names and gateways are errors."""
    policies: dict[str, Policy] = {}
    gateway: Gateway | None = None
    gateway_source = ""
    for source, docs in parts:
        for policy in docs.policies:
            if policy.key in policies:
                raise PolicyError(f"{policy.kind} {policy.key} is defined twice", source=source)
            policies[policy.key] = policy
        if docs.gateway is not None:
            if gateway is not None:
                raise PolicyError(
                    f"a second EgressGateway (the first is in {gateway_source})", source=source
                )
            gateway, gateway_source = docs.gateway, source
    return Documents(tuple(policies[k] for k in sorted(policies)), gateway)
