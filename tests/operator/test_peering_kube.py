"""Two operator replicas against a real kube-apiserver: kopf peering keeps one active.

Both replicas run as the chart runs them: no ``--standalone``, ``--peering`` naming the
ClusterKopfPeering the chart renders (with the chart's kopf.dev CRDs), a ServiceAccount bound
to the chart's ClusterRole. They differ in ``--priority``; a short ``--peering-lifetime``
keeps the failover part of the test short. Everything lives in a namespace of its own and
the peering object has a name of its own, so the other kube tests are not affected.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fixtures_kube import ControlPlane
from kubehelpers import (
    REPO,
    TIDEGATE,
    OperatorProcess,
    events_for,
    gateway_namespace_args,
    get,
    install_crds,
    operator_kubeconfig,
    ready,
    wait_for,
)

from tidegate.gateway.logshape import MESSAGE

pytestmark = [pytest.mark.timeout(300)]

NS = "tidegate-peering"
GW = "peered"
RELEASE = "peering-test"
PEERING = "tidegate-peering-test"
LIFETIME = 6  # seconds: --peering-lifetime of both replicas
LOW, HIGH = "replica-low", "replica-high"  # kopf peer identities (POD_ID)


class PeeredOperator(OperatorProcess):
    """``tidegate operator`` as the chart starts it (peering on), with a priority."""

    def __init__(
        self, cp: ControlPlane, kubeconfig: Path, log: Path, identity: str, priority: int
    ) -> None:
        super().__init__(cp, kubeconfig, log)
        self.identity = identity
        self.priority = priority

    def start(self) -> None:
        argv = [
            str(TIDEGATE),
            "operator",
            f"--peering={PEERING}",
            f"--priority={self.priority}",
            f"--peering-lifetime={LIFETIME}",
            f"--kubeconfig={self.kubeconfig}",
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
            f"--metrics-listen=127.0.0.1:{self.metrics_port}",
            "--resync-seconds=2",
            *gateway_namespace_args(NS),
        ]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env["POD_ID"] = self.identity  # kopf's peer identity; a pod name in a cluster
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def messages(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [m for r in self.lines() if rx.search(m := str(r.get(MESSAGE, "")))]

    def published(self) -> list[int]:
        """Bundle generations of our gateway this replica wrote (its own log lines)."""
        rx = re.compile(rf"^published bundle {NS}/{GW} generation (\d+) ")
        return [int(m.group(1)) for line in self.messages(rx.pattern) if (m := rx.match(line))]

    def reconciles(self) -> float:
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("tidegate_operator_reconciles_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def chart_peering(cp: ControlPlane) -> list[dict[str, Any]]:
    """The kopf.dev CRDs (from the chart's crds/ folder, as `helm install` applies them) and
    the ClusterKopfPeering exactly as the chart renders them."""
    out = cp.helm(
        "template",
        RELEASE,
        str(REPO / "charts" / "tidegate"),
        "-n",
        NS,
        "--include-crds",
        "--set",
        f"peering.name={PEERING}",
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    crds = [
        d
        for d in docs
        if d["kind"] == "CustomResourceDefinition" and d["spec"]["group"] == "kopf.dev"
    ]
    peerings = [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    assert len(crds) == 2 and len(peerings) == 1, "the chart renders no kopf peering"
    assert peerings[0]["metadata"]["name"] == PEERING
    return crds + peerings


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    install_crds(control_plane)
    control_plane.ensure_namespace(NS)
    rendered = chart_peering(control_plane)
    crds, peering = rendered[:2], rendered[2:]
    control_plane.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(crds)
    )
    for crd in crds:
        name = crd["metadata"]["name"]
        control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    control_plane.apply(peering)
    try:
        yield control_plane
    finally:
        control_plane.kubectl("delete", "clusterkopfpeering", PEERING, "--ignore-not-found")
        control_plane.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=false")


def _peers(cp: ControlPlane) -> dict[str, Any]:
    """The ClusterKopfPeering's status: one entry per live replica (identity: info)."""
    return dict((get(cp, "clusterkopfpeering", PEERING) or {}).get("status") or {})


def _gateway_generation(cp: ControlPlane) -> int:
    gw = get(cp, "egressgateway", GW, NS) or {}
    return int(((gw.get("status") or {}).get("bundle") or {}).get("generation", 0))


def _policy(name: str, host: str) -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"gatewayRef": {"name": GW, "namespace": NS}, "allow": [{"host": host}]},
    }


