#!/usr/bin/env python3
"""Generate charts/tidegate/values.schema.json from charts/tidegate/values.yaml.

Types come from the default values; descriptions from the comment block above each key;
the few things a default cannot say (enums, maps, minimums) from ANNOTATIONS. Every object
the chart defines is closed (additionalProperties: false), so a typo fails `helm install`.

Kubernetes-typed values (resources, securityContext, affinity, tolerations...) point at
definitions converted from the Kubernetes API's own OpenAPI v3 document (core/v1, as the
kube-apiserver serves it at /openapi/v3/api/v1), and defaultGateway.spec at the
EgressGateway CRD's openAPIV3Schema in crds/: both generated here, never copied by hand.
CEL rules (x-kubernetes-validations) have no JSON-schema form; the API server checks them.

    python hack/gen-values-schema.py                    # rewrite the schema
    python hack/gen-values-schema.py --check            # exit 1 when it is stale
    python hack/gen-values-schema.py --openapi FILE     # Kubernetes definitions from FILE
                                                        # (default: the committed schema's)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VALUES = ROOT / "charts" / "tidegate" / "values.yaml"
SCHEMA = ROOT / "charts" / "tidegate" / "values.schema.json"
GATEWAY_CRD = ROOT / "crds" / "tidegate.io_egressgateways.yaml"

K8S = "io.k8s.api.core.v1."
GATEWAY_SPEC = "io.tidegate.v1alpha1.EgressGatewaySpec"
OPENAPI_REF = "#/components/schemas/"
REF = "#/definitions/"
#: Keywords of the Kubernetes dialect of OpenAPI that JSON schema has no use for.
DROPPED = {"format", "nullable", "example", "externalDocs"}


def k8s(name: str) -> dict[str, Any]:
    return {"$ref": REF + K8S + name}


def k8s_list(name: str) -> dict[str, Any]:
    return {"items": k8s(name)}


#: Extra schema keywords by dotted value path. "open": a free-form object (a map) whose
#: keys the chart does not know.
OPEN = {"type": "object", "additionalProperties": True}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
#: A Prometheus duration such as 30s, 5m or 1h30m.
DURATION = "^([0-9]+(ms|s|m|h|d|w|y))+$"
OPTIONAL_DURATION = "^(([0-9]+(ms|s|m|h|d|w|y))+)?$"
ANNOTATIONS: dict[str, dict[str, Any]] = {
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "image.digest": {"pattern": "^(sha256:[0-9a-f]{64})?$"},
    "global": {
        **OPEN,
        "description_suffix": " Read by no template; allowed so the chart works as a subchart.",
    },
    "imagePullSecrets": k8s_list("LocalObjectReference"),
    "operator.replicas": {"minimum": 0},
    "operator.healthPort": {"minimum": 1, "maximum": 65535},
    "operator.metricsPort": {"minimum": 1, "maximum": 65535},
    "operator.extraArgs": {"items": {"type": "string"}},
    "operator.extraEnv": k8s_list("EnvVar"),
    "peering.name": {"minLength": 1, "maxLength": 253},
    "serviceAccount.annotations": STRING_MAP,
    "podAnnotations": STRING_MAP,
    "podLabels": STRING_MAP,
    "podSecurityContext": k8s("PodSecurityContext"),
    "securityContext": k8s("SecurityContext"),
    "resources": k8s("ResourceRequirements"),
    "nodeSelector": STRING_MAP,
    "tolerations": k8s_list("Toleration"),
    "affinity": k8s("Affinity"),
    "topologySpreadConstraints": k8s_list("TopologySpreadConstraint"),
    "podDisruptionBudget.minAvailable": {"type": ["integer", "string"]},
    "metrics.serviceMonitor.labels": STRING_MAP,
    "metrics.serviceMonitor.interval": {"pattern": DURATION},
    "metrics.serviceMonitor.scrapeTimeout": {"pattern": OPTIONAL_DURATION},
    "metrics.podMonitor.labels": STRING_MAP,
    "metrics.podMonitor.namespaces": {"items": {"type": "string", "minLength": 1}},
    "gatewayNamespaces": {
        "items": {"type": "string", "minLength": 1, "maxLength": 63},
        "uniqueItems": True,
    },
    "cluster.domain": {"minLength": 1, "maxLength": 253},
    "cluster.serviceCIDRs": {"items": {"type": "string", "minLength": 1}},
    "cluster.podCIDRs": {"items": {"type": "string", "minLength": 1}},
    "metrics.podMonitor.interval": {"pattern": DURATION},
    "metrics.podMonitor.scrapeTimeout": {"pattern": OPTIONAL_DURATION},
    "metrics.prometheusRule.labels": STRING_MAP,
    "metrics.prometheusRule.alertLabels": STRING_MAP,
    "metrics.prometheusRule.noReadyFor": {"pattern": DURATION},
    "metrics.prometheusRule.connectionsNearLimitRatio": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
    },
    "metrics.prometheusRule.spikeMinRate": {"type": "number", "minimum": 0},
    "metrics.prometheusRule.spikeFactor": {"type": "number", "minimum": 1},
    "metrics.prometheusRule.dnsFailureRatio": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
    },
    "metrics.prometheusRule.reconcileErrorRatio": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
    },
    "metrics.dashboard.labels": STRING_MAP,
    "metrics.dashboard.annotations": STRING_MAP,
    "defaultGateway.spec": {"$ref": REF + GATEWAY_SPEC},
}
#: Kubernetes definitions the chart's values use directly (their references follow).
K8S_ROOTS = sorted(
    {
        ref["$ref"].removeprefix(REF)
        for extra in ANNOTATIONS.values()
        for ref in (extra, extra.get("items") or {})
        if str(ref.get("$ref", "")).startswith(REF + K8S)
    }
)

KEY_RE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/\"]+):(?:\s|$)")


def comments_by_path(text: str) -> dict[str, str]:
    """Map each dotted key path to the comment lines directly above it."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            pending = []
            continue
        m = KEY_RE.match(line)
        if not m or stripped.startswith("- "):
            pending = []
            continue
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = m.group("key").strip('"')
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if pending:
            out[path] = " ".join(pending)
        pending = []
    return out


