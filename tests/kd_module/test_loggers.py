"""The loggers people use (`logger=` on distill): TensorBoard, W&B (offline) and MLflow get every
metric the CSV gets; unknown names and missing packages are refused before anything is built."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from kd_module.models.gpt import GPTModelConfig

SEQ = 32
STUDENT = GPTModelConfig(
    num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=320
)
TEACHER = STUDENT.replace(num_layers=2, hidden_size=64)


def _distill(tmp_path: Path, **arguments):
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.specs import RunConfig, TeacherSpec
    from kd_module.training.strategy import MegatronStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=3,
        logger=False,
        log_every_n_steps=1,
        val_check_interval=3,
        limit_val_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    data = GPTDataModule(
        mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=2, num_train_samples=6
    )
    return distill(
        STUDENT,
        data,
        trainer,
        teacher=TeacherSpec(config=TEACHER),
        job=RunConfig(log_dir=str(tmp_path), name="run", export=False),
        **arguments,
    )


def _csv_metrics(run_dir: Path) -> set[str]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        header = next(csv.reader(handle))
    return set(header) - {"step", "epoch"}


def test_tensorboard_wandb_and_mlflow_get_every_metric_of_the_csv(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kd_module.training.module import TRAIN_METRICS, VAL_METRICS

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _distill(tmp_path, logger=["tensorboard", "wandb", "mlflow"])
    run_dir = tmp_path / "run"
    metrics = _csv_metrics(run_dir)
    assert {"kd_loss", "lm_loss", "val_loss"} <= metrics
    assert metrics <= set(TRAIN_METRICS) | set(VAL_METRICS) | {"lr"}

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert metrics <= set(events.Tags()["scalars"]), metrics - set(events.Tags()["scalars"])
    assert len(events.Scalars("kd_loss")) == 3  # one point per step

    import wandb

    wandb.finish()  # what the process's exit does for a command-line run
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    (record,) = offline_run.glob("run-*.wandb")  # synced later with `wandb sync`
    # W&B's service process writes the record; give it a moment after finish() returns.
    deadline = time.monotonic() + 30
    while True:
        missing = {name for name in metrics if name.encode() not in record.read_bytes()}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing

    (metric_dir,) = [p for p in (run_dir / "mlruns").rglob("metrics") if p.is_dir()]
    assert metrics <= {path.name for path in metric_dir.iterdir()}


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        ("comet", "logger='comet' is not one of csv, tensorboard, wandb, mlflow"),
        (["tensorboard", "tensorbord"], "logger='tensorbord' is not one of"),
    ],
)
def test_unknown_loggers_are_refused_before_anything_is_built(tmp_path, logger, message):
    with pytest.raises(ValueError) as refused:
        _distill(tmp_path, logger=logger)
    assert message in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_a_logger_whose_package_is_missing_names_it(monkeypatch):
    import importlib.util

    from kd_module.lightning_factories import logger_problems

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert logger_problems("wandb") == [
        "logger='wandb' needs the 'wandb' package; pip install wandb"
    ]


def test_logger_names_as_the_command_line_passes_them():
    """`logger=tensorboard` and `logger=[tensorboard,wandb]` (a string, from nemo-run) name the
    same loggers as Python lists do."""
    from kd_module.lightning_factories import _logger_names

    assert _logger_names("tensorboard") == ["tensorboard"]
    assert _logger_names("[tensorboard, 'wandb']") == ["tensorboard", "wandb"]
    assert _logger_names(["mlflow"]) == ["mlflow"] and _logger_names(None) == []
