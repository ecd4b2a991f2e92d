"""The rendered chart against a real apiserver: `kubectl apply --dry-run=server`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helmlib import NO_HELM, find_helm, template_text

pytestmark = [pytest.mark.kube, pytest.mark.skipif(find_helm() is None, reason=NO_HELM)]

ROOT = Path(__file__).resolve().parents[2]


def test_chart_dry_run_server(control_plane: Any) -> None:
    ns = "tidegate-system"
    control_plane.ensure_namespace(ns)
    # CRDs first, for real: kopf's from the chart's crds/ folder as `helm install` does,
    # ours from crds/ (the chart renders the same ones, checked by the dry run below).
    folders = (ROOT / "charts" / "tidegate" / "crds", ROOT / "crds")
    for path in sorted(p for folder in folders for p in folder.glob("*.yaml")):
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/egressgateways.tidegate.io",
        "crd/clusterkopfpeerings.kopf.dev",
    )
    text = template_text("defaultGateway.spec.mode=Audit")
    proc = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=text)
    assert "deployment.apps/tidegate-operator" in proc.stdout
    assert "configmap/tidegate-default-gateway" in proc.stdout
    assert "customresourcedefinition.apiextensions.k8s.io/egressgateways.tidegate.io" in proc.stdout
