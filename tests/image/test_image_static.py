"""The image's recipe, checked without building it: the lock covers pyproject.toml, every
pin carries hashes, the Dockerfile lints clean and its default base names no registry host.

(``hack/lock.sh --check`` in hack/test.sh re-resolves the lock against the package index;
these checks need no network and fail first when a dependency is added and not locked.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
IMAGE_PYTHON = {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux"}


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from requirements.lock (pip's hash-checking format)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line:
            continue
        if line.startswith("--hash="):
            assert current, f"hash before any pin: {raw}"
            pins[current][1].append(line.removeprefix("--hash="))
            continue
        assert not line.startswith("-"), f"the lock carries an option: {raw}"
        req = Requirement(line)
        assert len(req.specifier) == 1 and str(req.specifier).startswith("=="), raw
        current = canonicalize_name(req.name)
        pins[current] = (str(req.specifier).removeprefix("=="), [])
    return pins


def image_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["operator"]]
    build = (ROOT / "hack" / "image-build.in").read_text().splitlines()
    names += [b for b in (line.split("#", 1)[0].strip() for line in build) if b]
    return [Requirement(n) for n in names]


def test_every_image_requirement_is_locked_at_an_allowed_version() -> None:
    pins = locked()
    for req in image_requirements():
        if req.marker and not req.marker.evaluate(IMAGE_PYTHON):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock: run bash hack/lock.sh"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, pyproject.toml wants {req}: "
            "run bash hack/lock.sh"
        )


def test_every_pin_has_sha256_hashes_and_no_index_is_named() -> None:
    pins = locked()
    assert len(pins) >= 10
    for name, (_, hashes) in pins.items():
        assert hashes, f"{name} has no hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    text = LOCK.read_text()
    assert "index-url" not in text and "://" not in text


def test_dockerfile_default_base_names_no_registry_host() -> None:
    text = DOCKERFILE.read_text()
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert match, "the base image must be a build argument"
    first = match.group(1).split("/", 1)[0]
    assert "/" not in match.group(1) or not re.search(r"[.:]|^localhost$", first), match.group(1)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert "--require-hashes" in text and "requirements.lock" in text
    # The runtime user has a passwd entry (kopf's peer identity calls getpass.getuser()).
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert "tidegate:x:65532:65532:" in text and "tidegate:x:65532:" in text


@pytest.mark.skipif(
    not HADOLINT.exists() and not shutil.which("hadolint"),
    reason="hadolint is installed by pip install -e '.[test]' on linux x86_64 only",
)
def test_hadolint_is_clean() -> None:
    exe = str(HADOLINT) if HADOLINT.exists() else str(shutil.which("hadolint"))
    proc = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
