"""The README's first command on examples/: a loopback client is the CI runner pod of the
standalone identities file, so ci-runners governs it - deny for gist.github.com through
the real proxy, allow for github.com (judged by ``tidegate check``: no test dials out)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIDEGATE = Path(sys.executable).parent / "tidegate"


def test_readme_first_command_denies_gist_for_the_local_runner(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "access.log"
    proc = subprocess.Popen(
        [
            str(TIDEGATE),
            "gateway",
            "--policies",
            str(EXAMPLES),
            "--listen",
            f"127.0.0.1:{port}",
            "--no-metrics",
            "--access-log",
            str(log),
        ],
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
            sock.sendall(b"CONNECT gist.github.com:443 HTTP/1.1\r\nHost: gist.github.com\r\n\r\n")
            head = sock.recv(4096).decode()
        assert head.startswith("HTTP/1.1 403"), head
        assert "X-Tidegate-Reason: deny_rule" in head, head
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    (line,) = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    assert (line["policy"], line["identity"]) == ("ci/ci-runners", "pod")
    assert (line["client_namespace"], line["client_pod"]) == ("ci", "local-runner")


def test_examples_allow_github_for_the_local_runner_and_nobody_else() -> None:
    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TIDEGATE), "check", "--policies", str(EXAMPLES), *args, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    allowed = check("--client", "127.0.0.1", "github.com:443")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["policy"] == "ci/ci-runners"
    # Another namespace's pod, or an address nobody knows: not governed by ci-runners.
    assert check("--namespace", "web", "github.com:443").returncode == 1
    assert check("--client", "10.0.0.5", "github.com:443").returncode == 1
    # Every pod may use the package mirror (a ClusterEgressPolicy with namespaceSelector {}).
    assert check("--namespace", "web", "pkgs.example.com:443").returncode == 0
    # --pod with an address that is not that pod's: refused, not judged as the pod.
    mixed = check("--pod", "ci/local-runner", "--client", "10.0.0.5", "github.com:443")
    assert mixed.returncode == 2 and "not an address of pod ci/local-runner" in mixed.stderr
    same = check("--pod", "ci/local-runner", "--client", "127.0.0.1", "github.com:443")
    assert same.returncode == 0, same.stderr
