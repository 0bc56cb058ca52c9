"""Benchmark: host memory growth per micro-batch with and without manual garbage collection.

Megatron-LM's distillation lists a known issue: converting a model to a ModelOpt
``DistillationModel`` allocates a few MB per micro-batch that only the garbage collector frees,
so ``--manual-gc`` runs out of memory. This benchmark measures it on our stack: tiny
``DistillationModule`` (student + teacher) and ``GPTModule`` (student alone) fits on mock data,
each once with Python's automatic GC and once under :class:`callbacks.ManualGC` with
``gc_interval=0`` (no collection at all during training, the worst case).

For each case it reports the host RSS growth (least-squares slope over the second half of the
run, so that lazy first-step allocations do not count) as ``mb_per_100_microbatches``, and for
the manual-GC cases what one collection at the end finds unreachable: objects per micro-batch,
the most common types, and the bytes of tensors among them (``gc.DEBUG_SAVEALL``).

The last line of stdout is one JSON object::

    {"machine": {...}, "settings": {...},
     "distillation": {"manual_gc": {"mb_per_100_microbatches": ...,
                                    "garbage_objects_per_microbatch": ..., "garbage_tensor_mb": ...,
                                    "garbage_types": {...}, ...},
                      "automatic_gc": {...}},
     "student": {"manual_gc": {...}, "automatic_gc": {...}}}

Examples:
    .venv/bin/python -m bench.memory_growth --quick
    .venv/bin/python -m bench.memory_growth --microbatches 500
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import warnings
from collections import Counter
from typing import Any

import torch

from bench._common import machine_description

FULL_MICROBATCHES = 500
QUICK_MICROBATCHES = 12
MICRO_BATCH_SIZE = 2
GLOBAL_BATCH_SIZE = 4
SEQ_LENGTH = 64
_MB = 1024 * 1024


def _configs() -> tuple[Any, Any]:
    from kd_module.models.gpt import GPTModelConfig

    student = GPTModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=SEQ_LENGTH,
        vocab_size=1024,
    )
    return student, student.replace(num_layers=4, hidden_size=128, ffn_hidden_size=256)


def _memory_recorder(manual_gc: bool) -> Any:
    import lightning as L

    from callbacks.manual_gc import host_rss_mb

    class MemoryRecorder(L.Callback):
        """RSS after every step; with manual GC, what one final collection finds unreachable."""

        def __init__(self) -> None:
            self.rss_mb: list[float] = []
            self.garbage: dict[str, Any] = {}

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.rss_mb.append(host_rss_mb())

        def on_train_end(self, trainer: Any, *args: Any) -> None:
            if not manual_gc:
                return
            # ManualGC keeps automatic collection off until on_fit_end: everything that only a
            # collection frees is still here.
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                found = gc.collect()
                types = Counter(type(obj).__name__ for obj in gc.garbage)
                tensor_bytes = sum(
                    obj.numel() * obj.element_size()
                    for obj in gc.garbage
                    if torch.is_tensor(obj) and not obj.is_meta
                )
            finally:
                gc.garbage.clear()
                gc.set_debug(0)
                gc.collect()
            self.garbage = {
                "objects": found,
                "types": dict(types.most_common(8)),
                "tensor_mb": tensor_bytes / _MB,
            }

    return MemoryRecorder()


def _slope(values: list[float]) -> float:
    from callbacks.manual_gc import least_squares_slope

    return least_squares_slope([float(i) for i in range(len(values))], values)


def run_case(distillation: bool, manual_gc: bool, microbatches: int) -> dict[str, Any]:
    """One fit of ``microbatches`` micro-batches; returns its memory growth figures."""
    import lightning as L

    from callbacks import ManualGC
    from kd_module.data import GPTDataModule
    from kd_module.training.module import DistillationModule, GPTModule
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy
    from tests.helpers import init_weights_by_global_key

    student, teacher = _configs()
    optimizer = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2)
    if distillation:
        module: Any = DistillationModule(
            student,
            teacher,
            optimizer=optimizer,
            student_init_fn=lambda m: init_weights_by_global_key(m, seed=1),
            teacher_init_fn=lambda m: init_weights_by_global_key(m, seed=2, std=0.3),
        )
    else:
        module = GPTModule(
            student,
            optimizer=optimizer,
            student_init_fn=lambda m: init_weights_by_global_key(m, seed=1),
        )
    per_step = GLOBAL_BATCH_SIZE // MICRO_BATCH_SIZE
    steps = max(2, microbatches // per_step)
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ_LENGTH,
        micro_batch_size=MICRO_BATCH_SIZE,
        global_batch_size=GLOBAL_BATCH_SIZE,
        num_train_samples=steps * GLOBAL_BATCH_SIZE,
        num_val_samples=GLOBAL_BATCH_SIZE,
    )
    recorder = _memory_recorder(manual_gc)
    callbacks: list[Any] = [recorder]
    if manual_gc:
        # Never collect during training: the growth between collections, at its worst.
        callbacks.insert(0, ManualGC(gc_interval=0, gc_at_validation=False, window=steps + 1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    rss = recorder.rss_mb
    steady = rss[len(rss) // 2 :] if len(rss) >= 4 else rss
    result: dict[str, Any] = {
        "microbatches": steps * per_step,
        "mb_per_100_microbatches": _slope(steady) / per_step * 100,
        "rss_start_mb": rss[0],
        "rss_end_mb": rss[-1],
    }
    if manual_gc:
        garbage = recorder.garbage
        result["garbage_objects_per_microbatch"] = garbage["objects"] / (steps * per_step)
        result["garbage_tensor_mb"] = garbage["tensor_mb"]
        result["garbage_types"] = garbage["types"]
    del trainer, module
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a few micro-batches (CI smoke)")
    parser.add_argument("--microbatches", type=int, default=None, help="micro-batches per case")
    args = parser.parse_args(argv)
    microbatches = args.microbatches or (QUICK_MICROBATCHES if args.quick else FULL_MICROBATCHES)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    summary: dict[str, Any] = {
        "machine": machine_description(),
        "settings": {
            "microbatches": microbatches,
            "micro_batch_size": MICRO_BATCH_SIZE,
            "global_batch_size": GLOBAL_BATCH_SIZE,
            "seq_length": SEQ_LENGTH,
            "manual_gc_interval": 0,
        },
    }
    for name, distillation in (("distillation", True), ("student", False)):
        summary[name] = {}
        for label, manual in (("manual_gc", True), ("automatic_gc", False)):
            case = run_case(distillation, manual, microbatches)
            summary[name][label] = case
            print(f"{name} {label}: {json.dumps(case)}", flush=True)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