def type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"unsupported value {value!r}")


def schema_for(value: Any, path: str, docs: dict[str, str]) -> dict[str, Any]:
    extra = dict(ANNOTATIONS.get(path, {}))
    suffix = extra.pop("description_suffix", "")
    description = docs[path] + suffix if path in docs else None
    if "$ref" in extra:  # a $ref's siblings are ignored by draft 7: wrap it
        node: dict[str, Any] = {"allOf": [extra]}
        if description:
            node["description"] = description
        return node
    node = {"type": type_of(value)}
    if description:
        node["description"] = description
    if isinstance(value, dict) and extra.get("additionalProperties") is None:
        node["additionalProperties"] = False
        node["properties"] = {
            k: schema_for(v, f"{path}.{k}" if path else k, docs) for k, v in value.items()
        }
    node.update(extra)
    return node


def convert(node: Any, *, keep_descriptions: bool) -> Any:
    """One OpenAPI v3 (Kubernetes dialect) schema node as a closed draft-7 JSON schema."""
    if isinstance(node, list):
        return [convert(n, keep_descriptions=keep_descriptions) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED or key.startswith("x-kubernetes-"):
            continue
        if key == "description" and not keep_descriptions:
            continue
        if key == "$ref":
            out[key] = REF + str(value).removeprefix(OPENAPI_REF)
        elif key in {"properties", "patternProperties"}:
            out[key] = {
                k: convert(v, keep_descriptions=keep_descriptions) for k, v in value.items()
            }
        else:
            out[key] = convert(value, keep_descriptions=keep_descriptions)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    open_ended = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    if "properties" in node and not open_ended:
        out["additionalProperties"] = False
    defaulted = {k for k, v in (node.get("properties") or {}).items() if "default" in v}
    if "required" in out:  # the API server fills defaults before it checks `required`
        out["required"] = [r for r in out["required"] if r not in defaulted]
        if not out["required"]:
            del out["required"]
    return out


def refs_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref.removeprefix(REF).removeprefix(OPENAPI_REF)
        for value in node.values():
            yield from refs_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs_in(value)


def kubernetes_definitions(openapi: dict[str, Any]) -> dict[str, Any]:
    """The closure of K8S_ROOTS in an OpenAPI v3 document, converted."""
    schemas = openapi["components"]["schemas"]
    out: dict[str, Any] = {}
    todo = list(K8S_ROOTS)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        if name not in schemas:
            raise SystemExit(f"{name} is not in the OpenAPI document")
        out[name] = convert(schemas[name], keep_descriptions=False)
        todo.extend(refs_in(schemas[name]))
    return dict(sorted(out.items()))


def committed_kubernetes_definitions() -> dict[str, Any]:
    if not SCHEMA.exists():
        raise SystemExit(f"{SCHEMA} missing: run with --openapi <core/v1 OpenAPI v3 document>")
    definitions = json.loads(SCHEMA.read_text()).get("definitions", {})
    return {k: v for k, v in definitions.items() if k.startswith("io.k8s.")}


def gateway_spec_definition() -> dict[str, Any]:
    crd = yaml.safe_load(GATEWAY_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    node = convert(spec, keep_descriptions=True)
    node["description"] = (
        "Spec of the default EgressGateway, checked against the EgressGateway CRD's schema "
        "(CEL rules are checked by the API server)."
    )
    return node


def generate(openapi: dict[str, Any] | None = None) -> str:
    text = VALUES.read_text()
    values = yaml.safe_load(text)
    k8s_defs = (
        kubernetes_definitions(openapi)
        if openapi is not None
        else committed_kubernetes_definitions()
    )
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "tidegate chart values",
        **schema_for(values, "", comments_by_path(text)),
        "definitions": {GATEWAY_SPEC: gateway_spec_definition(), **k8s_defs},
    }
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the schema is stale")
    parser.add_argument(
        "--openapi",
        type=Path,
        help="OpenAPI v3 document of core/v1 (kubectl get --raw /openapi/v3/api/v1)",
    )
    args = parser.parse_args()
    openapi = json.loads(args.openapi.read_text()) if args.openapi else None
    content = generate(openapi)
    if args.check:
        if not SCHEMA.exists() or SCHEMA.read_text() != content:
            print(f"{SCHEMA} is stale: run python hack/gen-values-schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
