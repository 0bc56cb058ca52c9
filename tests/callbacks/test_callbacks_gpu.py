"""Callbacks on a GPU: device-memory growth detection and measurements (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from kd_module.models import GPTModelConfig

SEQ = 64
STUDENT = GPTModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=SEQ, vocab_size=512
)
TEACHER = STUDENT.replace(num_layers=4, hidden_size=128)


def _gpu_fit(callbacks, max_steps, leak_mb=0.0):
    import lightning as L

    from kd_module.data import GPTDataModule
    from kd_module.module import DistillationModule
    from kd_module.strategy import MegatronStrategy

    class DeviceLeaker(L.Callback):
        def __init__(self):
            self.kept = []

        def on_train_batch_end(self, *args):
            if leak_mb:
                self.kept.append(torch.ones(int(leak_mb * 1024 * 1024) // 4, device="cuda"))

    module = DistillationModule(STUDENT, TEACHER)
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=4,
        num_train_samples=max_steps * 4,
    )
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=MegatronStrategy(precision="bf16"),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[*callbacks, DeviceLeaker()],
    )
    trainer.fit(module, datamodule=data)
    return trainer, module


@pytest.mark.gpu
def test_device_memory_leak_is_detected_on_gpu():
    """A 32 MB/step device-memory leak is reported from torch.cuda.memory_allocated within 20%."""
    from callbacks import ManualGC

    manual_gc = ManualGC(gc_interval=5, window=10, growth_threshold_mb_per_step=4.0)
    with pytest.warns(UserWarning, match="MB/step"):
        _gpu_fit([manual_gc], max_steps=30, leak_mb=32.0)
    growth = manual_gc.growth
    assert growth is not None and growth["memory"] == "gpu", growth
    assert growth["mb_per_step"] == pytest.approx(32.0, rel=0.2)


@pytest.mark.gpu
def test_distillation_does_not_grow_device_memory_with_manual_gc():
    """Distillation under manual GC (no collections) keeps device memory flat on GPU."""
    from callbacks import ManualGC

    manual_gc = ManualGC(gc_interval=0, window=20, growth_threshold_mb_per_step=0.5)
    _gpu_fit([manual_gc], max_steps=60)
    assert manual_gc.growth is None, manual_gc.growth_rates()


@pytest.mark.gpu
def test_profiler_uses_cuda_events_and_reports_slowdown():
    """On GPU the profiler's phases are measured and the student slowdown ratio is reported."""
    from callbacks import LatencyProfiler

    profiler = LatencyProfiler(every_n_steps=2, warmup_steps=2)
    _gpu_fit([profiler], max_steps=10)
    summary = profiler.summary()
    assert summary["student_forward_slowdown"] > 0


def _optimizer_step_queuing(milliseconds):
    """A callback that makes each optimizer step queue ``milliseconds`` of GPU work at its end
    (after the step's last implicit synchronization); listed first, inside any profiler's
    wrapper. The work is a spinning kernel: a stand-in for asynchronous optimizer kernels."""
    import lightning as L

    from kd_module.testing import gpu_sleep

    class QueueAfterOptimizerStep(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            for optimizer in trainer.optimizers:
                original = optimizer.step

                def step(*args, _original=original, **kwargs):
                    result = _original(*args, **kwargs)
                    gpu_sleep(milliseconds)
                    return result

                optimizer.step = step

        def on_fit_end(self, trainer, pl_module):
            for optimizer in trainer.optimizers:
                optimizer.__dict__.pop("step", None)

    return QueueAfterOptimizerStep()


@pytest.mark.gpu
def test_step_time_and_tokens_per_s_include_queued_gpu_work():
    """tokens_per_s is measured over the step's GPU work: 500 ms queued at the end of each
    optimizer step are inside every step's time (an unsynchronized clock misses them, or pushes
    them into the next step's time: the first step shows it)."""
    _, module = _gpu_fit([_optimizer_step_queuing(500.0)], max_steps=4)
    assert len(module.step_times) == 4
    assert min(module.step_times) >= 0.5 * 0.9, module.step_times
    tokens = 4 * SEQ  # global batch x sequence length
    assert module.last_train_metrics["tokens_per_s"] == pytest.approx(
        tokens / module.step_times[-1], rel=1e-6
    )


@pytest.mark.gpu
def test_profiler_attributes_queued_gpu_work_to_its_phase():
    """With CUDA events, 500 ms of GPU work queued by the optimizer step count in the optimizer
    phase and in the step, and the phases still add up to the step."""
    from callbacks import LatencyProfiler

    profiler = LatencyProfiler(every_n_steps=1, warmup_steps=1)
    _gpu_fit([_optimizer_step_queuing(500.0), profiler], max_steps=4)
    summary = profiler.summary()
    assert summary["device"] == "cuda" and summary["profiled_steps"] == 3
    assert summary["phases_ms"]["optimizer"] >= 500.0 * 0.9, summary
    assert summary["step_ms"] >= summary["phases_ms"]["optimizer"]
    assert sum(summary["phases_ms"].values()) == pytest.approx(summary["step_ms"], rel=1e-6)
