"""Start-up failures are one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import datetime
import json
import re
import signal
import socket
import subprocess
import sys
import time
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


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TIDEGATE), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _one_error_line(stderr: str) -> dict[str, object]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    record = json.loads(lines[0])
    assert record["level"] == "error"
    return dict(record)


def test_missing_policies_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = _run("gateway", "--policies", str(tmp_path / "does-not-exist"), "--no-metrics")
    assert proc.returncode == 2
    record = _one_error_line(proc.stderr)
    assert "does-not-exist: no such directory" in str(record["msg"])


def test_policies_path_that_is_a_file_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("kind: EgressPolicy\n")
    proc = _run("gateway", "--policies", str(path), "--no-metrics")
    assert proc.returncode == 2
    assert "not a directory" in str(_one_error_line(proc.stderr)["msg"])


def test_missing_bundle_is_exit_2_unless_a_configmap_can_supply_it(tmp_path: Path) -> None:
    proc = _run("gateway", "--bundle", str(tmp_path / "bundle.json"), "--no-metrics")
    assert proc.returncode == 2
    assert "bundle.json: no such file" in str(_one_error_line(proc.stderr)["msg"])


def test_a_wrong_flag_prints_the_subcommands_usage() -> None:
    proc = _run("gateway", "--policy", "examples/")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: tidegate gateway"), proc.stderr
    assert "unrecognized arguments: --policy" in proc.stderr
    proc = _run("check", "--client", "10.0.0.1", "--bogus", "a:1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: tidegate check"), proc.stderr
    proc = _run("operator", "--bogus")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: tidegate operator"), proc.stderr


ISO_UTC_MILLIS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_gateway_and_access_lines_share_one_json_shape(tmp_path: Path) -> None:
    """Logs (stderr) and access lines (stdout): time, level, logger, msg first, ISO time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = datetime.datetime.now(datetime.UTC)
    proc = subprocess.Popen(
        [
            str(TIDEGATE),
            "gateway",
            "--policies",
            str(EXAMPLES),
            "--listen",
            f"127.0.0.1:{port}",
            "--no-metrics",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with sock:
            sock.sendall(b"CONNECT gist.github.com:443 HTTP/1.1\r\n\r\n")
            assert b" 403 " in sock.recv(4096)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in (out + err).splitlines() if line.strip()]
    access = [r for r in lines if r["logger"] == "tidegate.access"]
    assert len(access) == 1 and access[0]["host"] == "gist.github.com"
    assert access[0]["msg"] == "access" and access[0]["decision"] == "deny"
    assert any(r["logger"].startswith("tidegate.gateway") for r in lines)
    for record in lines:
        assert list(record)[:4] == ["time", "level", "logger", "msg"], record
        assert ISO_UTC_MILLIS.fullmatch(record["time"]), record
        when = datetime.datetime.fromisoformat(record["time"])
        assert started - datetime.timedelta(seconds=1) <= when
        assert when <= datetime.datetime.now(datetime.UTC)