def _accepted(cp: ControlPlane, name: str) -> Any:
    return lambda: ready(get(cp, "egp", name, NS)).get("reason") == "Accepted" or None


def _events(cp: ControlPlane, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in events_for(cp, NS, name) if e["reason"] == reason]


def _settled(cp: ControlPlane, generation: int, *ops: PeeredOperator, quiet: float = 4) -> None:
    """Wait until the gateway shows ``generation``, then make sure nothing else follows for
    a while (two active replicas would keep going: a second pass, a second generation)."""
    wait_for(f"bundle generation {generation}", lambda: _gateway_generation(cp) >= generation)
    deadline = time.monotonic() + quiet
    while time.monotonic() < deadline:
        assert _gateway_generation(cp) == generation, [op.tail(20) for op in ops]
        time.sleep(0.25)


@pytest.fixture(scope="module")
def replicas(
    cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PeeredOperator, PeeredOperator]]:
    """(low, high): priority 0 and 100, both on the chart's ClusterKopfPeering."""
    kubeconfig = operator_kubeconfig(cluster, NS)
    logs = tmp_path_factory.mktemp("peering")
    low = PeeredOperator(cluster, kubeconfig, logs / "low.log", LOW, 0)
    high = PeeredOperator(cluster, kubeconfig, logs / "high.log", HIGH, 100)
    cluster.apply(
        [
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressGateway",
                "metadata": {"name": GW, "namespace": NS},
                "spec": {"replicas": 1, "service": {"type": "ClusterIP"}},
            },
            _policy("first", "first.example.com"),
        ]
    )
    try:
        yield low, high
    finally:
        for op in (high, low):
            op.stop()


@pytest.mark.kube
def test_lower_priority_replica_pauses_in_favour_of_higher(
    cluster: ControlPlane, replicas: tuple[PeeredOperator, PeeredOperator]
) -> None:
    low, high = replicas
    # The low-priority replica alone: it is active and publishes the first bundle.
    low.start()
    wait_for("low replica active", lambda: low.messages("^Resuming operations"), op=low)
    wait_for("first policy Accepted", _accepted(cluster, "first"), op=low)
    _settled(cluster, 1, low)
    assert low.published() == [1]

    # The high-priority replica joins: the low one pauses in its favour.
    high.start()
    pausing = wait_for(
        "low replica pausing in favour of the high one",
        lambda: low.messages("^Pausing operations in favour of"),
        op=low,
    )
    assert HIGH in pausing[0] and "priority=100" in pausing[0]
    wait_for("high replica active", lambda: high.messages("^Resuming operations"), op=high)
    peers = wait_for(
        "both replicas in the ClusterKopfPeering",
        lambda: s if len(s := _peers(cluster)) == 2 else None,
        op=high,
    )
    assert peers[LOW]["priority"] == 0 and peers[HIGH]["priority"] == 100
    assert peers[LOW]["lifetime"] == peers[HIGH]["lifetime"] == LIFETIME
    assert not high.messages("conflicting operators")
    assert not low.messages("conflicting operators")
    assert not high.messages("^Pausing operations")


