"""A stand-in for the kubelet, for the tests only: runs one pod of a Deployment read back
from the real kube-apiserver as podman containers, the way a kubelet would run it.

Why: the chart's operator Deployment and the gateway Deployment the operator renders are
what a user's ``helm install`` meets first; checking them as text proves nothing about the
image, the user it runs as, its read-only root, its mounts or its probes. No kubelet, CNI
or container registry can run on the test machines, but podman can.

What is real: the image (hack/image.sh), the Deployment and its ReplicaSet's Pod objects
(the controller manager creates them; we bind one to a node and report its status like a
kubelet), the ServiceAccount token (TokenRequest API, bound to the Pod) and the cluster CA
at /var/run/secrets/kubernetes.io/serviceaccount, ConfigMap/Secret volumes in the
kubelet's ``..data`` symlink layout, updated from the API by the same atomic swap, env
(values, fieldRef, configMapKeyRef/secretKeyRef, envFrom, ``$(VAR)`` expansion), command
and args, the security context (user and groups, fsGroup, read-only root, dropped
capabilities, no-new-privileges, runAsNonRoot refused for root), and readiness, liveness
and startup probes polled from the node side as the kubelet does, a liveness failure
restarting the container.

``podman kube play`` does the container part (image, command/args, env, user/groups,
read-only root, capabilities, volumes as host paths, host network): we hand it a Pod
manifest in which everything it lacks is already resolved. We write only what it lacks:
picking and reporting the Pod object, the token projection, live ConfigMap swaps, env
sources from the API, and the probes (kube play would turn an httpGet probe into a curl
run inside the image, which has no curl).

What it leaves untested (named so no one mistakes it for a kubelet):
  * pod networking: host network on loopback. The pod IP is 127.0.0.1, every container
    port is a host port (so one replica per Deployment at a time), and
    KUBERNETES_SERVICE_HOST/PORT point at the API server's loopback address;
  * scheduling, resource requests/limits (no cgroup limits), eviction, image pulls (a
    missing image is ErrImageNeverPull), service links, cluster DNS (the host's resolver),
    seccomp profiles other than podman's default, lifecycle hooks, init containers;
  * restart back-off is short (a few seconds), not the kubelet's five minutes.
The sandbox cannot raise rlimits, so containers get nofile/nproc 4096 (podman's default
would try to raise them), and podman uses runc (crun fails on this machine's cgroups).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from fixtures_kube import ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SCRIPT = REPO_ROOT / "hack" / "image.sh"
SKIP_IMAGE_ENV = "TIDEGATE_SKIP_IMAGE"

NODE_NAME = "podrunner"
POD_IP = "127.0.0.1"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
ULIMITS = ("nofile=4096:4096", "nproc=4096:4096")
#: Token lifetime asked for; refreshed at 80 % of it, as the kubelet does.
TOKEN_SECONDS = 3607
DEFAULT_MODE = 0o644
RESTART_BACKOFF_MAX = 5.0


#: The volume the ServiceAccount admission plugin adds to every pod (kube-api-access-*).
SERVICE_ACCOUNT_VOLUME: dict[str, Any] = {
    "defaultMode": DEFAULT_MODE,
    "sources": [
        {"serviceAccountToken": {"expirationSeconds": TOKEN_SECONDS, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {
            "downwardAPI": {
                "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
            }
        },
    ],
}


class PodStartError(RuntimeError):
    """The pod cannot be started as given (what a kubelet reports as a pod event)."""


# --------------------------------------------------------------------------- podman


@dataclass(frozen=True)
class Podman:
    """podman on the image store of hack/image.sh, with runc and the sandbox's ulimits."""

    image: str
    version: str
    root: str
    runroot: str
    tmpdir: str
    runtime: str
    conf: Path

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            self.root,
            "--runroot",
            self.runroot,
            "--tmpdir",
            self.tmpdir,
            "--runtime",
            self.runtime,
            *args,
        ]

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, CONTAINERS_CONF=str(self.conf))
        proc = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc


