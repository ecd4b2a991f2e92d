"""The rendered chart through the tools GitOps pipelines run, with schemas from a real
kube-apiserver (no network beyond loopback):

- kubeconform -strict, with JSON schemas converted from the OpenAPI v3 documents the test
  API server serves (built-in kinds and, once installed, the tidegate and kopf CRDs) - the
  same conversion hack/gen-values-schema.py applies to the values' Kubernetes types;
- `kubectl kustomize` over the rendered output, as Flux and Argo CD post-render it;
- the values schema's core/v1 definitions, regenerated from that API server's OpenAPI,
  equal the committed ones.

The Prometheus Operator's kinds (ServiceMonitor, PodMonitor, PrometheusRule) are checked
against its CRDs, generated from its API module's Go types by hack/tools/build.sh and
installed on the test API server like ours.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from helmlib import CHART, NO_HELM, find_helm, template_text
from toolslib import monitoring_crds, tool

pytestmark = [pytest.mark.kube, pytest.mark.skipif(find_helm() is None, reason=NO_HELM)]

ROOT = Path(__file__).resolve().parents[2]
GROUP_VERSIONS = (
    "api/v1",
    "apis/apps/v1",
    "apis/policy/v1",
    "apis/rbac.authorization.k8s.io/v1",
    "apis/tidegate.io/v1alpha1",
    "apis/kopf.dev/v1",
    "apis/apiextensions.k8s.io/v1",
    "apis/monitoring.coreos.com/v1",
)
EVERYTHING = (
    "metrics.serviceMonitor.enabled=true",
    "metrics.podMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "metrics.dashboard.enabled=true",
    "defaultGateway.spec.mode=Audit",
    "tolerations[0].key=pool",
    "tolerations[0].operator=Exists",
)


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_values_schema", ROOT / "hack" / "gen-values-schema.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openapi(control_plane: Any) -> dict[str, dict[str, Any]]:
    """The API server's OpenAPI v3 documents, with the chart's CRDs installed."""
    crds = [*(CHART / "crds").glob("*.yaml"), *(ROOT / "crds").glob("*.yaml"), *monitoring_crds()]
    for path in sorted(crds):
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/egressgateways.tidegate.io",
        "crd/egresspolicies.tidegate.io",
        "crd/clusterkopfpeerings.kopf.dev",
        "crd/prometheusrules.monitoring.coreos.com",
        "crd/podmonitors.monitoring.coreos.com",
    )
    docs: dict[str, dict[str, Any]] = {}
    for gv in GROUP_VERSIONS:
        for _ in range(50):  # a new CRD's document appears a moment after Established
            proc = control_plane.kubectl("get", "--raw", f"/openapi/v3/{gv}", check=False)
            if proc.returncode == 0:
                docs[gv] = json.loads(proc.stdout)
                break
            subprocess.run(["sleep", "0.2"], check=True)
        assert gv in docs, f"no OpenAPI v3 document for {gv}"
    return docs


@pytest.fixture(scope="module")
def schema_dir(openapi: dict[str, dict[str, Any]], tmp_path_factory: Any) -> Path:
    """kubeconform's layout: <dir>/<group>/<version>/<kind>.json ("v1/v1" for core)."""
    gen = generator()
    out: Path = tmp_path_factory.mktemp("kubeconform-schemas")
    for doc in openapi.values():
        schemas = doc["components"]["schemas"]
        definitions = {k: gen.convert(v, keep_descriptions=False) for k, v in schemas.items()}
        for schema in schemas.values():
            for gvk in schema.get("x-kubernetes-group-version-kind", []):
                group = gvk["group"] or gvk["version"]
                path = out / group / gvk["version"] / f"{gvk['kind'].lower()}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                body = gen.convert(schema, keep_descriptions=False)
                path.write_text(json.dumps({**body, "definitions": definitions}))
    return out


def kubeconform(schema_dir: Path, text: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            tool("kubeconform"),
            "-strict",
            "-summary",
            "-schema-location",
            str(schema_dir) + "/{{ .Group }}/{{ .ResourceAPIVersion }}/{{ .ResourceKind }}.json",
            *extra,
            "-",
        ],
        input=text,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("sets", [(), EVERYTHING], ids=["defaults", "everything"])
def test_kubeconform_strict(schema_dir: Path, sets: tuple[str, ...]) -> None:
    text = template_text(*sets)
    proc = kubeconform(schema_dir, text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Invalid: 0, Errors: 0" in proc.stdout, proc.stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(text) if d}
    assert {"Deployment", "CustomResourceDefinition", "ClusterKopfPeering", "Role"} <= kinds
    if sets:
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds


def test_kubeconform_catches_what_the_old_chart_had(schema_dir: Path) -> None:
    """The checks are real: a repeated pod-template label (the chart's old bug) and an
    unknown field both fail."""
    text = template_text()
    repeated = text.replace(
        "        app.kubernetes.io/component: operator\n",
        "        app.kubernetes.io/component: operator\n        app.kubernetes.io/component: x\n",
        1,
    )
    assert repeated != text
    assert kubeconform(schema_dir, repeated).returncode != 0
    limit = "  revisionHistoryLimit: 5\n"
    unknown = text.replace(limit, limit + "  revisions: 5\n")
    assert unknown != text
    assert kubeconform(schema_dir, unknown).returncode != 0
    monitors = template_text("metrics.podMonitor.enabled=true")
    typo = monitors.replace("  podMetricsEndpoints:\n", "  podMetricEndpoints:\n", 1)
    assert typo != monitors
    assert kubeconform(schema_dir, monitors).returncode == 0
    assert kubeconform(schema_dir, typo).returncode != 0


def test_kubectl_kustomize_post_render(control_plane: Any, tmp_path: Path) -> None:
    """What Flux and Argo CD do with a rendered chart: kustomize it with a patch."""
    (tmp_path / "rendered.yaml").write_text(template_text(*EVERYTHING))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["rendered.yaml"],
                "labels": [{"pairs": {"team": "egress"}, "includeTemplates": True}],
                "patches": [
                    {
                        "target": {"kind": "Deployment", "name": "tidegate-operator"},
                        "patch": "- op: replace\n  path: /spec/replicas\n  value: 3\n",
                    }
                ],
            }
        )
    )
    proc = control_plane.kubectl("kustomize", str(tmp_path))
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["template"]["metadata"]["labels"]["team"] == "egress"


def test_values_schema_kubernetes_definitions_match_the_api_server(
    openapi: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    gen = generator()
    committed = json.loads((CHART / "values.schema.json").read_text())["definitions"]
    served = gen.kubernetes_definitions(openapi["api/v1"])
    mine = {k: v for k, v in committed.items() if k.startswith("io.k8s.")}
    assert served == mine, (
        "values.schema.json's Kubernetes definitions differ from the API server's: "
        "kubectl get --raw /openapi/v3/api/v1 > core.json && "
        "python hack/gen-values-schema.py --openapi core.json"
    )
