"""``tidegate --version`` prints the version pip recorded for the installed distribution.

Support scripts and the image smoke test call it, so it must come from package metadata
(never a second hard-coded number) and must not need the operator's dependencies.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

TIDEGATE = Path(sys.executable).parent / "tidegate"


def test_version_flag_prints_the_installed_distribution_version() -> None:
    expected = version("tidegate")
    for flag in ("--version", "-V"):
        proc = subprocess.run(
            [str(TIDEGATE), flag], capture_output=True, text=True, timeout=30, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"tidegate {expected}"


def test_version_does_not_import_the_operator() -> None:
    code = (
        "import sys\n"
        "from tidegate.cli import main\n"
        "rc = main(['--version'])\n"
        "assert 'kopf' not in sys.modules, 'kopf imported'\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tidegate {version('tidegate')}"
