"""The operator signs in with an exec credential plugin whose tokens keep expiring.

As an EKS user running ``tidegate operator`` from a laptop or CI does (``aws eks
get-token``): kopf's watches and patches and the operator's own writes all go through the
shared credentials path. Tokens are real ServiceAccount tokens bound to the chart's
ClusterRole, valid (per the plugin) for 4 s each; the test revokes every token once it has
been replaced, so a request that still used an old one would fail with 401.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from credhelpers import ExecUser, exec_kubeconfig, exec_user
from fixtures_kube import ControlPlane
from kubehelpers import OperatorProcess, chart_cluster_role, get, install_crds, ready, wait_for

pytestmark = pytest.mark.kube

NS = "exec-login"
LIFETIME = 4.0


def _policy(name: str, host: str) -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"gatewayRef": {"name": "gw", "namespace": NS}, "allow": [{"host": host}]},
    }


def _more_runs_than(user: ExecUser, runs: int) -> Callable[[], bool | None]:
    return lambda: user.runs() > runs or None


def test_operator_with_expiring_exec_tokens(control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    install_crds(cp)
    cp.ensure_namespace(NS)
    user = exec_user(
        cp,
        tmp_path,
        namespace=NS,
        serviceaccount="laptop",
        count=24,
        rbac=chart_cluster_role(cp, NS),
    )
    kubeconfig = exec_kubeconfig(user, tmp_path / "exec.yaml", lifetime=LIFETIME)
    op = OperatorProcess(
        cp,
        kubeconfig,
        tmp_path / "operator.log",
        "--namespace",
        NS,
        "--default-gateway",
        f"{NS}/gw",
    )
    cp.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": "gw", "namespace": NS},
                "spec": {"replicas": 1, "service": {"type": "ClusterIP"}},
            },
            _policy("first", "first.example.com"),
        ]
    )
    op.start()
    revoked = 0

    def revoke_replaced() -> None:
        nonlocal revoked
        for index in range(revoked, user.runs() - 1):  # every token but the newest
            user.revoke(index)
            revoked = index + 1

    try:
        wait_for(
            "first Ready",
            lambda: ready(get(cp, "egp", "first", NS)).get("reason") == "Accepted" or None,
            op=op,
        )
        for round_ in range(3):
            # Let the current token expire (the operator must move on by itself), then make
            # every token it no longer should use invalid, then ask it to do work.
            wait_for("a fresh token", _more_runs_than(user, user.runs()), op=op)
            revoke_replaced()
            name = f"after-{round_}"
            cp.apply([_policy(name, f"{name}.example.com")])
            wait_for(
                f"{name} Ready",
                lambda name=name: (
                    ready(get(cp, "egp", name, NS)).get("reason") == "Accepted" or None
                ),
                op=op,
            )
        assert op.alive(), op.tail()
        assert user.runs() >= 4, user.runs()
        assert revoked >= 3
        cm = get(cp, "configmap", "gw-bundle", NS)
        assert cm is not None and "after-2.example.com" in cm["data"]["bundle.json"]
    finally:
        op.stop()
    log = op.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    # One log shape with the gateway: kopf's lines too, its object reference as "object".
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    for record in records:
        assert list(record)[:4] == ["time", "level", "logger", "msg"], record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert any(r["logger"].startswith("kopf") for r in records)
    assert any(r.get("object", {}).get("kind") == "EgressGateway" for r in records), log[-2000:]
