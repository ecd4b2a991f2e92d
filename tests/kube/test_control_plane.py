"""Prove that the ``control_plane`` fixture is a real Kubernetes API server.

Each test checks one behaviour the operator relies on and an in-memory fake would not
give: schema and CEL validation, the status subresource, watches, optimistic concurrency,
RBAC for ServiceAccount tokens, server-side dry-run of a Helm render, and the controller
manager's garbage collection and Deployment -> ReplicaSet. The CRD lives in its own group
(cptest.tidegate.io) so it never collides with the real tidegate.io CRDs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fixtures_kube import ControlPlane, pinned_versions

pytestmark = pytest.mark.kube

GROUP = "cptest.tidegate.io"
NS = "cptest"
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                    "minReplicas": {"type": "integer"},
                                    "maxReplicas": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "!has(self.minReplicas) || !has(self.maxReplicas)"
                                        " || self.minReplicas <= self.maxReplicas",
                                        "message": "minReplicas must not exceed maxReplicas",
                                    }
                                ],
                            },
                            "status": {
                                "type": "object",
                                "properties": {"phase": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def api(control_plane: ControlPlane) -> Iterator[requests.Session]:
    """Admin HTTP session, with the Widget CRD established and namespace ``cptest``."""
    control_plane.apply([CRD])
    control_plane.kubectl(
        "wait", "--for=condition=Established", f"crd/widgets.{GROUP}", "--timeout=30s"
    )
    control_plane.ensure_namespace(NS)
    with control_plane.session() as s:
        yield s


def widgets_url(cp: ControlPlane, name: str = "", ns: str = NS) -> str:
    base = f"{cp.server}/apis/{GROUP}/v1/namespaces/{ns}/widgets"
    return f"{base}/{name}" if name else base


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def merge_patch(s: requests.Session, url: str, body: dict[str, Any]) -> requests.Response:
    return s.patch(
        url, data=json.dumps(body), headers={"Content-Type": "application/merge-patch+json"}
    )


def test_openapi_schema_rejects_bad_object(
    control_plane: ControlPlane, api: requests.Session
) -> None:
    r = api.post(widgets_url(control_plane), json=widget("too-big", size=100))
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "Invalid"
    assert "spec.size" in r.text

    r = api.post(widgets_url(control_plane), json=widget("no-size"))
    assert r.status_code == 422, r.text


def test_cel_rule_is_enforced(control_plane: ControlPlane, api: requests.Session) -> None:
    r = api.post(
        widgets_url(control_plane), json=widget("bad-range", size=1, minReplicas=5, maxReplicas=2)
    )
    assert r.status_code == 422, r.text
    assert "minReplicas must not exceed maxReplicas" in r.text

    r = api.post(
        widgets_url(control_plane), json=widget("good-range", size=1, minReplicas=1, maxReplicas=2)
    )
    assert r.status_code == 201, r.text


def test_status_subresource_separates_spec_and_status(
    control_plane: ControlPlane, api: requests.Session
) -> None:
    url = widgets_url(control_plane, "split")
    assert api.post(widgets_url(control_plane), json=widget("split", size=2)).status_code == 201

    # The main resource ignores status ...
    r = merge_patch(api, url, {"status": {"phase": "Hacked"}})
    assert r.status_code == 200, r.text
    assert "status" not in r.json() or r.json()["status"].get("phase") != "Hacked"

    # ... and the status subresource ignores spec.
    r = merge_patch(api, f"{url}/status", {"spec": {"size": 9}, "status": {"phase": "Ready"}})
    assert r.status_code == 200, r.text
    got = api.get(url).json()
    assert got["status"]["phase"] == "Ready"
    assert got["spec"]["size"] == 2


def test_watch_sees_added_modified_deleted(
    control_plane: ControlPlane, api: requests.Session
) -> None:
    listing = api.get(widgets_url(control_plane))
    assert listing.status_code == 200
    since = listing.json()["metadata"]["resourceVersion"]

    url = widgets_url(control_plane, "watched")
    assert api.post(widgets_url(control_plane), json=widget("watched", size=1)).ok
    assert merge_patch(api, url, {"spec": {"size": 3}}).ok
    assert api.delete(url).ok

    # A watch from the earlier resourceVersion replays what happened since.
    events: list[tuple[str, str]] = []
    with api.get(
        widgets_url(control_plane),
        stream=True,
        timeout=30,
        params={
            "watch": "1",
            "resourceVersion": since,
            "timeoutSeconds": "10",
            "fieldSelector": "metadata.name=watched",
        },
    ) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line:
                continue
            ev = json.loads(line)
            events.append((ev["type"], ev["object"]["metadata"]["name"]))
            if ev["type"] == "DELETED":
                break
    assert [t for t, _ in events] == ["ADDED", "MODIFIED", "DELETED"]


def test_stale_resource_version_conflicts(
    control_plane: ControlPlane, api: requests.Session
) -> None:
    assert api.post(widgets_url(control_plane), json=widget("racy", size=1)).ok
    url = widgets_url(control_plane, "racy")
    stale = api.get(url).json()

    fresh = dict(stale, spec={"size": 4})
    assert api.put(url, json=fresh).status_code == 200

    stale["spec"] = {"size": 5}
    r = api.put(url, json=stale)
    assert r.status_code == 409, r.text
    assert r.json()["reason"] == "Conflict"


def test_kubectl_get(control_plane: ControlPlane, api: requests.Session) -> None:
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    pinned = pinned_versions()["KUBERNETES_VERSION"]
    assert version["serverVersion"]["gitVersion"] == pinned
    assert version["clientVersion"]["gitVersion"] == pinned

    control_plane.apply(
        [dict(widget("from-kubectl", size=7), metadata={"name": "from-kubectl", "namespace": NS})]
    )
    out = control_plane.kubectl("get", "widgets", "-n", NS, "-o", "json").stdout
    names = {item["metadata"]["name"] for item in json.loads(out)["items"]}
    assert "from-kubectl" in names
    assert "default" in control_plane.kubectl("get", "namespaces", "-o", "name").stdout


def test_limited_serviceaccount_gets_403(
    control_plane: ControlPlane, api: requests.Session
) -> None:
    role_yaml = f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: widget-reader
rules:
  - apiGroups: ["{GROUP}"]
    resources: ["widgets"]
    verbs: ["get", "list", "watch"]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: ignored-by-the-helper}}
"""
    ns = "cptest-rbac"
    kubeconfig = control_plane.serviceaccount_kubeconfig(ns, "reader", [role_yaml])

    ok = control_plane.kubectl("get", "widgets", "-n", ns, kubeconfig=kubeconfig)
    assert ok.returncode == 0
    denied = control_plane.kubectl("get", "secrets", "-n", ns, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    assert not control_plane.kubectl("get", "deployments", "-n", ns, "-o", "name").stdout

    # The same over plain HTTP with the ServiceAccount's bearer token: 403, not 401.
    token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    headers = {"Authorization": f"Bearer {token}"}
    verify = str(control_plane.ca_path)
    assert (
        requests.get(
            widgets_url(control_plane, ns=ns), headers=headers, verify=verify, timeout=10
        ).status_code
        == 200
    )
    r = requests.get(widgets_url(control_plane, ns=NS), headers=headers, verify=verify, timeout=10)
    assert r.status_code == 403, r.text
    who = control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout
    assert json.loads(who)["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"


def test_chart_style_rbac_bindings_are_applied_as_given(control_plane: ControlPlane) -> None:
    # What `helm template` of a chart gives: a ClusterRole and its own binding to the SA.
    rendered = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: cptest-ns-watcher}
rules:
  - {apiGroups: [""], resources: ["namespaces"], verbs: ["get", "list", "watch"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: cptest-ns-watcher}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cptest-ns-watcher}
subjects: [{kind: ServiceAccount, name: op, namespace: cptest-chart}]
"""
    kubeconfig = control_plane.serviceaccount_kubeconfig("cptest-chart", "op", [rendered])

    def can_i(*args: str) -> str:
        proc = control_plane.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        return proc.stdout.strip()

    assert can_i("list", "namespaces") == "yes"
    assert can_i("list", "secrets", "-A") == "no"
    # No extra binding was invented for a role the given binding already covers.
    names = control_plane.kubectl("get", "clusterrolebindings", "-o", "name").stdout.split()
    assert [n for n in names if "cptest-ns-watcher" in n] == [
        "clusterrolebinding.rbac.authorization.k8s.io/cptest-ns-watcher"
    ]


def test_helm_template_applies_with_server_dry_run(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\nreplicas: 2\n")
    (chart / "templates" / "all.yaml").write_text("""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-config
data:
  greeting: {{ .Values.greeting | quote }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-app
spec:
  replicas: {{ .Values.replicas }}
  selector: {matchLabels: {app: {{ .Release.Name }}}}
  template:
    metadata: {labels: {app: {{ .Release.Name }}}}
    spec:
      containers:
        - name: app
          image: example.invalid/app:1
""")
    rendered = control_plane.helm("template", "tiny", str(chart), "--namespace", NS).stdout
    assert "tiny-config" in rendered
    out = control_plane.kubectl(
        "apply", "--dry-run=server", "-n", NS, "-f", "-", input=rendered
    ).stdout
    assert "configmap/tiny-config created (server dry run)" in out
    assert "deployment.apps/tiny-app created (server dry run)" in out
    # Dry run persisted nothing.
    gone = control_plane.kubectl("get", "configmap", "tiny-config", "-n", NS, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def _wait_for(predicate: Any, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_controller_manager_collects_garbage_and_makes_replicasets(
    control_plane: ControlPlane, api: requests.Session
) -> None:
    if not control_plane.has_controller_manager:
        pytest.skip("kube-controller-manager was not built")
    base = f"{control_plane.server}/api/v1/namespaces/{NS}/configmaps"
    owner = api.post(base, json={"metadata": {"name": "owner"}}).json()
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    assert (
        api.post(base, json={"metadata": {"name": "owned", "ownerReferences": [ref]}}).status_code
        == 201
    )
    assert api.delete(f"{base}/owner").ok
    assert _wait_for(lambda: api.get(f"{base}/owned").status_code == 404), (
        "garbage collector did not delete the dependent"
    )

    control_plane.kubectl(
        "create", "deployment", "gc-app", "-n", NS, "--image=example.invalid/app:1"
    )
    rs_url = f"{control_plane.server}/apis/apps/v1/namespaces/{NS}/replicasets"
    assert _wait_for(
        lambda: any(
            rs["metadata"]["name"].startswith("gc-app-") for rs in api.get(rs_url).json()["items"]
        )
    ), "no ReplicaSet for the Deployment"
