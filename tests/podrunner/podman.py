"""podman on the image store that hack/image.sh built, with runc and the sandbox's ulimits."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SCRIPT = REPO_ROOT / "hack" / "image.sh"
SKIP_IMAGE_ENV = "TIDEGATE_SKIP_IMAGE"
#: The sandbox cannot raise rlimits: every container gets these.
ULIMITS = ("nofile=4096:4096", "nproc=4096:4096")


@dataclass(frozen=True)
class Podman:
    """podman on the image store of hack/image.sh, with runc and the sandbox's ulimits."""

    image: str
    version: str
    root: str
    runroot: str
    tmpdir: str
    runtime: str
    conf: Path

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            self.root,
            "--runroot",
            self.runroot,
            "--tmpdir",
            self.tmpdir,
            "--runtime",
            self.runtime,
            *args,
        ]

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, CONTAINERS_CONF=str(self.conf))
        proc = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc


def built_image(workdir: Path) -> Podman:
    """Build (or reuse) the image with hack/image.sh and return podman set up for it."""
    proc = subprocess.run(
        ["bash", str(IMAGE_SCRIPT), "--print-env"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{IMAGE_SCRIPT} failed (exit {proc.returncode}); set {SKIP_IMAGE_ENV}=1 to skip "
            f"the image tests on purpose.\n{proc.stderr[-4000:]}"
        )
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "containers.conf"
    limits = ", ".join(f'"{u}"' for u in ULIMITS)
    conf.write_text(f"[containers]\ndefault_ulimits = [{limits}]\n")
    return Podman(
        image=env["TIDEGATE_IMAGE"],
        version=env["TIDEGATE_IMAGE_VERSION"],
        root=env["TIDEGATE_PODMAN_ROOT"],
        runroot=env["TIDEGATE_PODMAN_RUNROOT"],
        tmpdir=env["TIDEGATE_PODMAN_TMPDIR"],
        runtime=env["TIDEGATE_PODMAN_RUNTIME"],
        conf=conf,
    )
