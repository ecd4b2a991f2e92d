"""The soak benchmark's short mode (60 s of mixed traffic, benchmarks/soak.py): no growth
of file descriptors, tasks or memory beyond noise, every connection drained, and no 5xx
its scenario does not explain."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tidegate_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_short_mode() -> None:
    soak = load_soak()
    report = soak.run(duration=60.0)
    summary = json.dumps(report, indent=1)
    assert report["requests"] > 200, summary
    assert all(report["by_scenario"].get(kind, 0) > 0 for kind in set(soak.MIX)), summary
    assert report["policy_reloads"] >= 10, summary
    assert report["unexplained_5xx"] == [], summary
    assert report["ok"], summary
