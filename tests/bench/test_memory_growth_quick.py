"""Smoke test of the memory growth benchmark (no thresholds: memory figures vary by machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CASE_KEYS = {"microbatches", "mb_per_100_microbatches", "rss_start_mb", "rss_end_mb"}
MANUAL_GC_KEYS = {"garbage_objects_per_microbatch", "garbage_tensor_mb", "garbage_types"}


@pytest.mark.timeout(240)
def test_memory_growth_quick_prints_json_summary() -> None:
    """`python -m bench.memory_growth --quick` ends with JSON covering all four cases."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.memory_growth", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["settings"]["microbatches"] == 12
    for model in ("distillation", "student"):
        assert set(summary[model]) == {"manual_gc", "automatic_gc"}
        for case in summary[model].values():
            assert CASE_KEYS <= case.keys(), case
            assert case["microbatches"] == 12
        assert MANUAL_GC_KEYS <= summary[model]["manual_gc"].keys()
        assert summary[model]["manual_gc"]["garbage_objects_per_microbatch"] >= 0
