"""ManualGC and LatencyProfiler on real tiny DistillationModule fits on CPU."""

from __future__ import annotations

import gc

import pytest
import torch

from kd_module.models.gpt import GPTModelConfig

# Large enough that compute, not the step's fixed bookkeeping (logging, zeroing, ~3 ms on CPU),
# fills the step: the profiler's phases must cover it within 10%.
SEQ = 128
STUDENT = GPTModelConfig(
    num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=SEQ, vocab_size=512
)
TEACHER = STUDENT.replace(num_layers=4, hidden_size=256, ffn_hidden_size=1024)
LEAK_MB_PER_STEP = 16.0
LEAK_STEPS = 40


def _leaker():
    """A callback that keeps a known-size, fully written tensor alive after every step."""
    import lightning as L

    class Leaker(L.Callback):
        def __init__(self):
            self.kept = []

        def on_train_batch_end(self, *args):
            # torch.ones writes every page, so the resident set grows by the full size.
            self.kept.append(torch.ones(int(LEAK_MB_PER_STEP * 1024 * 1024) // 4))

    return Leaker()


def _stopper(step):
    """Stops the fit after ``step`` steps (max_steps, which shapes the LR schedule, stays put)."""
    import lightning as L

    class Stopper(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= step

    return Stopper()


def _recorder():
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self):
            self.kd_loss = []

        def on_train_batch_end(self, trainer, *args):
            self.kd_loss.append(float(trainer.callback_metrics["kd_loss"]))

    return Recorder()


def _fit(callbacks, max_steps, root_dir, ckpt_path=None):
    """A tiny distillation fit on mock data (random teacher); returns trainer and module."""
    import lightning as L

    from kd_module.data import GPTDataModule
    from kd_module.training.module import DistillationModule
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy
    from tests.helpers import init_weights_by_global_key

    module = DistillationModule(
        STUDENT,
        TEACHER,
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
        student_init_fn=lambda m: init_weights_by_global_key(m, seed=1),
        teacher_init_fn=lambda m: init_weights_by_global_key(m, seed=2, std=0.3),
    )
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=4,
        num_train_samples=LEAK_STEPS * 4,  # one data order for every fit here
        num_val_samples=8,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=root_dir,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


@pytest.fixture(scope="module")
def leaking_run(tmp_path_factory):
    """A fit leaking LEAK_MB_PER_STEP per step, watched by ManualGC(on_growth='stop')."""
    from callbacks import ManualGC

    root = tmp_path_factory.mktemp("leak")
    manual_gc = ManualGC(gc_interval=1, window=8, growth_threshold_mb_per_step=4, on_growth="stop")
    recorder = _recorder()
    leaker = _leaker()
    with pytest.warns(UserWarning) as warned:
        trainer, _ = _fit([leaker, manual_gc, recorder], LEAK_STEPS, root)
    leaker.kept.clear()
    # Resume from the alarm's checkpoint with a fresh callback of the same configuration.
    resumed_gc = ManualGC(gc_interval=1, window=8, growth_threshold_mb_per_step=4, on_growth="stop")
    resumed, _ = _fit(
        [resumed_gc], trainer.global_step + 2, root, ckpt_path=manual_gc.checkpoint_path
    )
    return {
        "trainer": trainer,
        "gc": manual_gc,
        "kd_loss": recorder.kd_loss,
        "warned": warned,
        "resumed": resumed,
        "resumed_gc": resumed_gc,
    }


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory):
    """A normal fit with ManualGC (warn) and LatencyProfiler."""
    from callbacks import LatencyProfiler, ManualGC

    root = tmp_path_factory.mktemp("normal")
    manual_gc = ManualGC(gc_interval=5, window=8, growth_threshold_mb_per_step=4)
    profiler = LatencyProfiler(every_n_steps=2, warmup_steps=2)
    recorder = _recorder()
    gc_enabled_before = gc.isenabled()
    trainer, module = _fit([profiler, manual_gc, recorder, _stopper(12)], LEAK_STEPS, root)
    return {
        "trainer": trainer,
        "gc": manual_gc,
        "profiler": profiler,
        "kd_loss": recorder.kd_loss,
        "gc_restored": gc.isenabled() == gc_enabled_before,
    }


def test_growth_detector_fires_with_the_leak_rate_and_stops_with_a_checkpoint(leaking_run):
    """A 16 MB/step leak is reported within 20%, the fit stops early, the checkpoint loads."""
    manual_gc = leaking_run["gc"]
    trainer = leaking_run["trainer"]
    growth = manual_gc.growth
    assert growth is not None and growth["memory"] == "host"
    assert growth["mb_per_step"] == pytest.approx(LEAK_MB_PER_STEP, rel=0.2), growth
    assert growth["projected_oom_step"] > growth["step"]
    assert trainer.global_step == growth["step"] < LEAK_STEPS
    messages = [str(w.message) for w in leaking_run["warned"]]
    assert any("MB/step" in m and "runs out at about step" in m for m in messages), messages
    path = manual_gc.checkpoint_path
    assert path is not None and path.exists(), path


def test_training_resumes_from_the_alarm_checkpoint_with_the_callback_state(leaking_run):
    """The stop checkpoint resumes a fit; the callback's window and fired alarm come back."""
    first, resumed = leaking_run["gc"], leaking_run["resumed_gc"]
    assert leaking_run["resumed"].global_step == leaking_run["trainer"].global_step + 2
    assert resumed.growth == first.growth
    assert resumed.checkpoint_path is None  # fired before the resume: no second alarm
    assert len(resumed._samples) == resumed.window


def test_manual_gc_warns_about_the_distillation_known_issue(leaking_run):
    """Manual GC with a DistillationModule warns about ModelOpt's per-micro-batch allocations."""
    messages = [str(w.message) for w in leaking_run["warned"]]
    assert any("DistillationModel" in m and "known issue" in m.lower() for m in messages)


def test_growth_detector_stays_quiet_on_a_normal_run_and_restores_gc(normal_run):
    """No alarm on a run without a leak; automatic GC is enabled again after the fit."""
    manual_gc = normal_run["gc"]
    assert manual_gc.growth is None
    assert normal_run["trainer"].global_step == 12
    assert manual_gc.growth_rates()["host"] < manual_gc.growth_threshold_mb_per_step
    assert normal_run["gc_restored"]


def test_profiler_does_not_change_the_loss_curve(normal_run, leaking_run):
    """Profiled and unprofiled fits of the same seed give identical kd_loss step by step."""
    steps = len(leaking_run["kd_loss"])
    profiled = torch.tensor(normal_run["kd_loss"][:steps])
    torch.testing.assert_close(profiled, torch.tensor(leaking_run["kd_loss"]), rtol=0, atol=0)


def test_profiler_phases_add_up_to_the_step_time(normal_run):
    """The timed phases cover the measured step time within 10%, each one positive."""
    summary = normal_run["profiler"].summary()
    assert summary["profiled_steps"] == 5  # steps 2, 4, 6, 8, 10
    phases = summary["phases_ms"]
    for phase in ("teacher_forward", "student_forward", "loss", "backward", "optimizer"):
        assert phases[phase] > 0, phases
    timed = sum(value for key, value in phases.items() if key != "other")
    assert timed == pytest.approx(summary["step_ms"], rel=0.1), summary


def test_profiler_reports_the_student_forward_slowdown(normal_run):
    """The student's forward alone is measured once and the in-step/alone ratio is reported."""
    summary = normal_run["profiler"].summary()
    assert summary["student_forward_alone_ms"] > 0
    expected = summary["student_forward_ms"] / summary["student_forward_alone_ms"]
    assert summary["student_forward_slowdown"] == pytest.approx(expected)
    assert "slowdown" in normal_run["profiler"].table()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gc_interval": -1}, "gc_interval=-1 must be an integer >= 0"),
        ({"window": 1}, "window=1 must be an integer >= 2"),
        (
            {"growth_threshold_mb_per_step": 0},
            "growth_threshold_mb_per_step=0 must be a number > 0",
        ),
        ({"on_growth": "crash"}, "on_growth='crash' is not one of warn, stop"),
    ],
)
def test_manual_gc_rejects_bad_arguments(kwargs, match):
    """Each bad ManualGC argument is named with the allowed values."""
    from callbacks import ManualGC

    with pytest.raises(ValueError, match=match):
        ManualGC(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps=0 must be a positive integer"),
        ({"warmup_steps": -2}, "warmup_steps=-2 must be an integer >= 0"),
        ({"slowdown_threshold": 0.5}, "slowdown_threshold=0.5 must be >= 1"),
    ],
)
def test_latency_profiler_rejects_bad_arguments(kwargs, match):
    """Each bad LatencyProfiler argument is named with the allowed values."""
    from callbacks import LatencyProfiler

    with pytest.raises(ValueError, match=match):
        LatencyProfiler(**kwargs)


