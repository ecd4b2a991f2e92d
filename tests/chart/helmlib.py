"""Find a helm binary and render the chart (shared by the chart tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tidegate"


def find_helm() -> str | None:
    """$HELM, the test control plane's helm, or helm on PATH."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    cache = Path(
        os.environ.get("TIDEGATE_CP_CACHE") or Path.home() / ".cache/tidegate/control-plane"
    )
    for candidate in sorted(cache.glob("*/bin/helm"), reverse=True):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("helm")


NO_HELM = (
    "no helm binary: set $HELM, put helm on PATH, or build the test control plane "
    "(hack/control-plane/build.sh puts it under ~/.cache/tidegate/control-plane/*/bin)"
)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = find_helm()
    assert exe, NO_HELM
    env = dict(os.environ)
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "tidegate-chart-tests-helm"
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def template_text(
    *set_args: str, namespace: str = "tidegate-system", extra: tuple[str, ...] = ()
) -> str:
    args = ["template", "tidegate", str(CHART), "-n", namespace, *extra]
    for s in set_args:
        args += ["--set", s]
    return helm(*args).stdout


def render(*set_args: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template_text(*set_args, **kwargs)) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]
