"""Smoke test of the offline-vs-online benchmark (no thresholds: timings vary by machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_offline_quick_prints_cache_size_step_times_and_memory() -> None:
    """`python -m bench.offline --quick` ends with JSON: the cache's bytes per token are the
    format's (k fp16 values + k int32 indices + fp32 LSE, + 8 bytes per sample), and both
    modes report step times and peak memory."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.offline", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    tiny = summary["pairs"]["tiny"]
    k, seq = tiny["settings"]["k"], tiny["settings"]["seq_length"]
    assert tiny["cache"]["bytes_per_token"] == pytest.approx(k * (2 + 4) + 4 + 8 / seq, abs=1e-9)
    assert tiny["cache"]["full_bf16_logits_bytes_per_token"] == 640
    for mode in ("online", "offline"):
        assert tiny[f"{mode}_step_s"] > 0 and tiny[f"{mode}_peak_mb"] > 0
        assert [run["steps"] for run in tiny["runs"][mode]] == [summary["settings"]["steps"]]
    assert tiny["step_time_ratio"] == pytest.approx(tiny["offline_step_s"] / tiny["online_step_s"])
