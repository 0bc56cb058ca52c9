"""Smoke test of the logits KD loss benchmark (no thresholds: timings vary by machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CASE_KEYS = {"ours_peak_mb", "reference_peak_mb", "memory_ratio", "time_ratio", "max_abs_diff"}


@pytest.mark.multirank
@pytest.mark.timeout(240)
def test_kd_loss_quick_prints_json_summary() -> None:
    """`python -m bench.kd_loss --quick` ends with JSON covering every case, losses matching."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.kd_loss", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["machine"]["cpu_count"] >= 1
    cases = summary["cases"]
    assert {(c["vocab"], c["tokens"], c["tp"]) for c in cases} == {
        (vocab, tokens, tp) for vocab in (1024, 4096) for tokens in (64, 256) for tp in (1, 2)
    }
    for case in cases:
        assert CASE_KEYS <= case.keys(), case
        # Same bf16 inputs, same math: only fp32 summation order and bf16 gradient rounding differ.
        assert case["max_abs_diff"] < 1e-3, case
