"""The chart's default EgressGateway, applied by the operator from a ConfigMap.

Why not a Helm release object: the chart templates the EgressGateway CRD so that `helm
upgrade` updates it, and Helm resolves every kind of a release before it creates any of
them, so a release cannot hold both the CRD and an object of its kind on a first install.
The chart therefore ships the gateway's spec as a ConfigMap (a kind Helm always knows);
the operator server-side-applies the EgressGateway from it, owned by that ConfigMap.
`helm upgrade` changes the ConfigMap and the operator applies the change (removed fields
included: it owns the fields it applied); `helm uninstall` deletes the ConfigMap and the
garbage collector deletes the gateway with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from .render import LABEL_MANAGED_BY, MANAGER

#: The label the chart puts on the ConfigMap; its value is the gateway's name.
LABEL_DEFAULT_GATEWAY = "tidegate.io/default-gateway"
SPEC_KEY = "spec.yaml"


class SpecError(ValueError):
    """The ConfigMap does not hold a usable spec (the chart never writes one)."""


def gateway_from_configmap(configmap: Mapping[str, Any], *, gateway: str) -> dict[str, Any]:
    """The EgressGateway ``gateway`` ("namespace/name") the ConfigMap describes."""
    meta = configmap.get("metadata") or {}
    namespace, _, name = gateway.partition("/")
    if meta.get("namespace") != namespace:
        raise SpecError(
            f"ConfigMap {meta.get('namespace')}/{meta.get('name')} is not in the default "
            f"gateway's namespace {namespace}"
        )
    text = (configmap.get("data") or {}).get(SPEC_KEY, "{}")
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{SPEC_KEY} is not YAML: {exc}") from exc
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise SpecError(f"{SPEC_KEY} must be a mapping, not {type(spec).__name__}")
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_DEFAULT_GATEWAY: name},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": meta["name"],
                    "uid": meta["uid"],
                }
            ],
        },
        "spec": spec,
    }
