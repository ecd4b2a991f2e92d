"""Chart checks that need no helm binary."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

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


@pytest.mark.parametrize(
    "name", ["tidegate.io_egresspolicies.yaml", "tidegate.io_egressgateways.yaml"]
)
def test_chart_crds_match_source_of_truth(name: str) -> None:
    source = (ROOT / "crds" / name).read_bytes()
    copy = (CHART / "crds" / name).read_bytes()
    assert copy == source, (
        f"charts/tidegate/crds/{name} differs from crds/{name}: "
        "cp crds/*.yaml charts/tidegate/crds/"
    )


def test_chart_crds_are_ours_and_kopfs_only() -> None:
    ours = {p.name for p in (ROOT / "crds").glob("*.yaml")}
    kopf = {"kopf.dev_clusterkopfpeerings.yaml", "kopf.dev_kopfpeerings.yaml"}
    assert {p.name for p in (CHART / "crds").iterdir()} == ours | kopf


def test_values_schema_is_generated() -> None:
    committed = (CHART / "values.schema.json").read_text()
    assert committed == load_generator().generate(), "run: python hack/gen-values-schema.py"


def test_default_values_validate() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    bad = dict(values, operator=dict(values["operator"], replicas="two"))
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))
    typo = dict(values, crd={"install": False})
    assert list(jsonschema.Draft7Validator(schema).iter_errors(typo))


def test_every_value_is_documented() -> None:
    docs = load_generator().comments_by_path((CHART / "values.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gen = load_generator()

    def paths(node: object, prefix: str):  # type: ignore[no-untyped-def]
        if isinstance(node, dict):
            for k, v in node.items():
                path = f"{prefix}.{k}" if prefix else k
                yield path
                if not isinstance(
                    gen.ANNOTATIONS.get(path, {}).get("additionalProperties"), (bool, dict)
                ):
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
