"""Chart checks that need no helm binary."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tidegate"


def load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "gen_values_schema", ROOT / "hack" / "gen-values-schema.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_crd_templates_are_generated_from_crds() -> None:
    """templates/crds/ is crds/ (the source of truth) wrapped by hack/gen-chart-crds.py."""
    spec = importlib.util.spec_from_file_location(
        "gen_chart_crds", ROOT / "hack" / "gen-chart-crds.py"
    )
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    present = {p.name: p.read_text() for p in (CHART / "templates" / "crds").glob("*.yaml")}
    assert present == gen.generate(), "stale chart CRDs: run python hack/gen-chart-crds.py"
    assert set(present) == {p.name for p in (ROOT / "crds").glob("*.yaml")}


def test_chart_crds_folder_holds_only_kopfs() -> None:
    """Helm's crds/ folder (installed once, never upgraded) keeps only kopf's peering CRDs;
    ours are templates, so `helm upgrade` updates them."""
    kopf = {"kopf.dev_clusterkopfpeerings.yaml", "kopf.dev_kopfpeerings.yaml"}
    assert {p.name for p in (CHART / "crds").iterdir()} == kopf


def test_values_schema_is_generated() -> None:
    committed = (CHART / "values.schema.json").read_text()
    assert committed == load_generator().generate(), "run: python hack/gen-values-schema.py"


def _schema_errors(values: dict[str, Any]) -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)]


def _defaults() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def test_default_values_validate() -> None:
    values = _defaults()
    assert _schema_errors(values) == []
    bad = dict(values, operator=dict(values["operator"], replicas="two"))
    assert _schema_errors(bad)
    typo = dict(values, crd={"install": False})
    assert _schema_errors(typo)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        # Kubernetes-typed values are checked against their core/v1 shapes.
        ("resources", {"limts": {"cpu": 1}}),
        ("resources", {"limits": {"cpu": {"n": 1}}}),
        ("securityContext", {"runAsUser": "root"}),
        ("securityContext", {"capabilities": {"drop": "ALL"}}),
        ("podSecurityContext", {"runAsNonroot": True}),
        ("affinity", {"nodeAfinity": {}}),
        ("tolerations", [{"key": "a", "operatr": "Exists"}]),
        ("topologySpreadConstraints", [{"maxSkew": "one"}]),
        ("imagePullSecrets", [{"nme": "x"}]),
        ("nodeSelector", {"pool": 1}),
        # The default gateway's spec against the EgressGateway CRD's schema.
        ("defaultGateway", {"create": True, "spec": {"mod": "Audit"}}),
        ("defaultGateway", {"create": True, "spec": {"mode": "Block"}}),
        ("defaultGateway", {"create": True, "spec": {"replicas": "2"}}),
        ("defaultGateway", {"create": True, "spec": {"service": {"schme": "internal"}}}),
        # Our own objects are closed.
        ("metrics", {"podMonitor": {"enabled": True, "intervl": "30s"}}),
        ("metrics", {"prometheusRule": {"enabled": True, "connectionsNearLimitRatio": 2}}),
    ],
)
def test_schema_rejects(path: str, value: Any) -> None:
    values = _defaults()
    if isinstance(value, dict) and isinstance(values.get(path), dict) and path != "defaultGateway":
        value = {**values[path], **value} if path not in {"affinity", "resources"} else value
    assert _schema_errors(dict(values, **{path: value})), (path, value)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("resources", {"limits": {"cpu": 1, "memory": "1Gi"}, "requests": {"cpu": "250m"}}),
        (
            "tolerations",
            [{"key": "pool", "operator": "Equal", "value": "x", "effect": "NoSchedule"}],
        ),
        (
            "affinity",
            {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]}
                        ]
                    }
                }
            },
        ),
        ("operator", {"extraEnv": [{"name": "A", "value": "b"}]}),
        ("defaultGateway", {"create": True, "spec": {"mode": "Audit", "replicas": 3}}),
        ("global", {"imageRegistry": "mirror", "anything": {"nested": [1]}}),
    ],
)
def test_schema_accepts(path: str, value: Any) -> None:
    values = _defaults()
    if path == "operator":
        value = {**values["operator"], **value}
    assert _schema_errors(dict(values, **{path: value})) == []


def test_schema_kubernetes_definitions_are_generated_not_edited() -> None:
    """The committed Kubernetes definitions reproduce from an OpenAPI document shaped like
    the API server's: converting them back is the identity (tests/chart/
    test_chart_tools_kube.py regenerates them from the real kube-apiserver)."""
    gen = load_generator()
    schema = json.loads((CHART / "values.schema.json").read_text())
    k8s = {k for k in schema["definitions"] if k.startswith("io.k8s.")}
    assert set(gen.K8S_ROOTS) <= k8s
    spec = schema["definitions"][gen.GATEWAY_SPEC]
    crd = yaml.safe_load((ROOT / "crds" / "tidegate.io_egressgateways.yaml").read_text())
    crd_spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(spec["properties"]) == set(crd_spec["properties"])


def test_every_value_is_documented() -> None:
    docs = load_generator().comments_by_path((CHART / "values.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gen = load_generator()

    def paths(node: object, prefix: str):  # type: ignore[no-untyped-def]
        if isinstance(node, dict):
            for k, v in node.items():
                path = f"{prefix}.{k}" if prefix else k
                yield path
                if path not in gen.ANNOTATIONS:  # Kubernetes types and maps: not ours
                    yield from paths(v, path)

    missing = [p for p in paths(values, "") if p not in docs]
    assert not missing, f"values without a comment in values.yaml: {missing}"


def test_images_name_no_registry_host() -> None:
    """Image references stay unqualified (``tidegate:<tag>``): whoever installs the chart
    chooses where images come from. A first path segment with a dot or a port would be a
    host."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    repository = values["image"]["repository"]
    first = repository.split("/", 1)[0]
    assert "/" not in repository or ("." not in first and ":" not in first), repository
    for path in CHART.rglob("*.yaml"):
        for match in re.finditer(r"image:\s*['\"]?([^\s'\"{]+)", path.read_text()):
            first = match.group(1).split("/", 1)[0]
            assert "/" not in match.group(1) or "." not in first, (path, match.group(1))


def test_docs_state_source_vs_ingress_addresses() -> None:
    text = (ROOT / "docs" / "helm.md").read_text().lower()
    assert "source" in text and "ingress" in text and "--skip-crds" in text
