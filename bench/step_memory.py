"""Benchmark: peak memory of a whole KD training step, per logits loss implementation.

A KD forward-backward (megatron's schedule through
``kd_module.distillation.model.forward_backward(objective="kd")``) on a ``DistillationModel`` at
a 131072-entry vocabulary, student width 512, 4096 tokens, for each ``logit_loss_impl``:
``chunked`` (today's path: both output layers make full logits, the chunked loss reads them),
``fused`` (no full logits) and ``modelopt`` (ModelOpt's ``LogitsKLLoss`` on the logits). Each
implementation builds its own model from the same seeds, runs one unmeasured step, then one
measured step; the peak is the growth of the resident set over the measured step (see
:mod:`bench._common`), so weights and optimizer state are not in it, the step's activations,
logits and gradients are. Reported with the reported ``kd_loss`` of each (all equal within fp32
rounding), ``memory_ratio = fused / chunked`` and ``time_ratio``, the same for the measured
step's wall time (one step: read it as a rough guide, ``bench.kd_overhead`` repeats its steps).
``--vocab`` sets both models' vocabulary, to see where fusing starts to pay.

The last line of stdout is one JSON object::

    {"machine": {...}, "settings": {...}, "results": {"chunked": {"peak_mb": ..., ...}, ...},
     "memory_ratio": ..., "time_ratio": ..., "targets": {...}}

Examples:
    .venv/bin/python -m bench.step_memory
    .venv/bin/python -m bench.step_memory --quick
    .venv/bin/python -m bench.step_memory --impls chunked fused --vocab 32768
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Any

import torch

from bench._common import machine_description, measure
from kd_module.models.gpt import GPTModelConfig

MEMORY_TARGET = 0.5
"""Whole-step peak memory of the fused path against today's (chunked) path (issue #19)."""
IMPLS = ("chunked", "fused", "modelopt")
STUDENT_SEED, TEACHER_SEED, DATA_SEED = 1, 2, 3

FULL_STUDENT = GPTModelConfig(
    num_layers=2,
    hidden_size=512,
    num_attention_heads=8,
    seq_length=2048,
    vocab_size=131072,
    share_embeddings_and_output_weights=False,
)
FULL_TEACHER = FULL_STUDENT.replace(num_layers=2, hidden_size=768, num_attention_heads=12)
QUICK_STUDENT = FULL_STUDENT.replace(hidden_size=32, num_attention_heads=4, seq_length=64)
QUICK_TEACHER = QUICK_STUDENT.replace(hidden_size=48)
QUICK_STUDENT = QUICK_STUDENT.replace(vocab_size=4096)
QUICK_TEACHER = QUICK_TEACHER.replace(vocab_size=4096)
MICRO_BATCH_SIZE = 2
"""Samples per micro-batch: 2 x 2048 = 4096 tokens (one micro-batch per step)."""


def _batch(student: GPTModelConfig, device: Any) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    seq, size = student.seq_length, MICRO_BATCH_SIZE
    tokens = torch.randint(0, student.vocab_size, (size, seq + 1), generator=generator)
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(size, seq),
        "position_ids": torch.arange(seq).expand(size, seq).contiguous(),
    }
    return [{key: value.to(device) for key, value in batch.items()}]


def measure_impl(
    impl: str, student: GPTModelConfig, teacher: GPTModelConfig, skip_lm_loss: bool
) -> dict[str, Any]:
    """One implementation: build, one warm-up step, one measured step (megatron initialized)."""
    from kd_module.distillation.config import DistillConfig
    from kd_module.distillation.model import build_distillation_model, forward_backward
    from kd_module.parallel import runtime
    from tests.helpers import init_weights_by_global_key

    device = runtime.run_device()
    distill = DistillConfig(logit_loss_impl=impl, skip_lm_loss=skip_lm_loss)
    model = build_distillation_model(
        student,
        teacher,
        distill,
        student_init=lambda m: init_weights_by_global_key(m, seed=STUDENT_SEED),
        teacher_loader=lambda m: init_weights_by_global_key(m, seed=TEACHER_SEED),
    ).model
    model.train()
    batches = _batch(student, device)

    def step() -> dict[str, torch.Tensor]:
        for param in model.parameters():
            param.grad = None
        return forward_backward(model, iter(batches), 1, student.seq_length, MICRO_BATCH_SIZE)

    step()  # first-call allocations and lazy imports, and the gradients' first allocation
    gc.collect()
    report, peak, seconds = measure(step, torch.device(device))
    kd_loss = report["kd_loss"]
    result = {
        "peak_mb": round(peak, 1),
        "step_s": round(seconds, 3),
        "kd_loss": float(kd_loss[0] / kd_loss[1]),
        "lm_loss": float(report["lm_loss"][0] / report["lm_loss"][1]),
    }
    return result


