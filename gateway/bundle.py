"""The policy bundle: what the operator writes into a ConfigMap and the gateway loads.

A bundle is canonical JSON: the gateway's data-plane settings plus every bound policy,
in the API's own shape (so loading re-uses the same validation as ``kubectl apply``d
YAML), sorted by ``namespace/name``, with a sha256 over that content. The sha lets the
operator skip writes that would change nothing and lets everyone see which bundle a pod
serves; ``generation`` counts changes. Large bundles may be gzip-compressed; the loader
recognises the gzip magic.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .documents import API_VERSION, PolicyError, parse_gateway, parse_policy
from .model import CLUSTER, Gateway, Policy

BUNDLE_KIND = "PolicyBundle"
# 2: policies carry their kind (EgressPolicy / ClusterEgressPolicy) and selectors; an
# EgressPolicy no longer has sources. A gateway refuses a format it does not know.
BUNDLE_FORMAT = 2


@dataclass(frozen=True, slots=True)
class Bundle:
    gateway: Gateway
    policies: tuple[Policy, ...]
    generation: int
    sha256: str


def policy_to_object(policy: Policy) -> dict[str, Any]:
    spec: dict[str, Any] = {"mode": policy.mode}
    if policy.namespace_selector is not None:
        spec["namespaceSelector"] = policy.namespace_selector.to_json()
    if policy.pod_selector is not None:
        spec["podSelector"] = policy.pod_selector.to_json()
    if policy.sources is not None:
        spec["sources"] = {"cidrs": [str(n) for n in policy.sources]}
    spec["allow"] = [r.to_json() for r in policy.allow]
    spec["deny"] = [r.to_json() for r in policy.deny]
    if policy.kind == CLUSTER:
        return {"kind": CLUSTER, "metadata": {"name": policy.name}, "spec": spec}
    return {"metadata": {"namespace": policy.namespace, "name": policy.name}, "spec": spec}


def gateway_to_object(gateway: Gateway) -> dict[str, Any]:
    """The data-plane settings only; workload fields never reach the pods."""
    sel = gateway.allowed_policy_namespaces
    namespaces: dict[str, Any] = {"from": sel.from_}
    if sel.from_ == "Selector":
        namespaces["selector"] = {
            "matchLabels": dict(sel.match_labels),
            "matchExpressions": [dict(e) for e in sel.match_expressions],
        }
    return {
        "metadata": {"namespace": gateway.namespace, "name": gateway.name},
        "spec": {
            "mode": gateway.mode,
            "defaultAction": gateway.default_action,
            "defaultPorts": list(gateway.default_ports),
            "clientCIDRs": [str(n) for n in gateway.client_cidrs],
            "allowedPolicyNamespaces": namespaces,
            "blockPrivateDestinations": gateway.block_private_destinations,
            "privateDestinationExceptions": [
                str(n) for n in gateway.private_destination_exceptions
            ],
            "tls": {"requireSNIMatch": gateway.require_sni_match},
            "dns": {
                "servers": list(gateway.dns.servers),
                "cache": {
                    "enabled": gateway.dns.cache_enabled,
                    "minTTLSeconds": gateway.dns.min_ttl,
                    "maxTTLSeconds": gateway.dns.max_ttl,
                },
            },
        },
    }


def _canonical(content: Mapping[str, Any]) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def bundle_content(gateway: Gateway, policies: Iterable[Policy]) -> dict[str, Any]:
    ordered = sorted(policies, key=lambda p: p.key)
    return {
        "gateway": gateway_to_object(gateway),
        "policies": [policy_to_object(p) for p in ordered],
    }


def content_sha256(content: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(content)).hexdigest()


def compile_bundle(*, gateway: Gateway, policies: Iterable[Policy], generation: int) -> bytes:
    """Serialise a bundle: stable bytes for the same input, whatever the input order."""
    content = bundle_content(gateway, policies)
    document = {
        "apiVersion": API_VERSION,
        "kind": BUNDLE_KIND,
        "format": BUNDLE_FORMAT,
        "generation": generation,
        "sha256": content_sha256(content),
        **content,
    }
    return _canonical(document)


def maybe_decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def load_bundle(data: bytes, *, source: str = "<bundle>") -> Bundle:
    """Parse and verify a bundle; raises PolicyError naming what is wrong."""
    try:
        document = json.loads(maybe_decompress(data))
    except (ValueError, OSError, EOFError) as exc:
        raise PolicyError(f"not a bundle: {exc}", source=source) from None
    if not isinstance(document, dict) or document.get("kind") != BUNDLE_KIND:
        raise PolicyError(f"not a {BUNDLE_KIND} document", source=source)
    if document.get("format") != BUNDLE_FORMAT:
        raise PolicyError(f"unsupported bundle format {document.get('format')!r}", source=source)
    content = {"gateway": document.get("gateway"), "policies": document.get("policies")}
    sha = content_sha256(content)
    if document.get("sha256") != sha:
        raise PolicyError("sha256 does not match the content (truncated or edited?)", source=source)
    generation = document.get("generation")
    if not isinstance(generation, int):
        raise PolicyError("generation must be an integer", source=source)
    try:
        gateway = parse_gateway(content["gateway"] or {})
        raw_policies = content["policies"] or []
        policies = tuple(parse_policy(p) for p in raw_policies)
    except PolicyError as exc:
        raise exc.located(source=source) from None
    return Bundle(gateway=gateway, policies=policies, generation=generation, sha256=sha)
