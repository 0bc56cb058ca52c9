"""``ManualGC``: Megatron-LM's ``--manual-gc`` as a Lightning callback, with a memory-growth alarm.

Python's automatic garbage collector pauses at unpredictable moments; across data-parallel ranks
one rank's pause stalls every collective. Megatron-LM's ``--manual-gc`` disables it and collects
every ``--manual-gc-interval`` steps instead. The price: anything kept alive only by a reference
cycle lives until the next collection, and memory grows between collections.

This callback does the same and watches memory per step (host RSS through psutil and, on CUDA,
``torch.cuda.memory_allocated``). When a least-squares line over the last ``window`` steps rises
faster than ``growth_threshold_mb_per_step`` it warns with the growth rate and the step at which
memory would run out, and with ``on_growth="stop"`` saves a checkpoint and stops the fit.

Megatron-LM refuses ``--manual-gc`` with ModelOpt distillation (an unexplained per-micro-batch
leak). :mod:`bench.memory_growth` measures it on our stack: on CPU (megatron-core 0.16.1,
ModelOpt 0.47.0) distillation leaves no tensor that only the collector frees, and its RSS grows no
faster under manual GC than the student's alone, so this callback allows it and keeps watching.
"""

from __future__ import annotations

import gc
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from kd_module.parallel.collectives import all_gather_object
from kd_module.rules import Problems
from kd_module.upstream.lightning import callback_state_key

ON_GROWTH = ("warn", "stop")
_MB = 1024 * 1024