def built_image(workdir: Path) -> Podman:
    """Build (or reuse) the image with hack/image.sh and return podman set up for it."""
    proc = subprocess.run(
        ["bash", str(IMAGE_SCRIPT), "--print-env"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{IMAGE_SCRIPT} failed (exit {proc.returncode}); set {SKIP_IMAGE_ENV}=1 to skip "
            f"the image tests on purpose.\n{proc.stderr[-4000:]}"
        )
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "containers.conf"
    limits = ", ".join(f'"{u}"' for u in ULIMITS)
    conf.write_text(f"[containers]\ndefault_ulimits = [{limits}]\n")
    return Podman(
        image=env["TIDEGATE_IMAGE"],
        version=env["TIDEGATE_IMAGE_VERSION"],
        root=env["TIDEGATE_PODMAN_ROOT"],
        runroot=env["TIDEGATE_PODMAN_RUNROOT"],
        tmpdir=env["TIDEGATE_PODMAN_TMPDIR"],
        runtime=env["TIDEGATE_PODMAN_RUNTIME"],
        conf=conf,
    )


# --------------------------------------------------------------------------- volumes


class AtomicDir:
    """A volume folder in the kubelet's AtomicWriter layout.

    ``..2026_12_02_14_00_00.123456/`` holds the files, ``..data`` links to it, and each
    top-level name links into ``..data/``. An update writes a new timestamped folder, points
    ``..data_tmp`` at it and renames that over ``..data`` (one atomic rename), then fixes
    the top-level links and removes the old folder - so a reader sees either the old or the
    new content, never a mix, and a watcher of the file sees its inode change.
    """

    def __init__(self, path: Path, *, gid: int | None = None, owner: int | None = None) -> None:
        self.path = path
        self.gid = gid
        self.owner = owner
        self.current: dict[str, tuple[bytes, int]] | None = None
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        self.swaps = 0

    def write(self, files: Mapping[str, tuple[bytes, int]]) -> bool:
        """Project ``{relative path: (content, mode)}``; False if nothing changed."""
        files = dict(files)
        if files == self.current:
            return False
        stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
        new = Path(tempfile.mkdtemp(prefix=stamp, dir=self.path))
        new.chmod(0o755)
        for rel, (content, mode) in files.items():
            target = new / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(mode)
            if self.owner is not None or self.gid is not None:
                os.chown(target, self.owner if self.owner is not None else 0, self.gid or 0)
        data = self.path / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.path / "..data_tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(new.name)
        os.rename(tmp, data)
        tops = {rel.split("/", 1)[0] for rel in files}
        for top in tops:
            link = self.path / top
            if not link.is_symlink():
                link.symlink_to(f"..data/{top}")
        previous = {rel.split("/", 1)[0] for rel in (self.current or {})}
        for gone in previous - tops:
            with contextlib.suppress(FileNotFoundError):
                (self.path / gone).unlink()
        if old:
            shutil.rmtree(self.path / old, ignore_errors=True)
        self.current = files
        self.swaps += 1
        return True


def _decoded(obj: Mapping[str, Any], *, secret: bool) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if secret:
        for key, value in (obj.get("data") or {}).items():
            out[key] = base64.b64decode(value)
        for key, value in (obj.get("stringData") or {}).items():
            out[key] = str(value).encode()
        return out
    for key, value in (obj.get("data") or {}).items():
        out[key] = str(value).encode()
    for key, value in (obj.get("binaryData") or {}).items():
        out[key] = base64.b64decode(value)
    return out


def project_keys(
    obj: Mapping[str, Any] | None, source: Mapping[str, Any], *, secret: bool, what: str
) -> dict[str, tuple[bytes, int]]:
    """The files a configMap/secret volume source shows for ``obj`` (None: not found)."""
    optional = bool(source.get("optional", False))
    mode = int(source.get("defaultMode", DEFAULT_MODE))
    if obj is None:
        if optional:
            return {}
        raise PodStartError(f"{what} not found (the volume is not optional)")
    data = _decoded(obj, secret=secret)
    items = source.get("items")
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    out: dict[str, tuple[bytes, int]] = {}
    for item in items:
        key = item["key"]
        if key not in data:
            if optional:
                continue
            raise PodStartError(f"{what} has no key {key!r}")
        out[item["path"]] = (data[key], int(item.get("mode", mode)))
    return out


# --------------------------------------------------------------------------- env

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: known names replaced, ``$$`` escapes, unknown
    references kept as written."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(sub, text)


_FIELD_INDEX = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
    }
    if path in simple:
        return str(simple[path])
    indexed = _FIELD_INDEX.match(path)
    if indexed:
        return str((meta.get(indexed.group(1)) or {}).get(indexed.group(2), ""))
    raise PodStartError(f"fieldRef {path!r} is not supported by the pod runner")


