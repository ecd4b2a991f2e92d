"""Operator scale benchmark on a real kube-apiserver.

Starts the test control plane (etcd + kube-apiserver + controller-manager, see
tests/fixtures_kube.py), installs the CRDs, runs ``tidegate operator`` with the Helm chart's
ClusterRole, creates one EgressGateway and N policies spread over M namespaces, and measures:

* time until every policy is Ready and the gateway's bundle holds all of them;
* the bundle's size;
* the operator's resident memory (peak while converging, and after);
* latency of one policy edit until it is in the published bundle.

Usage: .venv/bin/python benchmarks/operator_scale.py [--policies 1000] [--namespaces 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "operator")]

from fixtures_kube import ensure_binaries, start_control_plane  # noqa: E402
from kubehelpers import OperatorProcess, install_crds, operator_kubeconfig  # noqa: E402

NS = "tidegate-system"


def policy(i: int, namespaces: int) -> dict[str, Any]:
    ns = f"bench-{i % namespaces:03d}"
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": f"team-{i:04d}", "namespace": ns},
        "spec": {
            "mode": "Enforce" if i % 5 else "Audit",
            "sources": {"cidrs": [f"10.{i // 250}.{i % 250}.0/24"]},
            "allow": [
                {"host": f"api-{i}.example.com", "ports": [443]},
                {"host": f"*.cdn-{i}.example.net"},
                {"host": "github.com", "ports": [443, 22]},
                {"host": f"ec2.*.svc-{i % 17}.example.org"},
                {"cidr": f"198.51.{i % 250}.0/24"},
            ],
            "deny": [{"host": f"blocked-{i}.example.com"}],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=100)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tidegate-bench-"))
    cp = start_control_plane(work / "cp", ensure_binaries())
    op: OperatorProcess | None = None
    try:
        install_crds(cp)
        namespaces = [NS] + [f"bench-{n:03d}" for n in range(args.namespaces)]
        cp.apply(
            [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in namespaces]
        )
        op = OperatorProcess(cp, operator_kubeconfig(cp), work / "operator.log")
        op.start()
        cp.kubectl("apply", "-f", str(REPO / "examples" / "standalone" / "gateway.yaml"))
        proc = psutil.Process(op.proc.pid if op.proc else 0)

        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
        time.sleep(3)  # let it start and publish the empty bundle
        idle_rss = proc.memory_info().rss

        docs = yaml.safe_dump_all([policy(i, args.namespaces) for i in range(args.policies)])
        started = time.monotonic()
        cp.kubectl("apply", "-f", "-", input=docs, timeout=600)
        applied = time.monotonic() - started

        bundle_at = ready_at = None
        status: dict[str, Any] = {}
        while time.monotonic() - started < 900:
            gw = json.loads(cp.kubectl("get", "egw", "default", "-n", NS, "-o", "json").stdout)
            status = gw.get("status") or {}
            if bundle_at is None and status.get("policies") == args.policies:
                bundle_at = time.monotonic() - started
            if bundle_at is not None:
                table = cp.kubectl(
                    "get",
                    "egp",
                    "-A",
                    "--no-headers",
                    "-o",
                    "custom-columns=R:.status.conditions[0].status",
                    timeout=120,
                ).stdout.split()
                if table.count("True") == args.policies:
                    ready_at = time.monotonic() - started
                    break
            time.sleep(1)
        converged_rss = proc.memory_info().rss

        # one edit, end to end into the published bundle
        generation = status["bundle"]["generation"]
        t0 = time.monotonic()
        cp.kubectl(
            "patch",
            "egp",
            "team-0001",
            "-n",
            "bench-001",
            "--type=json",
            "-p",
            json.dumps(
                [{"op": "add", "path": "/spec/allow/-", "value": {"host": "new.example.com"}}]
            ),
        )
        while True:
            gw = json.loads(cp.kubectl("get", "egw", "default", "-n", NS, "-o", "json").stdout)
            if gw["status"]["bundle"]["generation"] > generation:
                break
            time.sleep(0.05)
        edit_latency = time.monotonic() - t0
        done.set()

        bundle = gw["status"]["bundle"]
        result = {
            "policies": args.policies,
            "namespaces": args.namespaces,
            "kubectl_apply_seconds": round(applied, 1),
            "all_in_bundle_seconds": round(bundle_at or -1, 1),
            "all_ready_seconds": round(ready_at or -1, 1),
            "bundle_bytes": bundle["bytes"],
            "bundle_compressed": bundle["compressed"],
            "bundle_generation": bundle["generation"],
            "edit_to_bundle_seconds": round(edit_latency, 2),
            "operator_rss_idle_mib": round(idle_rss / 2**20, 1),
            "operator_rss_peak_mib": round(peak[0] / 2**20, 1),
            "operator_rss_after_mib": round(converged_rss / 2**20, 1),
        }
        print(json.dumps(result, indent=2))
        return 0 if ready_at is not None else 1
    finally:
        if op is not None:
            op.stop()
        cp.stop()


if __name__ == "__main__":
    raise SystemExit(main())
