"""bench/*.py are thin entry points into tucker_export.benchmarks: each names a module that exists."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_every_script_is_a_thin_entry_point() -> None:
    assert SCRIPTS, f"no scripts under {BENCH}"
    for script in SCRIPTS:
        text = script.read_text()
        (module,) = re.findall(r"from (tucker_export\.benchmarks\.\w+) import main", text)
        assert len(text.splitlines()) <= 15, f"{script.name} holds logic; it belongs in {module}"
        assert callable(importlib.import_module(module).main)


@pytest.mark.parametrize("script", ["bench_prepost.py", "bench_infer.py"])
def test_an_entry_point_runs(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout
