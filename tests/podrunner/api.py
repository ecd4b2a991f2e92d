"""The node's side of the API, as a kubelet uses it: claim and bind a Pod, report its
status, request ServiceAccount tokens, read ConfigMaps and Secrets (as admin: the kubelet's
own node authorization is not what these tests are about)."""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import requests
from fixtures_kube import ControlPlane

from .spec import NODE_NAME, POD_IP, PodStartError

if TYPE_CHECKING:
    from .pod import RunningPod


class NodeApi:
    """The pod runner's API client (one admin session per thread)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        """One admin session per thread (each pod's loop runs in its own thread)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self.cp.session()
        return session

    def url(self, path: str) -> str:
        return f"{self.cp.server}{path}"

    def get(self, path: str) -> dict[str, Any] | None:
        resp = self.session.get(self.url(path), timeout=10)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def claim_pod(self, deployment: Mapping[str, Any], timeout: float) -> dict[str, Any] | None:
        """A Pending Pod of the Deployment's newest ReplicaSet, bound to our node."""
        if not self.cp.has_controller_manager:
            return None
        meta = deployment["metadata"]
        ns = meta["namespace"]
        labels = deployment["spec"]["selector"].get("matchLabels") or {}
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{meta['name']}") or {}
            revision = (
                (current.get("metadata") or {})
                .get("annotations", {})
                .get("deployment.kubernetes.io/revision")
            )
            sets = (
                self.session.get(
                    self.url(f"/apis/apps/v1/namespaces/{ns}/replicasets"),
                    params={"labelSelector": selector},
                    timeout=10,
                ).json()["items"]
                or []
            )
            newest = {
                rs["metadata"]["name"]
                for rs in sets
                if any(
                    o.get("uid") == current.get("metadata", {}).get("uid")
                    for o in rs["metadata"].get("ownerReferences") or []
                )
                and rs["metadata"].get("annotations", {}).get("deployment.kubernetes.io/revision")
                == revision
            }
            pods = self.session.get(
                self.url(f"/api/v1/namespaces/{ns}/pods"),
                params={"labelSelector": selector},
                timeout=10,
            ).json()["items"]
            for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
                owners = {o["name"] for o in pod["metadata"].get("ownerReferences") or []}
                if (
                    owners & newest
                    and not pod["spec"].get("nodeName")
                    and not pod["metadata"].get("deletionTimestamp")
                ):
                    binding = {
                        "apiVersion": "v1",
                        "kind": "Binding",
                        "metadata": {"name": pod["metadata"]["name"]},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
                    }
                    resp = self.session.post(
                        self.url(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/binding"),
                        json=binding,
                        timeout=10,
                    )
                    if resp.status_code == 201:
                        return self.get(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
            time.sleep(0.3)
        raise PodStartError(f"no Pending pod of deployment {ns}/{meta['name']} in {timeout} s")

    def report_status(self, pod: RunningPod) -> None:
        """Patch the Pod object's status like a kubelet (phase, IPs, conditions).

        Serialized per pod and built from the state at the moment of sending, so a slow
        earlier report can never land after, and undo, a newer one; the pod's loop also
        re-reports periodically, as the kubelet's status manager does."""
        if not pod.pod_object:
            return
        with pod.status_lock:
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            ready = "True" if pod.ready else "False"
            status = {
                "phase": "Running",
                "hostIP": POD_IP,
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                    {"type": "Ready", "status": ready, "lastTransitionTime": now},
                ],
                "containerStatuses": [
                    {
                        "name": pod.container,
                        "image": pod.image,
                        "imageID": "",
                        "ready": pod.ready,
                        "started": pod.started,
                        "restartCount": pod.restarts,
                        "state": {"running": {"startedAt": now}},
                    }
                ],
            }
            try:
                resp = self.session.patch(
                    self.url(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status"),
                    data=json.dumps({"status": status}),
                    headers={"Content-Type": "application/merge-patch+json"},
                    timeout=10,
                )
                if resp.status_code >= 300:
                    pod.event(f"status report: HTTP {resp.status_code} {resp.text[:200]}")
            except requests.RequestException as exc:
                pod.event(f"status report failed: {exc}")

    def token(
        self,
        namespace: str,
        sa: str,
        pod: Mapping[str, Any],
        *,
        bound: bool,
        seconds: int,
        audience: str | None,
    ) -> bytes:
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audience:
            spec["audiences"] = [audience]
        if bound:
            spec["boundObjectRef"] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            }
        resp = self.session.post(
            self.url(f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token"),
            json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            timeout=10,
        )
        if resp.status_code != 201:
            raise PodStartError(
                f"TokenRequest for {namespace}/{sa}: {resp.status_code} {resp.text}"
            )
        return str(resp.json()["status"]["token"]).encode()