DISTILLATION_GC_WARNING = (
    "ManualGC: manual garbage collection with a ModelOpt DistillationModel. Known issue "
    "(Megatron-LM distillation, which refuses --manual-gc for it): a model converted to a ModelOpt "
    "DynamicModule was reported to leave a few MB per micro-batch that only the garbage collector "
    "frees, which can run out of memory between collections. bench.memory_growth found none on "
    "this stack on CPU; on GPU, keep gc_interval moderate and growth detection on (it warns, or "
    "with on_growth='stop' checkpoints and stops, when memory keeps growing)."
)


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line through ``(xs, ys)`` (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx


def host_rss_mb() -> float:
    """This process's resident set size in MB."""
    return psutil.Process().memory_info().rss / _MB


def _distills(pl_module: Any) -> bool:
    """Whether the module trains a ModelOpt DistillationModel (checked before it is built)."""
    from kd_module.training.module import DistillationModule

    return isinstance(pl_module, DistillationModule)


class ManualGC(L.Callback):
    """Disable automatic GC during fit, collect every ``gc_interval`` steps, alarm on growth.

    Args:
        gc_interval: run ``gc.collect()`` after every this many training steps; ``0`` never
            during training (Megatron-LM's ``--manual-gc-interval 0``: only around validation).
        gc_at_validation: also collect at validation start and end.
        window: steps in the sliding window the growth rate is fitted over (at least 2).
        growth_threshold_mb_per_step: a fitted rate above this (MB per training step) is growth.
        on_growth: ``"warn"``, or ``"stop"`` to save a checkpoint and stop the fit cleanly.
        checkpoint_dir: where ``on_growth="stop"`` saves (default
            ``<trainer.default_root_dir>/checkpoints``).
        watch_gpu: also watch ``torch.cuda.memory_allocated`` when CUDA is in use.

    Raises:
        ValueError: for a negative interval, a window below 2, a non-positive threshold or an
            unknown ``on_growth``.

    Examples:
        Python::

            trainer = L.Trainer(callbacks=[ManualGC(gc_interval=100, on_growth="stop")], ...)

        CLI (nemo-run recipe)::

            nemo llm distill ... trainer.callbacks='[run.Config(ManualGC, gc_interval=100)]'
    """

    def __init__(
        self,
        gc_interval: int = 100,
        gc_at_validation: bool = True,
        window: int = 50,
        growth_threshold_mb_per_step: float = 1.0,
        on_growth: str = "warn",
        checkpoint_dir: str | Path | None = None,
        watch_gpu: bool = True,
    ) -> None:
        problems = Problems()
        problems.int_at_least("gc_interval", gc_interval, 0, hint=" (0: never)")
        problems.int_at_least("window", window, 2, hint=" (steps fitted)")
        problems.positive_number("growth_threshold_mb_per_step", growth_threshold_mb_per_step)
        problems.one_of("on_growth", on_growth, ON_GROWTH)
        problems.raise_if_any("ManualGC")
        self.gc_interval = gc_interval
        self.gc_at_validation = gc_at_validation
        self.window = window
        self.growth_threshold_mb_per_step = float(growth_threshold_mb_per_step)
        self.on_growth = on_growth
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.watch_gpu = watch_gpu
        self._samples: deque[tuple[int, float, float | None]] = deque(maxlen=window)
        self._fired = False
        self._gc_was_enabled: bool | None = None
        self._growth: dict[str, Any] | None = None
        self._checkpoint_path: Path | None = None

    @property
    def state_key(self) -> str:
        return callback_state_key(
            self,
            gc_interval=self.gc_interval,
            window=self.window,
            growth_threshold_mb_per_step=self.growth_threshold_mb_per_step,
        )

    @property
    def growth(self) -> dict[str, Any] | None:
        """The growth that fired the alarm (rate, projection, step), or ``None``."""
        return self._growth

    @property
    def checkpoint_path(self) -> Path | None:
        """Where ``on_growth="stop"`` saved its checkpoint, or ``None``."""
        return self._checkpoint_path

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and _distills(pl_module):
            rank_zero_warn(DISTILLATION_GC_WARNING)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        rank_zero_info(
            f"ManualGC: automatic garbage collection disabled; collecting every "
            f"{self.gc_interval or 'no'} steps"
        )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore_gc()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_gc()

    def _restore_gc(self) -> None:
        if self._gc_was_enabled:
            gc.enable()
        self._gc_was_enabled = None

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.gc_at_validation:
            gc.collect()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.gc_at_validation:
            gc.collect()

    # ------------------------------------------------------------------ per step
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.gc_interval and step % self.gc_interval == 0:
            gc.collect()
        self._samples.append((step, host_rss_mb(), self._gpu_allocated_mb(pl_module)))
        if self._fired or len(self._samples) < self.window:
            return
        growth = trainer.strategy.broadcast(self._worst_growth(trainer), src=0)
        if growth is None:
            return
        self._fired = True
        self._growth = growth
        rank_zero_warn(self._message(growth))
        if self.on_growth == "stop":
            path = self._checkpoint_dir(trainer) / f"manual_gc-growth-step={step}.ckpt"
            trainer.save_checkpoint(path)
            self._checkpoint_path = path
            trainer.should_stop = True
            rank_zero_info(f"ManualGC: checkpoint saved to {path}; stopping the fit")

    def _gpu_allocated_mb(self, pl_module: Any) -> float | None:
        device = pl_module.device
        if not self.watch_gpu or device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(device) / _MB

    def growth_rates(self) -> dict[str, float]:
        """Fitted MB/step of host RSS (and GPU allocated memory) over the current window."""
        steps = [float(sample[0]) for sample in self._samples]
        rates = {"host": least_squares_slope(steps, [sample[1] for sample in self._samples])}
        if self._samples and self._samples[-1][2] is not None:
            rates["gpu"] = least_squares_slope(steps, [float(s[2] or 0) for s in self._samples])
        return rates

    def _local_growth(self, step: int) -> dict[str, Any] | None:
        """The fastest growing memory on this rank when above the threshold, else ``None``."""
        rates = self.growth_rates()
        memory, rate = max(rates.items(), key=lambda item: item[1])
        if rate <= self.growth_threshold_mb_per_step:
            return None
        if memory == "host":
            headroom = psutil.virtual_memory().available / _MB
        else:
            device = torch.cuda.current_device()
            total = torch.cuda.get_device_properties(device).total_memory / _MB
            headroom = total - float(self._samples[-1][2] or 0)
        return {
            "memory": memory,
            "mb_per_step": rate,
            "headroom_mb": headroom,
            "step": step,
            "projected_oom_step": step + int(headroom / rate),
        }

    def _worst_growth(self, trainer: Any) -> dict[str, Any] | None:
        """The fastest growth over all ranks (every rank computes the same answer)."""
        local = self._local_growth(trainer.global_step)
        if trainer.world_size == 1:
            return local
        found = [growth for growth in all_gather_object(local) if growth is not None]
        return max(found, key=lambda growth: growth["mb_per_step"]) if found else None

    def _message(self, growth: dict[str, Any]) -> str:
        memory = "host RSS" if growth["memory"] == "host" else "GPU allocated memory"
        action = "saving a checkpoint and stopping" if self.on_growth == "stop" else "continuing"
        return (
            f"ManualGC: {memory} grows {growth['mb_per_step']:.2f} MB/step over the last "
            f"{self.window} steps (threshold {self.growth_threshold_mb_per_step} MB/step); "
            f"{growth['headroom_mb']:.0f} MB left runs out at about step "
            f"{growth['projected_oom_step']}. Collect more often (gc_interval={self.gc_interval}) "
            f"or find what is kept alive by reference cycles; {action}."
        )

    def _checkpoint_dir(self, trainer: Any) -> Path:
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        return Path(trainer.default_root_dir) / "checkpoints"

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "samples": [list(sample) for sample in self._samples],
            "fired": self._fired,
            "growth": self._growth,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._samples = deque(
            (tuple(sample) for sample in state_dict.get("samples", [])), maxlen=self.window
        )
        self._fired = bool(state_dict.get("fired", False))
        self._growth = state_dict.get("growth")
