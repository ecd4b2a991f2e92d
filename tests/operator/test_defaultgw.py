"""The default EgressGateway built from the chart's ConfigMap (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from tidegate.operator.defaultgw import SpecError, gateway_from_configmap


def configmap(spec: str | None, namespace: str = "tidegate-system") -> dict[str, Any]:
    return {
        "metadata": {"name": "tidegate-default-gateway", "namespace": namespace, "uid": "u-1"},
        "data": {} if spec is None else {"spec.yaml": spec},
    }


def test_gateway_from_configmap() -> None:
    gw = gateway_from_configmap(
        configmap("mode: Audit\nreplicas: 3\n"), gateway="tidegate-system/default"
    )
    assert gw["kind"] == "EgressGateway" and gw["apiVersion"] == "tidegate.io/v1alpha1"
    assert gw["metadata"]["name"] == "default"
    assert gw["metadata"]["namespace"] == "tidegate-system"
    assert gw["spec"] == {"mode": "Audit", "replicas": 3}
    (owner,) = gw["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "tidegate-default-gateway",
        "uid": "u-1",
    }


@pytest.mark.parametrize("spec", [None, "{}\n", ""])
def test_empty_spec_takes_the_crd_defaults(spec: str | None) -> None:
    assert gateway_from_configmap(configmap(spec), gateway="tidegate-system/default")["spec"] == {}


@pytest.mark.parametrize("spec", ["- a\n", "mode: [\n", "just text\n"])
def test_bad_spec_is_an_error(spec: str) -> None:
    with pytest.raises(SpecError):
        gateway_from_configmap(configmap(spec), gateway="tidegate-system/default")


def test_other_namespace_is_refused() -> None:
    """The owner must be in the gateway's namespace (owner references never cross it)."""
    with pytest.raises(SpecError, match="namespace"):
        gateway_from_configmap(
            configmap("{}", namespace="elsewhere"), gateway="tidegate-system/default"
        )
