"""The embedded demo (`python -m examples.demo`): quick run, teacher cache, settings."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples import demo

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = (
    "teacher_val_loss",
    "kd_student_val_loss",
    "lm_only_student_val_loss",
    "offline_kd_student_val_loss",
    "pruned_student_val_loss",
    "pruned_kd_student_val_loss",
    "kd_gap_closed",
    "tokens",
    "wall_s",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m examples.demo --quick`` in a subprocess with a fresh cache."""
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "KD_CACHE_DIR": str(root / "cache")}
    completed = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--quick", "--out", str(root / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((root / "out" / demo.SUMMARY_FILE).read_text())
    return {"root": root, "out": root / "out", "stdout": completed.stdout, "summary": summary}


def test_quick_run_writes_summary_with_documented_keys(quick_run):
    """--quick writes demo_summary.json with finite losses and tokens = steps x batch x seq."""
    summary = quick_run["summary"]
    assert set(SUMMARY_KEYS) <= set(summary)
    for key in (
        "teacher_val_loss",
        "kd_student_val_loss",
        "lm_only_student_val_loss",
        "offline_kd_student_val_loss",
    ):
        # Byte vocabulary padded to 320: a model at initialization sits near ln(320) = 5.77.
        assert 0 < summary[key] < 7, (key, summary[key])
    steps = demo.QUICK.student_steps
    assert summary["tokens"] == steps * demo.GLOBAL_BATCH_SIZE * demo.SEQ_LENGTH == 4 * 2048
    assert summary["wall_s"] > 0
    assert summary["kd_wins"] == (
        summary["kd_student_val_loss"] < summary["lm_only_student_val_loss"]
    )
    for name in ("teacher", "kd_student", "lm_only_student", "offline_kd_student"):
        run = summary["runs"][name]
        assert run["steps"] == 4 and run["tokens_per_s"] > 0, (name, run)
        # val_check_interval=2 over 4 steps: validations after steps 2 and 4.
        assert [step for step, _ in run["curve"]] == [2, 4], (name, run["curve"])
        assert run["curve"][-1][1] == pytest.approx(run["val_loss"], rel=1e-6)