@pytest.mark.kube
def test_change_is_reconciled_once_by_the_active_replica(
    cluster: ControlPlane, replicas: tuple[PeeredOperator, PeeredOperator]
) -> None:
    low, high = replicas
    time.sleep(3)  # let the high replica's start-up passes (no content change) finish
    low_reconciles = low.reconciles()
    cluster.apply([_policy("second", "second.example.com")])
    wait_for("second policy Accepted", _accepted(cluster, "second"), op=high)
    _settled(cluster, 2, low, high)
    assert high.published() == [2]
    assert low.published() == [1]
    assert low.reconciles() == low_reconciles, "the paused replica reconciled"
    assert len(_events(cluster, "second", "Accepted")) == 1
    published = _events(cluster, GW, "BundlePublished")
    assert len(published) == 2, published  # generations 1 and 2, once each


@pytest.mark.kube
def test_standby_takes_over_after_sigkill(
    cluster: ControlPlane, replicas: tuple[PeeredOperator, PeeredOperator]
) -> None:
    low, high = replicas
    assert high.alive() and low.alive()
    resumed = len(low.messages("^Resuming operations"))
    # The active replica dies without saying goodbye: the other takes over once the dead
    # peer's keep-alive expires (the peering lifetime), not a minute later.
    killed = time.monotonic()
    high.kill()
    wait_for(
        "low replica resuming",
        lambda: len(low.messages("^Resuming operations")) > resumed,
        timeout=LIFETIME + 10,
        op=low,
    )
    takeover = time.monotonic() - killed
    assert takeover <= LIFETIME + 5, takeover
    wait_for("dead peer cleaned out", lambda: HIGH not in _peers(cluster), op=low)
    assert LOW in _peers(cluster)

    # It reconciles from fresh indexes: whatever the earlier stages left, it settles ...
    wait_for("second policy Accepted", _accepted(cluster, "second"), op=low)
    time.sleep(3)
    generation = _gateway_generation(cluster)
    _settled(cluster, generation, low)
    published_before = len(_events(cluster, GW, "BundlePublished"))
    # ... and a new change is reconciled exactly once: one generation, one Event each.
    cluster.apply([_policy("third", "third.example.com")])
    wait_for("third policy Accepted", _accepted(cluster, "third"), op=low)
    _settled(cluster, generation + 1, low)
    assert low.published()[-1] == generation + 1
    assert generation + 1 not in high.published()
    assert len(_events(cluster, "third", "Accepted")) == 1
    assert len(_events(cluster, GW, "BundlePublished")) == published_before + 1
    cm = get(cluster, "configmap", f"{GW}-bundle", NS)
    assert cm is not None
    bundle = json.loads(cm["data"]["bundle.json"])
    assert "third.example.com" in json.dumps(bundle)


def test_cli_peering_flags() -> None:
    from tidegate.operator.main import _priority, build_parser

    args = build_parser().parse_args([])
    assert (args.priority, args.peering_lifetime, args.verbose) == (None, 60, False)
    # No priority given: replicas draw distinct ones (kopf freezes every peer on a tie).
    drawn = {_priority(None) for _ in range(50)}
    assert len(drawn) > 45 and all(p > 0 for p in drawn)
    assert _priority(7) == 7
    args = build_parser().parse_args(["--priority", "-5", "--peering-lifetime", "6", "-v"])
    assert (args.priority, args.peering_lifetime, args.verbose) == (-5, 6, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--peering-lifetime", "0"])


def test_kopf_handler_chatter_is_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    from tidegate.operator.main import HandlerChatterFilter, quiet_kopf_chatter

    logger = logging.getLogger("kopf.objects")
    quiet_kopf_chatter()
    quiet_kopf_chatter()
    assert sum(isinstance(f, HandlerChatterFilter) for f in logger.filters) == 1
    chatter = [
        "Handler 'policy_changed' succeeded.",
        "Updating is processed: 1 succeeded; 0 failed.",
    ]
    with caplog.at_level(logging.INFO):
        for line in chatter:
            logger.info(line)
        logger.info("Pausing operations in favour of []")
        logger.warning("Handler 'policy_changed' failed temporarily")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "Pausing operations in favour of []"),
        ("WARNING", "Handler 'policy_changed' failed temporarily"),
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # --verbose
        for line in chatter:
            logger.info(line)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", line) for line in chatter
    ]
