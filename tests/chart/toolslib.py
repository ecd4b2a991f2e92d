"""The chart-checking tools (kubeconform, promtool), built by hack/tools/build.sh.

They are looked up where that script caches them, at the versions it pins. A missing tool
fails the test that needs it, naming the command that builds it: hack/test.sh builds both
before pytest runs, so in CI a missing tool is a broken build, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ROOT / "hack" / "tools" / "versions.env"


def pinned() -> dict[str, str]:
    out = {}
    for line in VERSIONS.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def _cache() -> Path:
    return Path(os.environ.get("TIDEGATE_TOOLS_CACHE") or Path.home() / ".cache/tidegate/tools")


def monitoring_crds() -> list[Path]:
    """The Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs."""
    folder = _cache() / f"monitoring-crds-{pinned()['MONITORING_APIS_VERSION']}" / "crds"
    wanted = ("servicemonitors", "podmonitors", "prometheusrules")
    found = [folder / f"monitoring.coreos.com_{name}.yaml" for name in wanted]
    missing = [p for p in found if not p.is_file()]
    assert not missing, f"no {missing}: run `bash hack/tools/build.sh monitoring-crds`"
    return found


def tool(name: str) -> str:
    """Path of ``name`` (kubeconform or promtool); AssertionError when it is not built."""
    if name == "promtool":  # unpacked from Debian's prometheus package by build.sh
        version = "from Debian's prometheus package"
        candidate = _cache() / "promtool-debian" / "bin" / name
    else:
        version = pinned()["KUBECONFORM_VERSION"]
        candidate = _cache() / f"{name}-{version}" / "bin" / name
    if os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    assert found, f"no {name} {version}: run `bash hack/tools/build.sh {name}` (hack/test.sh does)"
    return found
