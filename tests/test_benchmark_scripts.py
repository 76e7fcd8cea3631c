"""The benchmark scripts stay runnable: each one imports what it uses and parses its arguments."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


def test_there_are_benchmark_scripts():
    assert {"vil_kernels.py", "medical_scan_order.py", "ranking_vs_training.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(script):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage" in res.stdout.lower()
