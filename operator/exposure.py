"""How clients reach a gateway, and whether the gateway can still tell them apart.

The gateway admits clients by source address (``clientCIDRs``, policy ``sources``). That is
only as good as the address the gateway sees. Two Services per gateway:

- ``<name>-gateway``, usually a LoadBalancer (AWS Load Balancer Controller annotations), for
  peered VPCs and on-premises networks. Safe defaults: an ``internal`` scheme; with ``ip``
  targets the target-group attribute ``preserve_client_ip.enabled=true`` (an NLB hides the
  client behind its own private address otherwise, which clientCIDRs naming the VPC admit);
  with ``instance`` targets ``externalTrafficPolicy: Local`` (kube-proxy would SNAT to a
  node address otherwise); with ``ip`` targets no NodePorts at all (a NodePort reached on any
  node arrives SNATed, i.e. unidentified);
- ``<name>-proxy``, always a ClusterIP Service: in-cluster clients reach the pods through
  kube-proxy's DNAT only, so their pod address arrives intact. The proxy-env ConfigMap points
  workloads at it.

:func:`assess_client_identity` reads the *rendered* Service (after user annotations are
merged in), so a configuration that still lets clients arrive unidentified is reported as a
condition and an Event instead of silently becoming an open proxy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AWS_LB = "service.beta.kubernetes.io/aws-load-balancer-"
ANN_TYPE = f"{AWS_LB}type"
ANN_TARGET_TYPE = f"{AWS_LB}nlb-target-type"
ANN_SCHEME = f"{AWS_LB}scheme"
ANN_TG_ATTRIBUTES = f"{AWS_LB}target-group-attributes"
ANN_PROXY_PROTOCOL = f"{AWS_LB}proxy-protocol"
ANN_EIPS = f"{AWS_LB}eip-allocations"
ANN_SUBNETS = f"{AWS_LB}subnets"
ANN_SOURCE_RANGES = "service.beta.kubernetes.io/load-balancer-source-ranges"
PRESERVE_CLIENT_IP = "preserve_client_ip.enabled"

DEFAULT_SCHEME = "internal"
DEFAULT_TARGET_TYPE = "ip"

CONDITION_CLIENTS_IDENTIFIED = "ClientsIdentified"


def _mapping(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def proxy_protocol_on(service: Mapping[str, Any]) -> bool:
    """spec.service.proxyProtocol (the PROXY protocol work renders its own annotation)."""
    return bool(service.get("proxyProtocol"))


def parse_attributes(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` (the controller's target-group-attributes format) into a dict."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def merge_target_group_attributes(given: str | None) -> str:
    """Add ``preserve_client_ip.enabled=true`` unless the user set that attribute."""
    attributes = parse_attributes(given or "")
    attributes.setdefault(PRESERVE_CLIENT_IP, "true")
    return ",".join(f"{k}={v}" for k, v in attributes.items())


def service_annotations(service: Mapping[str, Any]) -> dict[str, str]:
    """AWS Load Balancer Controller annotations for ``spec.service``, user extras merged."""
    annotations: dict[str, str] = {}
    extra = {str(k): str(v) for k, v in _mapping(service.get("annotations")).items()}
    if service.get("type", "LoadBalancer") == "LoadBalancer":
        target = str(service.get("targetType") or DEFAULT_TARGET_TYPE)
        annotations[ANN_TYPE] = "external"
        annotations[ANN_TARGET_TYPE] = target
        annotations[ANN_SCHEME] = str(service.get("scheme") or DEFAULT_SCHEME)
        eips = [str(e) for e in service.get("eipAllocations") or []]
        if eips:
            annotations[ANN_EIPS] = ",".join(eips)
        subnets = [str(s) for s in service.get("subnets") or []]
        if subnets:
            annotations[ANN_SUBNETS] = ",".join(subnets)
        if target == "ip" and not proxy_protocol_on(service):
            annotations[ANN_TG_ATTRIBUTES] = merge_target_group_attributes(
                extra.pop(ANN_TG_ATTRIBUTES, None)
            )
    annotations.update(extra)
    return annotations


def service_spec_extras(service: Mapping[str, Any]) -> dict[str, Any]:
    """Traffic-policy fields of the LoadBalancer/NodePort Service spec."""
    kind = str(service.get("type", "LoadBalancer"))
    target = str(service.get("targetType") or DEFAULT_TARGET_TYPE)
    out: dict[str, Any] = {}
    if kind == "NodePort" or (kind == "LoadBalancer" and target == "instance"):
        out["externalTrafficPolicy"] = "Local"
    if kind == "LoadBalancer" and target == "ip":
        out["allocateLoadBalancerNodePorts"] = False
    ranges = [str(r) for r in service.get("loadBalancerSourceRanges") or []]
    if kind == "LoadBalancer" and ranges:
        out["loadBalancerSourceRanges"] = ranges
    return out


@dataclass(frozen=True, slots=True)
class Assessment:
    """Whether clients arriving through a Service keep an address the gateway can judge."""

    identified: bool
    reason: str
    message: str


def assess_client_identity(svc: Mapping[str, Any]) -> Assessment:
    """Judge a rendered (or live) gateway Service; pure, never raises on odd input."""
    spec = _mapping(svc.get("spec"))
    raw = _mapping(_mapping(svc.get("metadata")).get("annotations"))
    annotations = {str(k): str(v) for k, v in raw.items()}
    kind = str(spec.get("type") or "ClusterIP")
    local = spec.get("externalTrafficPolicy") == "Local"
    if kind == "ClusterIP":
        return Assessment(
            True, "InClusterOnly", "ClusterIP Service: clients arrive with their own pod address"
        )
    if kind == "NodePort":
        if local:
            return Assessment(
                True,
                "TrafficPolicyLocal",
                "NodePort with externalTrafficPolicy Local: kube-proxy keeps client addresses",
            )
        return Assessment(
            False,
            "NodePortSNAT",
            "NodePort with externalTrafficPolicy Cluster: kube-proxy rewrites clients to node "
            "addresses, which clientCIDRs cannot tell apart",
        )
    if kind != "LoadBalancer":
        return Assessment(False, "UnknownServiceType", f"unexpected Service type {kind!r}")
    ranges = list(spec.get("loadBalancerSourceRanges") or []) or [
        r for r in annotations.get(ANN_SOURCE_RANGES, "").split(",") if r.strip()
    ]
    if annotations.get(ANN_SCHEME) == "internet-facing" and not ranges:
        return Assessment(
            False,
            "OpenToInternet",
            "internet-facing load balancer without loadBalancerSourceRanges: anyone on the "
            "internet can connect",
        )
    if annotations.get(ANN_TYPE) != "external":
        return Assessment(
            False,
            "UnknownLoadBalancer",
            f"{ANN_TYPE} is {annotations.get(ANN_TYPE)!r}, not 'external': Tidegate cannot "
            "tell whether the load balancer keeps client addresses",
        )
    if annotations.get(ANN_PROXY_PROTOCOL) == "*":
        return Assessment(
            True, "ProxyProtocol", "the load balancer sends each client's address (PROXY protocol)"
        )
    target = annotations.get(ANN_TARGET_TYPE, "instance")
    if target == "ip":
        preserved = parse_attributes(annotations.get(ANN_TG_ATTRIBUTES, "")).get(PRESERVE_CLIENT_IP)
        if preserved == "true":
            return Assessment(
                True,
                "ClientAddressPreserved",
                "ip targets with preserve_client_ip.enabled=true: clients arrive with their own "
                "address (IPv4 clients; IPv6 clients of an IPv4 target group do not)",
            )
        return Assessment(
            False,
            "ClientAddressHidden",
            "ip targets without preserve_client_ip.enabled=true: every client arrives from the "
            "load balancer's private addresses, which clientCIDRs cannot tell apart",
        )
    if local:
        return Assessment(
            True,
            "TrafficPolicyLocal",
            "instance targets with externalTrafficPolicy Local: clients keep their address",
        )
    return Assessment(
        False,
        "NodePortSNAT",
        "instance targets with externalTrafficPolicy Cluster: kube-proxy rewrites clients to "
        "node addresses, which clientCIDRs cannot tell apart",
    )
