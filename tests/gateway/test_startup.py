"""Start-up failures are one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

TIDEGATE = Path(sys.executable).parent / "tidegate"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_port_in_use_is_reported_and_exits_1() -> None:
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        port_taken, port_free = taken.getsockname()[1], free.getsockname()[1]
        free.close()
        proc = subprocess.run(
            [
                str(TIDEGATE),
                "gateway",
                "--policies",
                str(EXAMPLES),
                "--listen",
                f"127.0.0.1:{port_free}",
                "--metrics-listen",
                f"127.0.0.1:{port_taken}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr and "address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_policy_source_is_a_usage_error() -> None:
    proc = subprocess.run(
        [str(TIDEGATE), "gateway", "--listen", "127.0.0.1:3999"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "--policies DIR, --bundle FILE or --configmap" in proc.stderr
