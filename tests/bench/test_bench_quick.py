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
        # Fused projections vs projections + ModelOpt: bf16 logits and gradients round apart.
        assert {"fused_memory_ratio", "fused_time_ratio"} <= case.keys(), case
        assert case["fused_max_abs_diff"] < 1e-2, case


@pytest.mark.timeout(120)
def test_step_memory_quick_prints_json_summary() -> None:
    """`python -m bench.step_memory --quick --vocab 2048` ends with JSON: every implementation's
    step peak and reported losses, equal across implementations, and the fused/chunked ratios."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.step_memory", "--quick", "--vocab", "2048"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    results = summary["results"]
    assert results.keys() == {"chunked", "fused", "modelopt"}
    for impl in ("fused", "modelopt"):
        for key in ("kd_loss", "lm_loss"):
            assert abs(results[impl][key] - results["chunked"][key]) < 1e-5, (impl, key)
    assert "memory_ratio" in summary and "memory_ratio_met" in summary["targets"]
    assert summary["settings"]["student"]["vocab_size"] == 2048
    assert summary["settings"]["teacher"]["vocab_size"] == 2048
    assert summary["time_ratio"] > 0


def test_step_memory_time_ratio_stands_without_a_memory_ratio() -> None:
    """A chunked step that adds no RSS (its pages kept from the warm-up, as on CI's machine at
    --quick sizes) leaves the memory ratio unknown, not the time ratio."""
    from bench.step_memory import fused_over_chunked

    results = {
        "chunked": {"peak_mb": 0.0, "step_s": 0.5},
        "fused": {"peak_mb": 1.0, "step_s": 0.6},
    }
    assert fused_over_chunked(results) == (None, 1.2)
    results["chunked"]["peak_mb"] = 4.0
    assert fused_over_chunked(results) == (0.25, 1.2)
    assert fused_over_chunked({"chunked": results["chunked"]}) == (None, None)


def test_step_memory_refuses_a_vocabulary_megatron_would_pad(capsys) -> None:
    """A --vocab that is not a multiple of 128 is refused by name before any model is built."""
    from bench import step_memory

    with pytest.raises(SystemExit):
        step_memory.main(["--quick", "--vocab", "1000"])
    assert "--vocab 1000: give a positive multiple of 128" in capsys.readouterr().err


HF_IMPORT_RANK_KEYS = {
    "rank_shard_bytes",
    "import_s",
    "rss_libraries_mb",
    "rss_model_mb",
    "peak_rss_mb",
    "import_increase_mb",
    "peak_over_libraries_mb",
    "max_rss_anon_mb",
    "max_rss_file_mb",
    "weights_match",
}


@pytest.mark.multirank
@pytest.mark.timeout(240)
def test_hf_import_quick_prints_json_summary() -> None:
    """`python -m bench.hf_import --quick` ends with JSON: sizes, per-rank memory at TP=1 and 2."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.hf_import", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    checkpoint = summary["checkpoint"]
    assert checkpoint["num_files"] > 1
    assert checkpoint["largest_file_bytes"] < checkpoint["checkpoint_bytes"]
    # Headers and the index add a little to the tensors' bytes.
    assert checkpoint["tensor_bytes"] <= checkpoint["checkpoint_bytes"]
    assert checkpoint["checkpoint_bytes"] < 1.01 * checkpoint["tensor_bytes"] + 65536
    for tp in (1, 2):
        layout = summary[f"tp{tp}"]
        assert len(layout["ranks"]) == tp
        assert layout["weights_match"]
        for rank in layout["ranks"]:
            assert HF_IMPORT_RANK_KEYS <= rank.keys(), rank
            assert rank["rss_libraries_mb"] <= rank["rss_model_mb"] <= rank["peak_rss_mb"]
            assert rank["import_increase_mb"] >= 0 and rank["import_s"] > 0
        # Each rank holds about 1/TP of the parameters (norms are replicated).
        shard = layout["ranks"][0]["rank_shard_bytes"]
        assert checkpoint["tensor_bytes"] / tp <= shard < checkpoint["tensor_bytes"] / tp * 1.05
    assert set(summary["targets"]) == {"tp1_peak_to_checkpoint", "tp2_peak_to_shard_plus_file"}


@pytest.mark.timeout(300)
def test_demo_sweep_quick_prints_each_variant_against_the_lm_only_baseline(tmp_path) -> None:
    """`python -m bench.demo_sweep --quick --only ...` ends with JSON: per variant its held-out
    loss and the share of the LM-only gap it closes, computed from the losses it reports."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), KD_CACHE_DIR=str(tmp_path / "cache"))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.demo_sweep", "--quick", "--only", "kd_scale_1", "kd_only"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert [row["name"] for row in summary["variants"]] == ["kd_scale_1", "kd_only"]
    lm_only, teacher = summary["lm_only_val_loss"], summary["teacher_val_loss"]
    for row in summary["variants"]:
        assert row["gap_closed"] == pytest.approx((lm_only - row["val_loss"]) / (lm_only - teacher))
