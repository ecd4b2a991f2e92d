"""helm lint / helm template of charts/tidegate, asserting on the rendered objects."""

from __future__ import annotations

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


def test_rbac_least_privilege() -> None:
    (role,) = by_kind(render(), "ClusterRole")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert "*" not in rule["apiGroups"]
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                granted.setdefault((group, res), set()).update(rule["verbs"])
    assert ("", "secrets") not in granted
    assert {"get", "list", "watch", "patch"} <= granted[("tidegate.io", "egresspolicies")]
    assert "patch" in granted[("tidegate.io", "egressgateways/status")]
    assert {"create", "patch"} <= granted[("", "events")]
    assert {"get", "list", "watch", "patch"} <= granted[("kopf.dev", "clusterkopfpeerings")]
    assert {"get", "list", "watch"} <= granted[("", "namespaces")]
    for key in [
        ("", "configmaps"),
        ("", "serviceaccounts"),
        ("", "services"),
        ("apps", "deployments"),
        ("policy", "poddisruptionbudgets"),
        ("autoscaling", "horizontalpodautoscalers"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
    ]:
        assert granted[key] == {"get", "list", "watch", "create", "patch", "update", "delete"}
    (binding,) = by_kind(render(), "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_crds_come_from_the_chart_crds_folder() -> None:
    """Helm installs crds/ before rendering templates (so the default EgressGateway and the
    ClusterKopfPeering can be plain release objects), never upgrades or deletes them."""
    assert not by_kind(render(), "CustomResourceDefinition")
    crds = {
        d["metadata"]["name"]: d
        for d in by_kind(render(extra=("--include-crds",)), "CustomResourceDefinition")
    }
    for path in (ROOT / "crds").glob("*.yaml"):
        source = yaml.safe_load(path.read_text())
        assert crds[source["metadata"]["name"]] == source
    assert "clusterkopfpeerings.kopf.dev" in crds and "kopfpeerings.kopf.dev" in crds


def test_default_gateway() -> None:
    (gw,) = by_kind(render(), "EgressGateway")
    assert gw["metadata"] == gw["metadata"] | {"name": "default", "namespace": "tidegate-system"}
    assert gw["spec"] == {}
    assert "helm.sh/hook" not in gw["metadata"].get("annotations", {})
    docs = render("defaultGateway.spec.mode=Audit", "defaultGateway.spec.service.scheme=internal")
    (gw,) = by_kind(docs, "EgressGateway")
    assert gw["spec"] == {"mode": "Audit", "service": {"scheme": "internal"}}
    assert not by_kind(render("defaultGateway.create=false"), "EgressGateway")
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
