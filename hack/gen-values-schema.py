#!/usr/bin/env python3
"""Generate charts/tidegate/values.schema.json from charts/tidegate/values.yaml.

Types come from the default values; descriptions from the comment block above each key;
the few things a default cannot say (enums, free-form maps, minimums) from ANNOTATIONS.

    python hack/gen-values-schema.py          # rewrite the schema
    python hack/gen-values-schema.py --check  # exit 1 when the committed schema is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VALUES = ROOT / "charts" / "tidegate" / "values.yaml"
SCHEMA = ROOT / "charts" / "tidegate" / "values.schema.json"

#: Extra schema keywords by dotted value path. "open": a free-form object (a Kubernetes
#: structure or a map) whose keys the chart does not know.
OPEN = {"type": "object", "additionalProperties": True}
ANNOTATIONS: dict[str, dict[str, Any]] = {
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "image.digest": {"pattern": "^(sha256:[0-9a-f]{64})?$"},
    "imagePullSecrets": {
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}},
        }
    },
    "operator.replicas": {"minimum": 0},
    "operator.healthPort": {"minimum": 1, "maximum": 65535},
    "operator.metricsPort": {"minimum": 1, "maximum": 65535},
    "operator.extraArgs": {"items": {"type": "string"}},
    "operator.extraEnv": {"items": {"type": "object"}},
    "peering.name": {"minLength": 1, "maxLength": 253},
    "serviceAccount.annotations": {**OPEN, "additionalProperties": {"type": "string"}},
    "podAnnotations": {**OPEN, "additionalProperties": {"type": "string"}},
    "podLabels": {**OPEN, "additionalProperties": {"type": "string"}},
    "podSecurityContext": OPEN,
    "securityContext": OPEN,
    "resources": OPEN,
    "nodeSelector": {**OPEN, "additionalProperties": {"type": "string"}},
    "tolerations": {"items": {"type": "object"}},
    "affinity": OPEN,
    "topologySpreadConstraints": {"items": {"type": "object"}},
    "podDisruptionBudget.minAvailable": {"type": ["integer", "string"]},
    "metrics.serviceMonitor.labels": {**OPEN, "additionalProperties": {"type": "string"}},
    "defaultGateway.spec": {
        **OPEN,
        "description_suffix": " Validated by the EgressGateway CRD, not here.",
    },
}

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
    node: dict[str, Any] = {"type": type_of(value)}
    if path in docs:
        node["description"] = docs[path] + suffix
    if isinstance(value, dict) and extra.get("additionalProperties") is None:
        node["additionalProperties"] = False
        node["properties"] = {
            k: schema_for(v, f"{path}.{k}" if path else k, docs) for k, v in value.items()
        }
    node.update(extra)
    return node


def generate() -> str:
    text = VALUES.read_text()
    values = yaml.safe_load(text)
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "tidegate chart values",
        **schema_for(values, "", comments_by_path(text)),
    }
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the schema is stale")
    args = parser.parse_args()
    content = generate()
    if args.check:
        if not SCHEMA.exists() or SCHEMA.read_text() != content:
            print(f"{SCHEMA} is stale: run python hack/gen-values-schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
