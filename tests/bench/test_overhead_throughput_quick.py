"""Smoke tests of the KD-overhead and throughput benchmarks (no thresholds: timings vary)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_quick(name: str, timeout: float) -> dict:
    """``python -m bench.<name> --quick`` in a subprocess; its last stdout line as JSON."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(200)
def test_kd_overhead_quick_reports_consistent_ratios() -> None:
    """`bench.kd_overhead --quick` prints times whose ratios are the documented quotients."""
    summary = _run_quick("kd_overhead", timeout=180)
    assert summary["machine"]["cpu_count"] >= 1
    assert summary["versions"]["megatron-core"] == "0.16.1"
    assert summary["settings"]["quick"] is True
    times = ("kd_step_s", "student_step_s", "teacher_forward_s")
    assert all(_positive(summary[key]) for key in times), summary
    # The script prints times rounded to microseconds; in --quick mode a student forward takes
    # about a millisecond, so a quotient recomputed from printed times is off by up to ~1e-3.
    expected = summary["kd_step_s"] / (summary["student_step_s"] + summary["teacher_forward_s"])
    assert summary["overhead_ratio"] == pytest.approx(expected, rel=2e-3)
    slowdown = summary["student_forward_in_kd_s"] / summary["student_forward_alone_s"]
    assert summary["student_forward_slowdown"] == pytest.approx(slowdown, rel=2e-3)
    # Interleaved repetitions: every measurement has the quick case's 3 samples.
    assert {k: len(v) for k, v in summary["samples_s"].items()} == {
        "kd": 3,
        "student": 3,
        "teacher": 3,
    }
    kd = summary["breakdown"]["kd_step"]
    assert {"student_forward", "teacher_forward", "kd_loss", "lm_loss", "optimizer_step"} <= set(kd)
    assert kd["kd_loss"] > 0 and kd["teacher_forward"] > 0
    targets = summary["targets"]
    assert targets["overhead_ratio_met"] == (summary["overhead_ratio"] <= 1.05)
    assert targets["student_forward_slowdown_met"] == (summary["student_forward_slowdown"] <= 1.05)


@pytest.mark.multirank
@pytest.mark.timeout(420)
def test_throughput_quick_reports_every_layout_against_dp1() -> None:
    """`bench.throughput --quick` reports tokens/s for DP=1, DP=2, TP=2, PP=2 and ratios to DP=1."""
    summary = _run_quick("throughput", timeout=400)
    assert summary["versions"]["lightning"].startswith("2.")
    assert "cores" in summary["note"]
    settings = summary["settings"]
    assert settings["quick"] is True
    rows = {row["layout"]: row for row in summary["layouts"]}
    assert set(rows) == {"dp1", "dp2", "tp2", "pp2"}
    sizes = {
        name: (
            row["ranks"],
            row["data_parallel_size"],
            row["tensor_model_parallel_size"],
            row["pipeline_model_parallel_size"],
        )
        for name, row in rows.items()
    }
    assert sizes == {
        "dp1": (1, 1, 1, 1),
        "dp2": (2, 2, 1, 1),
        "tp2": (2, 1, 2, 1),
        "pp2": (2, 1, 1, 2),
    }
    for row in rows.values():
        assert _positive(row["tokens_per_s"]), row
        assert row["ratio_to_dp1"] == pytest.approx(
            row["tokens_per_s"] / rows["dp1"]["tokens_per_s"], rel=1e-3
        )
        # Warmup steps excluded: one step-time sample per measured step after the first.
        assert len(row["step_s_samples"]) == settings["measured_steps"]
    assert rows["dp1"]["ratio_to_dp1"] == 1.0
    # Same global batch and weights: DP=2 and PP=2 train the same model as DP=1.
    assert rows["dp2"]["final_kd_loss"] == pytest.approx(rows["dp1"]["final_kd_loss"], rel=1e-4)
    assert rows["pp2"]["final_kd_loss"] == pytest.approx(rows["dp1"]["final_kd_loss"], rel=1e-4)
