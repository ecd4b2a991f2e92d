#!/usr/bin/env python3
"""Tidegate side by side with squid, tinyproxy and a direct connection, on loopback.

Uses the shared peer-bench harness (prepare it once as its README says), adding tidegate
as a ``--custom`` system that serves a realistic 1,000-policy bundle with policy checks,
the JSON access log (to a file) and metrics all on.

    .venv/bin/python benchmarks/peer_bench.py --peer-bench /path/to/peer-bench \
        [--systems direct,squid] [--tests nt64,bulk1,bulk8,idle] [--reps 3]

Results land in the harness's results/ folder; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realistic import bench_bundle

PORT = 3130


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--peer-bench", type=Path, required=True)
    ap.add_argument("--systems", default="direct,squid,tinyproxy")
    ap.add_argument("--tests", default="nt1,nt64,bulk1,bulk8,idle")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tidegate-bench-"))
    bundle = work / "bundle.json"
    bundle.write_bytes(bench_bundle(a.policies))
    tidegate = Path(sys.executable).parent / "tidegate"
    command = (
        f"{tidegate} gateway --bundle {bundle} --listen 127.0.0.1:{PORT} "
        f"--metrics-listen 127.0.0.1:{PORT + 1} --access-log {work / 'access.log'} "
        f"--log-level warning"
    )
    args = [
        str(a.peer_bench / "venv" / "bin" / "python"),
        str(a.peer_bench / "bench.py"),
        "--systems",
        a.systems,
        "--tests",
        a.tests,
        "--reps",
        str(a.reps),
        "--duration",
        str(a.duration),
        "--custom",
        f"tidegate={PORT}={command}",
    ]
    if a.out:
        args += ["--out", str(a.out)]
    print("bundle:", bundle, f"({bundle.stat().st_size} bytes, {a.policies} policies)")
    print("running:", " ".join(args), flush=True)
    return subprocess.call(args, cwd=a.peer_bench, env={**os.environ})


if __name__ == "__main__":
    sys.exit(main())
