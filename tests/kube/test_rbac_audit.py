"""Least privilege, proven: the operator's RBAC in the chart against what it actually did.

Every test control plane writes an API audit log (tests/fixtures_kube.py: every
ServiceAccount request, Metadata level). This test runs after all the others
(``after_kube``) and reads the logs of the whole session: every request the operator made
with the chart's RBAC - in the operator, guard, audit, peering, end-to-end and helm-install
tests - is compared with the chart's ClusterRole and Roles, rendered by ``helm template``:

- nothing used and denied: no request of the operator got a 403;
- nothing granted and unused: every (verb, resource) of the chart's rules was used, and
  every cluster-wide grant was used where a gateway-namespace Role could not have served it.

The grants are read from the chart, so adding a verb to the chart without a test that
exercises it, or making the operator call something the chart does not grant, turns this
red.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_kube import AUDIT_LOGS, ControlPlane
from kubehelpers import GRANTED_GATEWAY_NAMESPACES, OPERATOR_NAMESPACE, OPERATOR_SA, REPO
from rbacaudit import Grant, Request, compare, grants_of, read_audit_log

pytestmark = [pytest.mark.kube, pytest.mark.after_kube]

#: The operator's identities across the kube tests: the tests' ServiceAccount bound to the
#: chart's RBAC, and the chart's own ServiceAccount (tests/chart/test_helm_install_kube.py).
OPERATOR_USERS = {
    f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}",
    f"system:serviceaccount:{OPERATOR_NAMESPACE}:tidegate",
}


def chart_grants(cp: ControlPlane) -> list[Grant]:
    out = cp.helm(
        "template", "tidegate", str(REPO / "charts" / "tidegate"), "-n", OPERATOR_NAMESPACE
    ).stdout
    return grants_of(d for d in yaml.safe_load_all(out) if d)


def session_requests() -> list[Request]:
    requests: list[Request] = []
    for path in AUDIT_LOGS:
        requests.extend(read_audit_log(Path(path)))
    return requests


def _show(items: list[Any]) -> str:
    return "\n  ".join(sorted({i.describe() if isinstance(i, Grant) else _req(i) for i in items}))


def _req(r: Request) -> str:
    return f"{r.code} {r.verb} {r.group or 'core'}/{r.resource} ns={r.namespace} {r.uri[:120]}"


def test_operator_uses_exactly_what_the_chart_grants(control_plane: ControlPlane) -> None:
    requests = session_requests()
    if not any(r.user in OPERATOR_USERS for r in requests):
        pytest.skip("no operator ran in this session: run it with the operator's kube tests")
    grants = chart_grants(control_plane)
    assert grants, "the chart renders no operator RBAC"
    result = compare(
        requests,
        grants,
        users=OPERATOR_USERS,
        gateway_namespaces=GRANTED_GATEWAY_NAMESPACES | {OPERATOR_NAMESPACE},
    )
    assert not result.denied, "used and denied:\n  " + _show(result.denied)
    assert not result.uncovered, "used but not granted by the chart:\n  " + _show(result.uncovered)
    assert not result.unused, (
        f"granted and unused across {result.requests} operator requests "
        "(trim the chart, or test what needs it):\n  " + _show(result.unused)
    )