# --------------------------------------------------------------------------- probes


@dataclass
class ProbeResult:
    at: float
    kind: str
    ok: bool
    detail: str


@dataclass
class _Probe:
    kind: str  # readiness | liveness | startup
    spec: Mapping[str, Any]
    next_at: float
    successes: int = 0
    failures: int = 0

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds", 1))

    @property
    def failure_threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))

    @property
    def success_threshold(self) -> int:
        return int(self.spec.get("successThreshold", 1))


def _port(value: Any, ports: Mapping[str, int]) -> int:
    if isinstance(value, int):
        return value
    if str(value).isdigit():
        return int(value)
    if value not in ports:
        raise PodStartError(f"probe names port {value!r}, which the container does not declare")
    return ports[value]


# --------------------------------------------------------------------------- the pod


@dataclass
class RunningPod:
    """One pod run by :class:`PodRunner`; its state is what a kubelet would report."""

    runner: PodRunner
    namespace: str
    name: str
    uid: str
    pod_object: bool  # a real Pod object from the ReplicaSet (else a synthesized name)
    pod: dict[str, Any]  # the Pod as the runner sees it (template spec + identity)
    podman_name: str
    container: str
    workdir: Path
    api_reachable: bool
    volumes: dict[str, tuple[AtomicDir, Callable[[], dict[str, tuple[bytes, int]]]]] = field(
        default_factory=dict
    )
    probes: list[_Probe] = field(default_factory=list)
    probe_log: list[ProbeResult] = field(default_factory=list)
    ready: bool = False
    started: bool = False
    restarts: int = 0
    events: list[str] = field(default_factory=list)
    #: Projected tokens by "audience/seconds": (issued at, token).
    tokens: dict[str, tuple[float, bytes]] = field(default_factory=dict)
    #: Seconds between volume syncs from the API; None: never (a kubelet that is slow).
    volume_sync: float | None = 1.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ----- inspection

    @property
    def container_name(self) -> str:
        return f"{self.podman_name}-{self.container}"

    def state(self) -> tuple[str, int]:
        proc = self.runner.podman.run(
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            self.container_name,
            check=False,
        )
        if proc.returncode != 0:
            return ("missing", -1)
        status, _, code = proc.stdout.strip().partition(" ")
        return (status, int(code or 0))

    def logs(self, tail: int = 60) -> str:
        proc = self.runner.podman.run("logs", "--tail", str(tail), self.container_name, check=False)
        return proc.stdout + proc.stderr

    def report(self) -> str:
        """What ``kubectl describe pod`` would say, for assertion messages."""
        status, code = self.state()
        probes = "\n".join(
            f"  {r.kind:9} {'ok ' if r.ok else 'FAIL'} {r.detail}" for r in self.probe_log[-12:]
        )
        return (
            f"pod {self.namespace}/{self.name} (podman {self.container_name}): "
            f"container {status} (exit {code}), ready={self.ready}, restarts={self.restarts}\n"
            f"events:\n  " + "\n  ".join(self.events[-12:]) + f"\nprobes:\n{probes}\n"
            f"logs:\n{self.logs()}"
        )

    def inspect(self) -> dict[str, Any]:
        out = self.runner.podman.run("inspect", self.container_name).stdout
        result: dict[str, Any] = json.loads(out)[0]
        return result

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.runner.podman.run(
            "exec", self.container_name, *argv, check=False, timeout=timeout
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready:
                return
            time.sleep(0.2)
        raise AssertionError(f"not ready after {timeout} s\n{self.report()}")

    def event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")

    # ----- the kubelet loop

    def sync_volumes(self) -> None:
        for name, (directory, source) in self.volumes.items():
            try:
                if directory.write(source()):
                    self.event(f"volume {name}: projected (swap {directory.swaps})")
            except (PodStartError, RuntimeError) as exc:
                self.event(f"volume {name}: {exc}")

    def _probe_once(self, probe: _Probe) -> tuple[bool, str]:
        spec = probe.spec
        ports = self.runner.container_ports(self.pod, self.container)
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                scheme = str(get.get("scheme", "HTTP")).lower()
                host = get.get("host") or POD_IP
                url = f"{scheme}://{host}:{_port(get['port'], ports)}{get.get('path', '/')}"
                request = urllib.request.Request(url)
                for header in get.get("httpHeaders") or []:
                    request.add_header(header["name"], header["value"])
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    with opener.open(request, timeout=probe.timeout) as resp:
                        code = int(resp.status)
                except urllib.error.HTTPError as exc:
                    code = int(exc.code)
                return (200 <= code < 400, f"GET {url} -> {code}")
            if "tcpSocket" in spec:
                sock = spec["tcpSocket"]
                port = _port(sock["port"], ports)
                with socket.create_connection(
                    (sock.get("host") or POD_IP, port), timeout=probe.timeout
                ):
                    return (True, f"tcp {port} open")
            if "exec" in spec:
                proc = self.exec(*spec["exec"]["command"], timeout=max(probe.timeout, 1))
                return (proc.returncode == 0, f"exec -> {proc.returncode}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            return (False, f"{type(exc).__name__}: {exc}")
        raise PodStartError(f"{probe.kind} probe kind not supported: {sorted(spec)}")

    def _run_probes(self, now: float) -> None:
        startup = [p for p in self.probes if p.kind == "startup"]
        if startup and not self.started:
            candidates = startup
        else:
            self.started = True
            candidates = [p for p in self.probes if p.kind != "startup"]
        for probe in candidates:
            if now < probe.next_at:
                continue
            probe.next_at = now + probe.period
            ok, detail = self._probe_once(probe)
            self.probe_log.append(ProbeResult(time.time(), probe.kind, ok, detail))
            if ok:
                probe.successes += 1
                probe.failures = 0
            else:
                probe.failures += 1
                probe.successes = 0
            if probe.kind == "startup":
                if probe.successes >= probe.success_threshold:
                    self.started = True
                    self.event("startup probe succeeded")
                elif probe.failures >= probe.failure_threshold:
                    self.restart(f"startup probe failed: {detail}")
            elif probe.kind == "readiness":
                if ok and probe.successes >= probe.success_threshold and not self.ready:
                    self._set_ready(True, detail)
                elif not ok and probe.failures >= probe.failure_threshold and self.ready:
                    self._set_ready(False, detail)
            elif probe.kind == "liveness" and probe.failures >= probe.failure_threshold:
                self.restart(f"liveness probe failed: {detail}")

    def _set_ready(self, ready: bool, why: str) -> None:
        self.ready = ready
        self.event(f"{'Ready' if ready else 'NotReady'}: {why}")
        self.runner.report_status(self)

    def restart(self, why: str) -> None:
        """Kill and start the container again (the kubelet's restart for restartPolicy
        Always), re-arming the probes."""
        self.event(f"restarting: {why}")
        grace = str(int(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
        self.runner.podman.run("stop", "-t", grace, self.container_name, check=False, timeout=90)
        self.restarts += 1
        if self.ready:
            self._set_ready(False, why)
        self.runner.podman.run("start", self.container_name, check=False)
        self._arm_probes()
        self.runner.report_status(self)

    def _arm_probes(self) -> None:
        now = time.monotonic()
        self.started = False
        for probe in self.probes:
            probe.next_at = now + float(probe.spec.get("initialDelaySeconds", 0))
            probe.successes = probe.failures = 0

    def _loop(self) -> None:
        sync_period = self.volume_sync
        next_sync = time.monotonic() + (sync_period or 0)
        backoff = 1.0
        while not self._stop.wait(0.2):
            now = time.monotonic()
            try:
                status, code = self.state()
                if status in ("exited", "stopped"):
                    if self.ready:
                        self._set_ready(False, f"container exited ({code})")
                    self.event(f"container exited ({code}); back-off {backoff:.0f} s")
                    if self._stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
                    self.restarts += 1
                    self.runner.podman.run("start", self.container_name, check=False)
                    self._arm_probes()
                    continue
                if sync_period is not None and now >= next_sync:
                    next_sync = now + sync_period
                    self.sync_volumes()  # ConfigMaps, Secrets, the token when due
                self._run_probes(now)
            except Exception as exc:  # a stand-in must keep going and say what happened
                self.event(f"pod runner error: {type(exc).__name__}: {exc}")

    def start(self) -> None:
        self._arm_probes()
        if not any(p.kind == "readiness" for p in self.probes):
            self.ready = True  # no readiness probe: ready once running, as in Kubernetes
        self._thread = threading.Thread(target=self._loop, name=f"pod-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        grace = str(int(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
        self.runner.podman.run("pod", "stop", "-t", grace, self.podman_name, check=False)
        self.runner.podman.run("pod", "rm", "-f", self.podman_name, check=False)
        self.ready = False
        if self.pod_object:
            # Gone from the node, gone from the API (the kubelet's final status): the
            # ReplicaSet creates a replacement Pending pod, as on a real cluster.
            with contextlib.suppress(requests.RequestException):
                self.runner.session.delete(
                    self.runner.cp.server + f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
                    params={"gracePeriodSeconds": "0"},
                    timeout=10,
                )


# --------------------------------------------------------------------------- the runner


class PodRunner:
    """Runs pods of Deployments on this machine (see the module docstring)."""

    def __init__(self, cp: ControlPlane, podman: Podman, workdir: Path) -> None:
        self.cp = cp
        self.podman = podman
        self.workdir = workdir
        self._local = threading.local()
        self.pods: list[RunningPod] = []
        workdir.mkdir(parents=True, exist_ok=True)

    # ----- API

    @property
    def session(self) -> requests.Session:
        """One admin session per thread (each pod's loop runs in its own thread)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self.cp.session()
        return session

    def _url(self, path: str) -> str:
        return f"{self.cp.server}{path}"

    def get(self, path: str) -> dict[str, Any] | None:
        resp = self.session.get(self._url(path), timeout=10)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def _configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def _secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def _claim_pod(self, deployment: Mapping[str, Any], timeout: float) -> dict[str, Any] | None:
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
                    self._url(f"/apis/apps/v1/namespaces/{ns}/replicasets"),
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
                self._url(f"/api/v1/namespaces/{ns}/pods"),
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
                        self._url(
                            f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/binding"
                        ),
                        json=binding,
                        timeout=10,
                    )
                    if resp.status_code == 201:
                        return self.get(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
            time.sleep(0.3)
        raise PodStartError(f"no Pending pod of deployment {ns}/{meta['name']} in {timeout} s")

    def report_status(self, pod: RunningPod) -> None:
        """Patch the Pod object's status like a kubelet (phase, IPs, conditions)."""
        if not pod.pod_object:
            return
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
                    "image": self.podman.image,
                    "imageID": "",
                    "ready": pod.ready,
                    "started": pod.started,
                    "restartCount": pod.restarts,
                    "state": {"running": {"startedAt": now}},
                }
            ],
        }
        with contextlib.suppress(Exception):
            self.session.patch(
                self._url(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status"),
                data=json.dumps({"status": status}),
                headers={"Content-Type": "application/merge-patch+json"},
                timeout=10,
            )

    def _token(
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
            self._url(f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token"),
            json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            timeout=10,
        )
        if resp.status_code != 201:
            raise PodStartError(
                f"TokenRequest for {namespace}/{sa}: {resp.status_code} {resp.text}"
            )
        return str(resp.json()["status"]["token"]).encode()

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
                        token = self._token(
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
                    obj = (self._secret if secret else self._configmap)(namespace, ref["name"])
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
            obj = (self._secret if secret else self._configmap)(ns, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise PodStartError(f"envFrom {ref['name']} not found")
            for key, value in _decoded(obj, secret=secret).items():
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
                obj = (self._secret if secret else self._configmap)(ns, ref["name"])
                data = _decoded(obj, secret=secret) if obj else {}
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
        claimed = self._claim_pod(deployment, claim_timeout)
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
                    obj = (self._secret if secret else self._configmap)(namespace, ref)
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
                running.probes.append(_Probe(kind=kind, spec=chosen[key], next_at=0))

        running.event(f"Scheduled to {NODE_NAME}" if claimed else "no Pod object (no controller)")
        self.podman.run("kube", "play", str(workdir / "play.yaml"), timeout=180)
        running.event(f"Started container {chosen['name']} ({image})")
        self.pods.append(running)
        running.start()
        self.report_status(running)
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
