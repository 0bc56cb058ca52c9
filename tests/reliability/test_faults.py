"""Faults: a rank killed mid-step (no hang, exact resume) and checkpoints that cannot be written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kd_module.parallel.collectives import free_port

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 300
"""Hard limit on one 2-rank launch; a hang after a rank dies fails the test instead of CI."""


def _launch(log_dir: Path, name: str, *extra: str) -> int:
    """Run the 2-rank job under torchrun; wait for it (hard timeout), then kill what it left."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "tests.reliability.fault_job",
        "--log-dir",
        str(log_dir),
        "--name",
        name,
        *extra,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (log_dir / f"{name}.log").open("a") as handle:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return process.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: still running after {JOB_TIMEOUT_S} s (a rank hangs)")
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _losses(log_dir: Path, name: str) -> list[dict]:
    lines = (log_dir / name / "losses.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _tail(log_dir: Path, name: str) -> str:
    return (log_dir / f"{name}.log").read_text()[-3000:]


@pytest.mark.multirank
def test_sigkill_of_one_rank_ends_every_rank_and_resume_is_exact(tmp_path):
    """DP=2: rank 1 SIGKILLed inside step 4 makes the whole launch exit (no hang, non-zero);
    resuming from the step-2 checkpoint repeats an uninterrupted run's losses exactly."""
    from kd_module.checkpoints.run import latest_checkpoint

    assert _launch(tmp_path, "full") == 0, _tail(tmp_path, "full")
    reference = {item["step"]: item for item in _losses(tmp_path, "full")}
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    returncode = _launch(tmp_path, "killed", "--kill-rank", "1", "--kill-at-step", "4")
    assert returncode != 0, _tail(tmp_path, "killed")
    assert "SIGKILL" in _tail(tmp_path, "killed")
    before = _losses(tmp_path, "killed")
    assert [item["step"] for item in before] == [1, 2, 3]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step=2"

    assert _launch(tmp_path, "killed", "--resume") == 0, _tail(tmp_path, "killed")
    resumed = _losses(tmp_path, "killed")[len(before) :]
    assert [item["step"] for item in resumed] == [3, 4, 5, 6]
    for item in before + resumed:
        for key in ("kd_loss", "logits_loss", "grad_norm", "lr"):
            assert item[key] == reference[item["step"]][key], (item["step"], key)
    # The teacher hash is combined over both ranks; the same seed gives the same teacher.
    hashes = {
        json.loads((tmp_path / name / "summary.json").read_text())["teacher_sha256"]
        for name in ("full", "killed")
    }
    assert len(hashes) == 1 and len(hashes.pop()) == 64


# ---------------------------------------------------------------------------- unwritable


def _distill(log_dir: Path, max_steps: int, resume: bool = False) -> dict:
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.models.gpt import GPTModelConfig
    from kd_module.training.strategy import MegatronStrategy

    student = GPTModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, vocab_size=512
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(seed=7),
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = GPTDataModule(
        mock=True, seq_length=32, micro_batch_size=2, global_batch_size=4, num_train_samples=32
    )
    return distill(
        student,
        data,
        trainer,
        teacher=student.replace(num_layers=3, hidden_size=48),
        log_dir=str(log_dir),
        name="run",
        checkpoint_every_n_steps=2,
        keep_last=2,
        resume=resume,
        export=False,
    )


def test_checkpoint_directory_under_a_file_is_refused_before_building(tmp_path, monkeypatch):
    """A checkpoint path that cannot be created (a regular file in the way) is refused up front,
    naming both paths, with no model built.

    Tests run as root, where chmod 0o500 does not stop writes: a file in the path simulates an
    unwritable directory.
    """
    import kd_module.distillation.model

    built = []
    monkeypatch.setattr(
        kd_module.distillation.model, "build_model", lambda *a, **k: built.append(a)
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a directory")
    with pytest.raises(
        ValueError,
        match=r"checkpoint directory .*run/checkpoints: cannot be created, .*run/checkpoints "
        r"is a file; give a directory path",
    ):
        _distill(tmp_path, max_steps=2)
    assert built == []


def test_unwritable_directory_message_names_it(tmp_path, monkeypatch):
    """writable_dir_problems names a read-only ancestor (os.access mocked: root bypasses modes)."""
    from kd_module.rules import writable_dir_problems

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert writable_dir_problems(tmp_path / "a" / "b", "checkpoint directory") == [
        f"checkpoint directory {tmp_path / 'a' / 'b'}: {tmp_path} is not writable; "
        "give a writable directory"
    ]


def test_failing_save_raises_and_the_last_good_checkpoint_resumes(tmp_path, monkeypatch):
    """When writing step 6 fails with EACCES the fit raises it naming the path; step=4 stays
    the latest complete checkpoint and a resumed run from it finishes.

    The failure is injected into megatron's ``dist_checkpointing.save`` (root ignores modes).
    """
    from megatron.core import dist_checkpointing

    from kd_module.checkpoints.run import is_complete, latest_checkpoint

    _distill(tmp_path, max_steps=4)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step=4"

    def denied(state, directory, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(directory))

    monkeypatch.setattr(dist_checkpointing, "save", denied)
    with pytest.raises(PermissionError, match=r"Permission denied: '.*\.tmp-step=6'"):
        _distill(tmp_path, max_steps=8, resume=True)
    monkeypatch.undo()
    assert latest_checkpoint(checkpoints) == checkpoints / "step=4"
    assert is_complete(checkpoints / "step=4")

    summary = _distill(tmp_path, max_steps=8, resume=True)
    assert summary["steps"] == 8
    assert latest_checkpoint(checkpoints) == checkpoints / "step=8"