def test_quick_run_compares_students_fairly(quick_run):
    """The students have the same size, the same initial weights and the same tokens."""
    runs = quick_run["summary"]["runs"]
    kd, lm_only, offline = runs["kd_student"], runs["lm_only_student"], runs["offline_kd_student"]
    assert kd["parameters"] == lm_only["parameters"] < runs["teacher"]["parameters"]
    assert offline["parameters"] == kd["parameters"]
    assert kd["initial_weights_sum"] == lm_only["initial_weights_sum"]
    assert offline["initial_weights_sum"] == kd["initial_weights_sum"]
    assert kd["tokens"] == lm_only["tokens"] == offline["tokens"]
    assert offline["cache_bytes_per_token"] == demo.OFFLINE_CACHE_K * 6 + 4
    manifest = json.loads((quick_run["out"] / demo.OFFLINE_CACHE_DIR / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 4 * demo.GLOBAL_BATCH_SIZE
    # The teacher is scored on the KD run's held-out batches, the ones its own curve used.
    assert quick_run["summary"]["teacher_val_loss"] == pytest.approx(
        runs["teacher"]["val_loss"], rel=1e-5
    )


def test_quick_run_prints_table_verdict_and_plot(quick_run):
    """stdout has the table's four rows and the verdict; the PNG file is a PNG."""
    stdout = quick_run["stdout"]
    for label in (
        "teacher",
        "KD student",
        "LM-only student",
        "KD student, offline",
        "pruned, not trained",
        "pruned + KD student",
        "verdict:",
    ):
        assert label in stdout, stdout
    pytest.importorskip("matplotlib")
    png = (quick_run["out"] / demo.PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_prunes_the_student_from_the_teacher_and_scores_every_row(quick_run):
    """The pruned student has the students' size and its own (pruned) initial weights, trains
    on the same tokens; each row's loss is the mean of its last validations and its share of
    the gap to the teacher is (lm_only - row) / (lm_only - teacher)."""
    summary = quick_run["summary"]
    runs = summary["runs"]
    pruned, pruned_kd, kd = runs["pruned_student"], runs["pruned_kd_student"], runs["kd_student"]
    assert pruned["parameters"] == pruned_kd["parameters"] == kd["parameters"]
    assert pruned["pruning"]["pruned"]["parameters"] == kd["parameters"]
    assert pruned_kd["tokens"] == kd["tokens"] and pruned["tokens"] == 0
    assert pruned_kd["initial_weights_sum"] != kd["initial_weights_sum"]
    assert summary["kd_student_val_loss"] == pytest.approx(
        sum(loss for _, loss in kd["curve"][-demo.LAST_VALIDATIONS :]) / demo.LAST_VALIDATIONS
    )
    lm_only, teacher = summary["lm_only_student_val_loss"], summary["teacher_val_loss"]
    for name in ("kd_student", "offline_kd_student", "pruned_kd_student"):
        expected = (lm_only - summary[f"{name}_val_loss"]) / (lm_only - teacher)
        assert summary["kd_gap_closed"][name] == pytest.approx(expected), name


def test_teacher_is_cached_and_reused(quick_run, monkeypatch):
    """A second call finds the cached teacher (same record and checkpoint) and trains nothing."""
    from kd_module.data.corpus import embedded_corpus

    monkeypatch.setenv("KD_CACHE_DIR", str(quick_run["root"] / "cache"))
    corpus = embedded_corpus(
        max_bytes=demo.QUICK.corpus_max_bytes, validation_every=demo.CORPUS_VALIDATION_EVERY
    )
    assert corpus["cached"]
    teacher = demo.obtain_teacher(demo.QUICK, corpus, quick_run["root"] / "unused")
    assert teacher["cached"] is True
    assert not (quick_run["root"] / "unused").exists()
    first = quick_run["summary"]["runs"]["teacher"]
    assert teacher["val_loss"] == first["val_loss"] and teacher["curve"] == first["curve"]
    assert Path(teacher["checkpoint"]).parent == demo.teacher_cache_dir(demo.QUICK, corpus)
    assert (Path(teacher["checkpoint"]) / "model_config.yaml").is_file()


def test_teacher_cache_key_follows_what_the_teacher_depends_on():
    """The key changes with the teacher's config, steps and corpus, and only with them."""
    corpus = {"directory": "/cache/stdlib-0123"}
    key = demo.teacher_cache_key(demo.FULL, corpus)
    assert key == demo.teacher_cache_key(dataclasses.replace(demo.FULL), corpus)
    assert key == demo.teacher_cache_key(dataclasses.replace(demo.FULL, student_steps=100), corpus)
    wider = demo.FULL.teacher.replace(hidden_size=256)
    others = {
        demo.teacher_cache_key(dataclasses.replace(demo.FULL, teacher=wider), corpus),
        demo.teacher_cache_key(dataclasses.replace(demo.FULL, teacher_steps=100), corpus),
        demo.teacher_cache_key(demo.FULL, {"directory": "/cache/stdlib-4567"}),
    }
    assert key not in others and len(others) == 3


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    """$KD_CACHE_DIR sets the cache root; without it, ~/.cache/megatron-kd."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path))
    assert demo.cache_root() == tmp_path
    monkeypatch.delenv("KD_CACHE_DIR")
    assert demo.cache_root() == Path("~/.cache/megatron-kd")


def test_settings_reject_bad_values_all_at_once():
    """Bad step counts are named together, and steps must be multiples of the interval."""
    with pytest.raises(ValueError, match=r"teacher_steps=0 must be .*validation_batches=-1"):
        demo.DemoSettings(teacher_steps=0, validation_batches=-1)
    with pytest.raises(ValueError, match=r"student_steps=30 is not a multiple of .*=20"):
        demo.DemoSettings(teacher_steps=40, student_steps=30, val_check_interval=20)


def test_verdict_and_table_from_a_summary():
    """The verdict fails when KD does not win or pruned + KD closes less than half the gap;
    the table shows each run's numbers and the gap each KD row closes."""
    run = {"parameters": 1000, "tokens": 2048, "tokens_per_s": 512.0, "wall_s": 4.0}
    summary = {
        "teacher_val_loss": 1.5,
        "kd_student_val_loss": 2.25,
        "lm_only_student_val_loss": 2.5,
        "pruned_kd_student_val_loss": 1.9,
        "runs": {
            "teacher": run,
            "lm_only_student": run,
            "kd_student": run,
            "pruned_kd_student": run,
        },
    }
    summary["gap_closed"] = {
        name: demo.gap_closed(summary, name) for name in ("kd_student", "pruned_kd_student")
    }
    assert summary["gap_closed"]["kd_student"] == pytest.approx(0.25)  # (2.5 - 2.25) / 1.0
    assert summary["gap_closed"]["pruned_kd_student"] == pytest.approx(0.6)
    ok, message = demo.verdict(summary)
    assert ok and "by 0.2500" in message and "closes 60%" in message
    ok, message = demo.verdict({**summary, "kd_student_val_loss": 2.5})
    assert not ok and "does not beat the LM-only student" in message
    short = {**summary, "gap_closed": {**summary["gap_closed"], "pruned_kd_student": 0.4}}
    ok, message = demo.verdict(short)
    assert not ok and "closes 40% of the gap to the teacher, less than 50%" in message
    table = demo.format_table(summary).splitlines()
    assert len(table) == 6
    assert table[2].split()[:5] == ["teacher", "1,000", "1.5000", "-", "2,048"]
    assert table[3].split()[-6:] == ["1,000", "2.5000", "-", "2,048", "512", "4.0"]
    assert table[4].split()[-6:] == ["1,000", "2.2500", "25%", "2,048", "512", "4.0"]
    assert table[5].split()[:4] == ["pruned", "+", "KD", "student"]
    assert table[5].split()[-5:-3] == ["1.9000", "60%"]