def test_manual_gc_state_round_trip_resumes_the_window():
    """Samples and the fired alarm survive state_dict/load_state_dict; the rate is refitted."""
    from callbacks import ManualGC

    first = ManualGC(window=4)
    for step, rss in enumerate([100.0, 103.0, 106.0]):
        first._samples.append((step, rss, None))
    first._fired = True
    resumed = ManualGC(window=4)
    resumed.load_state_dict(first.state_dict())
    assert list(resumed._samples) == list(first._samples)
    assert resumed._fired
    assert resumed.growth_rates() == {"host": pytest.approx(3.0)}


def test_least_squares_slope_matches_a_hand_computed_fit():
    """Slope of (0,1),(1,2),(2,4): sum((x-1)(y-7/3))/sum((x-1)^2) = 3/2."""
    from callbacks.manual_gc import least_squares_slope

    assert least_squares_slope([0, 1, 2], [1, 2, 4]) == pytest.approx(1.5)
    assert least_squares_slope([5], [1]) == 0.0


def test_importing_callbacks_is_cheap():
    """`import callbacks` loads neither Lightning, megatron-core nor ModelOpt."""
    import subprocess
    import sys

    code = (
        "import sys, callbacks; "
        "print(sorted(m for m in ('lightning', 'megatron', 'modelopt') if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == "[]"
