"""The kubelet's rules the pod runner follows, as pure functions and small classes: the
``..data`` volume layout and its atomic swap, ConfigMap/Secret key projection, ``$(VAR)``
expansion, fieldRef values, probe settings."""

from __future__ import annotations

import base64
import contextlib
import datetime
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NODE_NAME = "podrunner"
POD_IP = "127.0.0.1"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Token lifetime asked for; refreshed at 80 % of it, as the kubelet does.
TOKEN_SECONDS = 3607
DEFAULT_MODE = 0o644
RESTART_BACKOFF_MAX = 5.0
#: Seconds between looks at the container's state (each look is a podman process).
STATE_PERIOD = 2.0
#: Seconds between status reports of an unchanged pod (the kubelet's status manager
#: re-syncs too); a change is reported at once.
STATUS_PERIOD = 10.0


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


def decoded(obj: Mapping[str, Any], *, secret: bool) -> dict[str, bytes]:
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
    data = decoded(obj, secret=secret)
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
class Probe:
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


def probe_port(value: Any, ports: Mapping[str, int]) -> int:
    if isinstance(value, int):
        return value
    if str(value).isdigit():
        return int(value)
    if value not in ports:
        raise PodStartError(f"probe names port {value!r}, which the container does not declare")
    return ports[value]
