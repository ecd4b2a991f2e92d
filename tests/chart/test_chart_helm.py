"""helm lint / helm template of charts/tidegate, asserting on the rendered objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helmlib import CHART, NO_HELM, by_kind, find_helm, helm, render, template_text

pytestmark = pytest.mark.skipif(find_helm() is None, reason=NO_HELM)

ROOT = Path(__file__).resolve().parents[2]


def strip_helm_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    crd = dict(crd, metadata=dict(crd["metadata"]))
    crd["metadata"].pop("labels", None)
    crd["metadata"].pop("annotations", None)
    return crd


def test_lint() -> None:
    helm("lint", str(CHART), "--strict")
    helm("lint", str(CHART), "--strict", "--set", "defaultGateway.create=false")


def test_defaults_render_operator() -> None:
    docs = render()
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "tidegate:0.1.0"
    assert c["command"] == ["tidegate", "operator"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    assert "--metrics-listen=0.0.0.0:9090" in c["args"]
    assert "--gateway-image=tidegate:0.1.0" in c["args"]
    assert "--default-gateway=tidegate-system/default" in c["args"]
    assert "--peering=tidegate" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    psc, sc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9090"
    (sa,) = by_kind(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert by_kind(docs, "PodDisruptionBudget")
    assert not by_kind(docs, "ServiceMonitor")


def test_image_values() -> None:
    (dep,) = by_kind(render("image.repository=example/tg", "image.tag=1.2.3"), "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "example/tg:1.2.3"


def _granted(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert "*" not in rule["apiGroups"]
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                granted.setdefault((group, res), set()).update(rule["verbs"])
    return granted


def test_rbac_least_privilege() -> None:
    """Static shape only; tests/kube/test_rbac_audit.py proves each verb is used."""
    docs = render()
    (role,) = by_kind(docs, "ClusterRole")
    cluster = _granted(role)
    assert ("", "secrets") not in cluster
    # cluster-wide: no write to any workload kind, no ConfigMap reads; pods are read (list,
    # watch) and never written: client identity needs every namespace's pods (policies.md)
    assert cluster[("", "pods")] == {"list", "watch"}
    for key in [
        ("", "configmaps"),
        ("", "serviceaccounts"),
        ("", "services"),
        ("apps", "deployments"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
    ]:
        assert key not in cluster, key
    assert cluster[("", "namespaces")] <= {"get", "list", "watch"}
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # the writes: one Role per gateway namespace, the release namespace by default
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-operator")]
    assert [r["metadata"]["namespace"] for r in roles] == ["tidegate-system"]
    local = _granted(roles[0])
    assert ("", "secrets") not in local
    assert "create" in local[("apps", "deployments")]
    docs = render("gatewayNamespaces={egress-a,egress-b}")
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-operator")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["egress-a", "egress-b"]
    bindings = [
        b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"].endswith("-operator")
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["egress-a", "egress-b"]
    (dep,) = by_kind(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--gateway-namespace")] == [
        "--gateway-namespace=egress-a",
        "--gateway-namespace=egress-b",
    ]


def test_crds_are_release_objects() -> None:
    """Our CRDs are templates (so `helm upgrade` updates them), identical to crds/ apart
    from the chart's labels and the keep policy; kopf's stay in Helm's crds/ folder."""
    crds = {d["metadata"]["name"]: d for d in by_kind(render(), "CustomResourceDefinition")}
    for path in (ROOT / "crds").glob("*.yaml"):
        source = yaml.safe_load(path.read_text())
        rendered = crds.pop(source["metadata"]["name"])
        assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert strip_helm_metadata(rendered) == source
    assert not crds, "only ours are templates"
    assert not by_kind(render("crds.enabled=false"), "CustomResourceDefinition")
    for crd in by_kind(render("crds.keep=false"), "CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]
    with_folder = by_kind(render(extra=("--include-crds",)), "CustomResourceDefinition")
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= {
        d["metadata"]["name"] for d in with_folder
    }


def test_default_gateway() -> None:
    """No EgressGateway in the release (its CRD is one): its spec in a ConfigMap that the
    operator applies it from, and a Role to create exactly that."""
    docs = render()
    assert not by_kind(docs, "EgressGateway")
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-gateway")]
    assert cm["metadata"]["name"] == "tidegate-default-gateway"
    assert cm["metadata"]["labels"]["tidegate.io/default-gateway"] == "default"
    assert yaml.safe_load(cm["data"]["spec.yaml"]) == {}
    (dep,) = by_kind(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--default-gateway-spec=tidegate-system/tidegate-default-gateway" in args
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-gateway")]
    assert role["rules"] == [
        {"apiGroups": ["tidegate.io"], "resources": ["egressgateways"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["tidegate-default-gateway"],
            "verbs": ["list", "watch"],
        },
    ]
    (binding,) = [
        b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"].endswith("-gateway")
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    docs = render("defaultGateway.spec.mode=Audit", "defaultGateway.spec.replicas=3")
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-gateway")]
    assert yaml.safe_load(cm["data"]["spec.yaml"]) == {"mode": "Audit", "replicas": 3}
    off = render("defaultGateway.create=false")
    assert not by_kind(off, "ConfigMap")
    assert not [r for r in by_kind(off, "Role") if r["metadata"]["name"].endswith("-gateway")]
    (dep,) = by_kind(off, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--default-gateway-spec")]
    (peering,) = by_kind(render(), "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "tidegate"
    assert not by_kind(render("peering.create=false"), "ClusterKopfPeering")


def test_options() -> None:
    docs = render(
        "operator.replicas=1",
        "metrics.serviceMonitor.enabled=true",
        "nodeSelector.pool=system",
        "peering.create=false",
    )
    assert not by_kind(docs, "PodDisruptionBudget")
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "system"}
    assert not by_kind(docs, "ClusterKopfPeering")
    assert not any(
        a.startswith("--peering") for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_values_schema_rejects_typos() -> None:
    proc = helm("template", "t", str(CHART), "--set", "operator.replica=3", check=False)
    assert proc.returncode != 0


def test_namespaced_objects_in_release_namespace() -> None:
    text = template_text(namespace="egress")
    for doc in yaml.safe_load_all(text):
        if doc and doc["kind"] in {
            "Deployment",
            "ServiceAccount",
            "Service",
            "PodDisruptionBudget",
        }:
            assert doc["metadata"]["namespace"] == "egress"


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key repeated in one mapping, as kubeconform -strict and
    kustomize do (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(k) for k, _ in node.value]
    repeated = {k for k in keys if keys.count(k) > 1}
    assert not repeated, f"repeated keys {repeated} at line {node.start_mark.line + 1}"
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _no_duplicates,  # type: ignore[arg-type]
)

EVERYTHING = (
    "metrics.serviceMonitor.enabled=true",
    "metrics.podMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "metrics.dashboard.enabled=true",
    "podLabels.app\\.kubernetes\\.io/name=override-attempt",
    "podLabels.team=egress",
)


@pytest.mark.parametrize("sets", [(), EVERYTHING], ids=["defaults", "everything"])
def test_no_repeated_keys(sets: tuple[str, ...]) -> None:
    for doc in yaml.load_all(template_text(*sets), Loader=_StrictLoader):
        assert doc is None or doc["kind"]


def test_operator_pod_template_labels() -> None:
    """The pod template carries the selector labels once and no helm.sh/chart, so a chart
    version bump alone never restarts the operator."""
    (dep,) = by_kind(render(*EVERYTHING), "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert "helm.sh/chart" not in labels
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert labels["app.kubernetes.io/name"] == "tidegate"  # the selector wins over podLabels
    assert labels["team"] == "egress"
    assert "helm.sh/chart" in dep["metadata"]["labels"]


def test_operator_readiness_probe() -> None:
    (dep,) = by_kind(render(), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}


def test_kube_version_requirement() -> None:
    """The CRDs' CEL rules need Kubernetes 1.29+: older clusters are refused up front."""
    ok = helm("template", "t", str(CHART), "--kube-version", "1.29.0", check=False)
    assert ok.returncode == 0, ok.stderr
    eks = helm("template", "t", str(CHART), "--kube-version", "v1.30.4-eks-a737599", check=False)
    assert eks.returncode == 0, eks.stderr
    old = helm("template", "t", str(CHART), "--kube-version", "1.28.9", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr


def test_works_as_a_subchart_with_globals(tmp_path: Path) -> None:
    """A parent chart's `global:` values reach every subchart; the schema must allow them."""
    import shutil

    parent = tmp_path / "platform"
    (parent / "charts").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "tidegate")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: platform\nversion: 1.0.0\n"
        "dependencies:\n  - name: tidegate\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text(
        "global:\n  imageRegistry: mirror.internal\n  storageClass: fast\n"
        "tidegate:\n  operator:\n    replicas: 3\n"
    )
    out = helm("template", "p", str(parent), "-n", "platform").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 3
    (parent / "values.yaml").write_text("tidegate:\n  operator:\n    replica: 3\n")
    assert helm("template", "p", str(parent), check=False).returncode != 0


def test_schema_enforced_by_helm() -> None:
    for bad in (
        "resources.limts.cpu=1",
        "defaultGateway.spec.mod=Audit",
        "tolerations[0].operatr=Exists",
        "metrics.podMonitor.interval=soon",
    ):
        proc = helm("template", "t", str(CHART), "--set", bad, check=False)
        assert proc.returncode != 0, bad
    helm("template", "t", str(CHART), "--set", "global.anything=1")


def test_monitoring_objects() -> None:
    docs = render(*EVERYTHING, "metrics.podMonitor.namespaces={egress,ci}")
    (pm,) = by_kind(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "tidegate-gateway"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["egress", "ci"]}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"  # the gateway container's admin port name
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "gateway"
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "TidegateGatewayNoReadyReplica",
        "TidegateBundleReloadErrors",
        "TidegateBundleGenerationLagging",
        "TidegateDenySpike",
        "TidegateWouldDenySpike",
        "TidegateConnectionsNearLimit",
        "TidegateDNSFailures",
        "TidegateOperatorReconcileErrors",
    }
    runbooks = (ROOT / "docs" / "operations.md").read_text()
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            anchor = r["annotations"]["runbook_url"].rpartition("#")[2]
            assert anchor == r["alert"].lower()
            assert f"### {r['alert']}" in runbooks, f"no runbook section for {r['alert']}"
            assert r["labels"]["severity"] in {"warning", "critical"}
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["tidegate.json"])
    assert dashboard["uid"] == "tidegate" and dashboard["panels"]
    assert not {"PodMonitor", "PrometheusRule", "ServiceMonitor"} & {d["kind"] for d in render()}
    assert not [d for d in by_kind(render(), "ConfigMap") if "dashboard" in d["metadata"]["name"]]
