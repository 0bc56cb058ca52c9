"""Run checkpoints: student-only, rotation, exact resume after SIGKILL in training and in a save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(log_dir, name, *extra, expect_killed=False):
    """Run the job; wait for its main process only, then kill what it left behind.

    A process killed with SIGKILL cannot stop its helper processes (megatron's checkpoint
    writers), which would keep pipes open: output goes to a file and the group is killed.
    """
    command = [sys.executable, "-m", "tests.kd_module.resume_job"]
    command += ["--log-dir", str(log_dir), "--name", name, *extra]
    output = Path(log_dir) / f"{name}.log"
    with output.open("a") as handle:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=300)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    tail = output.read_text()[-3000:]
    if expect_killed:
        assert returncode == -signal.SIGKILL, tail
    else:
        assert returncode == 0, tail


def _losses(log_dir, name):
    lines = (Path(log_dir) / name / "losses.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("runs")
    _run(log_dir, "full")
    return log_dir, {item["step"]: item["kd_loss"] for item in _losses(log_dir, "full")}


def test_checkpoints_rotate_and_hold_no_teacher(uninterrupted):
    """Every-2-steps saves keep the newest 2 plus a 'last' link, and hold no teacher tensors."""
    from torch.distributed.checkpoint import FileSystemReader

    log_dir, _ = uninterrupted
    checkpoints = log_dir / "full" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["last", "step=6", "step=8"], names
    assert (checkpoints / "last").resolve() == (checkpoints / "step=8").resolve()
    keys = list(FileSystemReader(str(checkpoints / "step=8")).read_metadata().state_dict_metadata)
    assert any(key.startswith("decoder.layers") for key in keys), keys[:5]
    assert any("optimizer" in key and "exp_avg" in key for key in keys), keys
    assert not [key for key in keys if "teacher" in key]
    assert (log_dir / "full" / "student" / "model_config.yaml").exists()


def test_sigkill_mid_training_resumes_to_identical_losses(uninterrupted, tmp_path):
    """Killed with SIGKILL after step 5, a resumed run repeats the uninterrupted losses exactly."""
    _, reference = uninterrupted
    _run(tmp_path, "killed", "--kill-after-step", "5", expect_killed=True)
    before = _losses(tmp_path, "killed")
    assert [item["step"] for item in before] == [1, 2, 3, 4, 5]
    _run(tmp_path, "killed", "--resume")
    resumed = _losses(tmp_path, "killed")[len(before) :]
    assert [item["step"] for item in resumed] == [5, 6, 7, 8]  # from the step-4 checkpoint
    for item in before + resumed:
        assert item["kd_loss"] == reference[item["step"]], item


def test_sigkill_during_save_resumes_from_previous_checkpoint(uninterrupted, tmp_path):
    """Killed inside the second save (step 4), the run resumes from step 2 with identical losses."""
    from kd_module.checkpoints.run import is_complete, latest_checkpoint

    _, reference = uninterrupted
    _run(tmp_path, "save", "--kill-during-save", "2", expect_killed=True)
    checkpoints = tmp_path / "save" / "checkpoints"
    assert not (checkpoints / "step=4").exists()
    assert (checkpoints / ".tmp-step=4").exists() and not is_complete(checkpoints / ".tmp-step=4")
    assert latest_checkpoint(checkpoints) == checkpoints / "step=2"
    first = len(_losses(tmp_path, "save"))
    _run(tmp_path, "save", "--resume")
    resumed = _losses(tmp_path, "save")[first:]
    assert [item["step"] for item in resumed] == [3, 4, 5, 6, 7, 8]
    for item in resumed:
        assert item["kd_loss"] == reference[item["step"]], item
    assert not (checkpoints / ".tmp-step=4").exists() or is_complete(checkpoints / "step=4")


def test_resume_refuses_an_incomplete_directory(tmp_path):
    """Loading a directory that is not a complete run checkpoint names it."""
    from kd_module.checkpoints.run import load_run_checkpoint

    with pytest.raises(ValueError, match=r"is not a complete run checkpoint"):
        load_run_checkpoint(object(), tmp_path)