def fused_over_chunked(results: dict[str, dict[str, Any]]) -> tuple[float | None, float | None]:
    """``(memory_ratio, time_ratio)`` of the fused step over the chunked one; None where unknown.

    Each ratio stands on its own: at --quick sizes the chunked step can add no RSS at all (its
    pages were kept from the warm-up step), which leaves no memory ratio but still a time ratio.
    """
    if "fused" not in results or "chunked" not in results:
        return None, None
    fused, chunked = results["fused"], results["chunked"]
    memory = round(fused["peak_mb"] / chunked["peak_mb"], 4) if chunked["peak_mb"] > 0 else None
    time = round(fused["step_s"] / chunked["step_s"], 4) if chunked["step_s"] > 0 else None
    return memory, time


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON summary as the last line of stdout."""
    from kd_module.parallel.runtime import destroy_distributed, initialize_distributed

    parser = argparse.ArgumentParser(prog="python -m bench.step_memory", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI (seconds)")
    parser.add_argument(
        "--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations"
    )
    parser.add_argument(
        "--lm-loss", action="store_true", help="train on the LM loss too (skip_lm_loss: false)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="both models' vocabulary (default: 131072, or 4096 with --quick)",
    )
    options = parser.parse_args(argv)
    student, teacher = (
        (QUICK_STUDENT, QUICK_TEACHER) if options.quick else (FULL_STUDENT, FULL_TEACHER)
    )
    if options.vocab is not None:
        from kd_module.data.tokenizers import padded_vocab_size

        align = student.make_vocab_size_divisible_by
        # A size megatron would pad is refused: both models' tables would be larger than asked.
        if options.vocab < 1 or padded_vocab_size(options.vocab, align) != options.vocab:
            parser.error(
                f"--vocab {options.vocab}: give a positive multiple of {align} "
                "(make_vocab_size_divisible_by)"
            )
        student = student.replace(vocab_size=options.vocab)
        teacher = teacher.replace(vocab_size=options.vocab)
    torch.set_num_threads(options.threads)
    initialize_distributed(seed=1234)
    results = {}
    try:
        for impl in options.impls:
            results[impl] = measure_impl(impl, student, teacher, not options.lm_loss)
            gc.collect()  # the model built for this implementation is gone before the next
            print(f"[bench.step_memory] {impl}: {results[impl]}", file=sys.stderr, flush=True)
    finally:
        destroy_distributed()
    ratio, time_ratio = fused_over_chunked(results)
    summary = {
        "benchmark": "peak memory of one KD forward-backward step per logit_loss_impl",
        "machine": machine_description(),
        "settings": {
            "student": {
                k: getattr(student, k)
                for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
            },
            "teacher": {
                k: getattr(teacher, k)
                for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
            },
            "tokens_per_step": student.seq_length * MICRO_BATCH_SIZE,
            "seq_length": student.seq_length,
            "micro_batch_size": MICRO_BATCH_SIZE,
            "skip_lm_loss": not options.lm_loss,
            "dtype": "float32",
            "quick": options.quick,
            "peak_memory": "peak RSS growth over the measured step (CPU) / "
            "max_memory_allocated growth (CUDA)",
        },
        "results": results,
        "memory_ratio": ratio,
        "time_ratio": time_ratio,
        "targets": {
            "memory_ratio_target": MEMORY_TARGET,
            "memory_ratio_met": ratio is not None and ratio <= MEMORY_TARGET,
        },
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
