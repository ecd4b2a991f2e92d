"""The container image for the tests that run it (built by hack/image.sh, cached).

Built once per session before the first test that needs it, so a cold build (a few
minutes) is not cut by the per-test timeout. A failed build fails those tests (never a
silent skip); ``TIDEGATE_SKIP_IMAGE=1`` skips them on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from podrunner import SKIP_IMAGE_ENV, Podman, built_image

_podman: Podman | None = None
_error: str | None = None
_workdir: Path | None = None


def _skipped() -> bool:
    return os.environ.get(SKIP_IMAGE_ENV) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _skipped():
        return
    reason = f"{SKIP_IMAGE_ENV}=1: the image tests are disabled"
    for item in items:
        if item.get_closest_marker("image"):
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_finish(session: pytest.Session) -> None:
    global _podman, _error
    if _skipped() or session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("image") for item in session.items):
        return
    factory = session.config._tmp_path_factory  # type: ignore[attr-defined]
    capman = session.config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():
            print("\n[image] hack/image.sh (build or reuse)", flush=True)
            _podman = built_image(factory.mktemp("podman"))
    except RuntimeError as exc:
        _error = str(exc)


@pytest.fixture(scope="session")
def podman_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """podman set up for the image hack/image.sh built for this source tree."""
    global _podman
    if _skipped():
        pytest.skip(f"{SKIP_IMAGE_ENV}=1")
    if _error:
        raise RuntimeError(_error)
    if _podman is None:
        _podman = built_image(tmp_path_factory.mktemp("podman"))
    yield _podman
