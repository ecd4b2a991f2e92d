"""The pod runner: reads a Deployment back from the API server, claims one of its Pods,
resolves what ``podman kube play`` cannot (API-backed volumes, env, the token) and runs it."""

from __future__ import annotations

import copy
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests
import yaml
from fixtures_kube import ControlPlane

from .api import NodeApi
from .pod import RunningPod
from .podman import Podman
from .spec import (
    DEFAULT_MODE,
    NODE_NAME,
    POD_IP,
    SA_MOUNT,
    SERVICE_ACCOUNT_VOLUME,
    TOKEN_SECONDS,
    AtomicDir,
    PodStartError,
    Probe,
    decoded,
    expand,
    field_value,
    project_keys,
)


class PodRunner:
    """Runs pods of Deployments on this machine (see the module docstring)."""

    def __init__(self, cp: ControlPlane, podman: Podman, workdir: Path) -> None:
        self.cp = cp
        self.podman = podman
        self.workdir = workdir
        self.api = NodeApi(cp)
        self.pods: list[RunningPod] = []
        workdir.mkdir(parents=True, exist_ok=True)

    # ----- API (delegated to the node's client)

    @property
    def session(self) -> requests.Session:
        return self.api.session

    def get(self, path: str) -> dict[str, Any] | None:
        return self.api.get(path)

    def report_status(self, pod: RunningPod) -> None:
        self.api.report_status(pod)

    def _projected(
        self, running: RunningPod, projected: Mapping[str, Any], run_as: int | None
    ) -> Callable[[], dict[str, tuple[bytes, int]]]:
        """The files of a projected volume (serviceAccountToken, configMap, secret,
        downwardAPI sources), the token re-requested at 80 % of its lifetime."""
        namespace, pod = running.namespace, running.pod
        mode = int(projected.get("defaultMode", DEFAULT_MODE))
        sa = pod["spec"].get("serviceAccountName") or "default"

        def files() -> dict[str, tuple[bytes, int]]:
            out: dict[str, tuple[bytes, int]] = {}
            for src in projected.get("sources") or []:
                if "serviceAccountToken" in src:
                    tok = src["serviceAccountToken"]
                    seconds = int(tok.get("expirationSeconds", TOKEN_SECONDS))
                    key = f"{tok.get('audience', '')}/{seconds}"
                    now = time.monotonic()
                    issued, token = running.tokens.get(key, (0.0, b""))
                    if not token or now - issued > 0.8 * seconds:
                        token = self.api.token(
                            namespace,
                            sa,
                            pod,
                            bound=running.pod_object,
                            seconds=seconds,
                            audience=tok.get("audience"),
                        )
                        running.tokens[key] = (now, token)
                    # The kubelet makes the token private to the pod's user when it has one.
                    out[tok["path"]] = (token, 0o600 if run_as is not None else mode)
                elif "configMap" in src or "secret" in src:
                    secret = "secret" in src
                    ref = src["secret" if secret else "configMap"]
                    what = f"{'secret' if secret else 'configmap'} {namespace}/{ref['name']}"
                    obj = (self.api.secret if secret else self.api.configmap)(
                        namespace, ref["name"]
                    )
                    source = {"defaultMode": mode, **ref}
                    out.update(project_keys(obj, source, secret=secret, what=what))
                elif "downwardAPI" in src:
                    for item in src["downwardAPI"].get("items") or []:
                        if "fieldRef" not in item:
                            raise PodStartError(f"downwardAPI item {item} is not supported")
                        value = field_value(pod, item["fieldRef"]["fieldPath"]).encode()
                        out[item["path"]] = (value, int(item.get("mode", mode)))
                else:
                    raise PodStartError(f"projected source {sorted(src)} is not supported")
            return out

        return files

    # ----- resolving the pod

    @staticmethod
    def container_ports(pod: Mapping[str, Any], container: str) -> dict[str, int]:
        for c in pod["spec"]["containers"]:
            if c["name"] == container:
                return {
                    p["name"]: int(p["containerPort"]) for p in c.get("ports") or [] if "name" in p
                }
        return {}

    def _env(
        self, pod: Mapping[str, Any], container: Mapping[str, Any], api: tuple[str, int]
    ) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        host, port = api
        # The kubernetes Service's variables, rewritten to the API server on loopback.
        env.update(
            KUBERNETES_SERVICE_HOST=host,
            KUBERNETES_SERVICE_PORT=str(port),
            KUBERNETES_SERVICE_PORT_HTTPS=str(port),
            KUBERNETES_PORT=f"tcp://{host}:{port}",
            KUBERNETES_PORT_443_TCP=f"tcp://{host}:{port}",
            KUBERNETES_PORT_443_TCP_PROTO="tcp",
            KUBERNETES_PORT_443_TCP_PORT=str(port),
            KUBERNETES_PORT_443_TCP_ADDR=host,
        )
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            secret = "secretRef" in source
            obj = (self.api.secret if secret else self.api.configmap)(ns, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise PodStartError(f"envFrom {ref['name']} not found")
            for key, value in decoded(obj, secret=secret).items():
                env[prefix + key] = value.decode()
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(str(var.get("value", "")), env)
                continue
            value_from = var["valueFrom"]
            if "fieldRef" in value_from:
                env[name] = field_value(pod, value_from["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in value_from or "secretKeyRef" in value_from:
                secret = "secretKeyRef" in value_from
                ref = value_from["secretKeyRef" if secret else "configMapKeyRef"]
                obj = (self.api.secret if secret else self.api.configmap)(ns, ref["name"])
                data = decoded(obj, secret=secret) if obj else {}
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode()
                elif not ref.get("optional"):
                    raise PodStartError(f"env {name}: {ref['name']}/{ref['key']} not found")
            else:
                raise PodStartError(f"env {name}: {sorted(value_from)} is not supported")
        return env

    def run_deployment(
        self,
        namespace: str,
        name: str,
        *,
        container: str | None = None,
        api_reachable: bool = True,
        volume_sync: float | None = 1.0,
        claim_timeout: float = 30,
    ) -> RunningPod:
        """Run one pod of Deployment ``namespace/name`` (read back from the API server).

        ``api_reachable=False`` points the pod's KUBERNETES_SERVICE_* at a closed loopback
        port, as a NetworkPolicy cutting the pod off from the API would; the runner (the
        "kubelet") still reaches the API and keeps its volumes current.
        """
        deployment = self.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
        if deployment is None:
            raise PodStartError(f"deployment {namespace}/{name} not found")
        template = copy.deepcopy(deployment["spec"]["template"])
        claimed = self.api.claim_pod(deployment, claim_timeout)
        if claimed is not None:
            pod: dict[str, Any] = claimed
            pod_name = pod["metadata"]["name"]
        else:
            pod_name = f"{name}-podrunner-{uuid.uuid4().hex[:5]}"
            pod = {
                "metadata": {
                    **template.get("metadata", {}),
                    "name": pod_name,
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                },
                "spec": template["spec"],
            }
        pod["metadata"].setdefault("namespace", namespace)
        spec = pod["spec"]
        containers = spec["containers"]
        chosen = next((c for c in containers if c["name"] == container), containers[0])
        if len(containers) > 1 and container is None:
            raise PodStartError("several containers: name the one to run")
        podman_name = f"{pod_name}-{uuid.uuid4().hex[:6]}"
        workdir = self.workdir / podman_name
        security = {**(spec.get("securityContext") or {}), **(chosen.get("securityContext") or {})}
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        run_as = security.get("runAsUser")

        running = RunningPod(
            runner=self,
            namespace=namespace,
            name=pod_name,
            uid=pod["metadata"]["uid"],
            pod_object=claimed is not None,
            pod=pod,
            podman_name=podman_name,
            container=chosen["name"],
            workdir=workdir,
            api_reachable=api_reachable,
            volume_sync=volume_sync,
            image=chosen["image"],
        )

        # The image: present, or ErrImageNeverPull (no registry to pull from).
        image = chosen["image"]
        if self.podman.run("image", "exists", image, check=False).returncode != 0:
            raise PodStartError(f"ErrImageNeverPull: image {image!r} is not on this node")
        image_user = self.podman.run(
            "image", "inspect", "--format", "{{.Config.User}}", image
        ).stdout.strip()
        effective = run_as if run_as is not None else image_user.split(":", 1)[0] or "0"
        if security.get("runAsNonRoot") and not str(effective).isdigit():
            raise PodStartError(f"runAsNonRoot: image user {image_user!r} is not numeric")
        if security.get("runAsNonRoot") and int(effective) == 0:
            raise PodStartError("CreateContainerConfigError: runAsNonRoot and the user is root")

        # Volumes -> host folders (kube play mounts them as hostPath volumes).
        volumes: list[dict[str, Any]] = []
        for volume in spec.get("volumes") or []:
            vname = volume["name"]
            host = workdir / "volumes" / vname
            if "configMap" in volume or "secret" in volume:
                secret = "secret" in volume
                source = volume["secret" if secret else "configMap"]
                ref = source.get("secretName" if secret else "name")
                what = f"{'secret' if secret else 'configmap'} {namespace}/{ref}"

                def keys(
                    source: Mapping[str, Any] = source,
                    ref: str = ref,
                    secret: bool = secret,
                    what: str = what,
                ) -> dict[str, tuple[bytes, int]]:
                    obj = (self.api.secret if secret else self.api.configmap)(namespace, ref)
                    return project_keys(obj, source, secret=secret, what=what)

                atomic = AtomicDir(host, gid=fs_group)
                atomic.write(keys())
                running.volumes[vname] = (atomic, keys)
            elif "projected" in volume:
                files = self._projected(running, volume["projected"], run_as)
                atomic = AtomicDir(host, gid=fs_group, owner=run_as)
                atomic.write(files())
                running.volumes[vname] = (atomic, files)
            elif "emptyDir" in volume:
                host.mkdir(parents=True, exist_ok=True)
                host.chmod(0o777)
            elif "hostPath" in volume:
                host = Path(volume["hostPath"]["path"])
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise PodStartError(f"volume {vname}: {kinds} is not supported by the pod runner")
            volumes.append({"name": vname, "hostPath": {"path": str(host), "type": "Directory"}})
        mounts = list(chosen.get("volumeMounts") or [])

        # Without the ServiceAccount admission plugin (a synthesized pod) add the volume it
        # would have added; a Pod object from the API already carries it.
        if spec.get("automountServiceAccountToken", True) and not any(
            m["mountPath"] == SA_MOUNT for m in mounts
        ):
            host = workdir / "volumes" / "kube-api-access"
            files = self._projected(running, SERVICE_ACCOUNT_VOLUME, run_as)
            atomic = AtomicDir(host, gid=fs_group, owner=run_as)
            atomic.write(files())
            running.volumes["kube-api-access"] = (atomic, files)
            volumes.append(
                {"name": "kube-api-access", "hostPath": {"path": str(host), "type": "Directory"}}
            )
            mounts.append({"name": "kube-api-access", "mountPath": SA_MOUNT, "readOnly": True})

        # Env, command and args, resolved here (kube play knows no API).
        api_host, api_port = self._api_address(api_reachable)
        env = self._env(pod, chosen, (api_host, api_port))
        play_container: dict[str, Any] = {
            "name": chosen["name"],
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "volumeMounts": mounts,
            "securityContext": {
                k: v
                for k, v in security.items()
                if k
                in (
                    "runAsUser",
                    "runAsGroup",
                    "readOnlyRootFilesystem",
                    "allowPrivilegeEscalation",
                    "capabilities",
                    "privileged",
                )
            },
        }
        for key in ("command", "args"):
            if key in chosen:
                play_container[key] = [expand(str(a), env) for a in chosen[key]]
        if "workingDir" in chosen:
            play_container["workingDir"] = chosen["workingDir"]
        pod_security = {
            k: v
            for k, v in (spec.get("securityContext") or {}).items()
            if k in ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups")
        }
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": podman_name, "labels": pod["metadata"].get("labels") or {}},
            "spec": {
                "hostNetwork": True,
                "hostname": pod_name,
                # Restarts are ours (counted, with back-off, and after liveness failures).
                "restartPolicy": "Never",
                "securityContext": pod_security,
                "containers": [play_container],
                "volumes": volumes,
            },
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "play.yaml").write_text(yaml.safe_dump(manifest))
        for kind, key in (
            ("readiness", "readinessProbe"),
            ("liveness", "livenessProbe"),
            ("startup", "startupProbe"),
        ):
            if key in chosen:
                running.probes.append(Probe(kind=kind, spec=chosen[key], next_at=0))

        running.event(f"Scheduled to {NODE_NAME}" if claimed else "no Pod object (no controller)")
        self.podman.run("kube", "play", str(workdir / "play.yaml"), timeout=180)
        running.event(f"Started container {chosen['name']} ({image})")
        self.pods.append(running)
        self.report_status(running)
        running.start()
        return running

    def _api_address(self, reachable: bool) -> tuple[str, int]:
        if reachable:
            port = int(self.cp.server.rsplit(":", 1)[1])
            return (POD_IP, port)
        # A loopback port nothing listens on: connections are refused.
        with socket.socket() as s:
            s.bind((POD_IP, 0))
            return (POD_IP, int(s.getsockname()[1]))

    def stop_all(self) -> None:
        for pod in self.pods:
            pod.stop()
        self.pods.clear()
