"""One running pod: its container, volumes, probes and what a kubelet would report."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from .spec import (
    POD_IP,
    RESTART_BACKOFF_MAX,
    STATE_PERIOD,
    STATUS_PERIOD,
    AtomicDir,
    PodStartError,
    Probe,
    ProbeResult,
    probe_port,
)

if TYPE_CHECKING:
    from .runner import PodRunner


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
    probes: list[Probe] = field(default_factory=list)
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
    image: str = ""
    status_lock: threading.Lock = field(default_factory=threading.Lock)

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

    def _probe_once(self, probe: Probe) -> tuple[bool, str]:
        spec = probe.spec
        ports = self.runner.container_ports(self.pod, self.container)
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                scheme = str(get.get("scheme", "HTTP")).lower()
                host = get.get("host") or POD_IP
                url = f"{scheme}://{host}:{probe_port(get['port'], ports)}{get.get('path', '/')}"
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
                port = probe_port(sock["port"], ports)
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
        next_state = 0.0
        next_status = time.monotonic() + STATUS_PERIOD
        while not self._stop.wait(0.2):
            now = time.monotonic()
            try:
                # `podman inspect` is a process start: look at the container every couple
                # of seconds only (the probes notice a dead server sooner anyway).
                status, code = ("running", 0)
                if now >= next_state:
                    next_state = now + STATE_PERIOD
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
                if now >= next_status:
                    next_status = now + STATUS_PERIOD
                    self.runner.report_status(self)
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
