"""Benchmark: the chunked logits KD loss against ModelOpt's ``LogitsKLLoss``.

For each vocabulary size, token count and tensor-parallel size it runs forward + backward of
``LogitsKDLoss("forward_kl", temperature=1)`` and of ModelOpt's ``LogitsKLLoss`` (autograd
backward) on the same bf16 vocab-parallel logits, and reports the peak memory each adds (MB, see
:mod:`bench._common`), their wall times, and the largest absolute difference of the per-token
losses and of the student gradients. TP=2 cases run on two gloo ranks through
``kd_module.testing.run_distributed``; a case's memory and time are the worst rank's. Cases run
one at a time.

The last line of stdout is one JSON object::

    {"machine": {...}, "settings": {...}, "cases": [{"vocab": ..., "tokens": ..., "tp": ...,
     "ours_peak_mb": ..., "reference_peak_mb": ..., "memory_ratio": ..., "ours_time_s": ...,
     "reference_time_s": ..., "time_ratio": ..., "max_abs_diff": ..., ...}, ...],
     "targets": {...}}

Examples:
    .venv/bin/python -m bench.kd_loss --quick
    .venv/bin/python -m bench.kd_loss --vocab 131072 --tokens 4096 --tp 1
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from types import SimpleNamespace
from typing import Any

import torch

from bench._common import machine_description, measure

FULL_VOCABS = (32768, 131072)
FULL_TOKENS = (1024, 4096)
QUICK_VOCABS = (1024, 4096)
QUICK_TOKENS = (64, 256)
TP_SIZES = (1, 2)
MEMORY_TARGET = 0.25
TIME_TARGET = 1.0
SEED = 1234


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shard_logits(tokens: int, local_vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    """bf16 logits [tokens, 1, local_vocab], filled in slices so no full fp32 copy exists."""
    logits = torch.empty(tokens, 1, local_vocab, dtype=torch.bfloat16, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    step = max(1, (64 * 1024 * 1024) // (4 * local_vocab))
    for start in range(0, tokens, step):
        rows = logits[start : start + step]
        rows.copy_(torch.randn(rows.shape, generator=generator, device=device) * 2.0)
    return logits


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, step: int = 256) -> float:
    """Largest |a - b| computed in row slices (the gradients can be GBs)."""
    worst = 0.0
    for start in range(0, a.shape[0], step):
        diff = (a[start : start + step].float() - b[start : start + step].float()).abs()
        worst = max(worst, diff.max().item())
    return worst


def run_case(vocab: int, tokens: int, tp: int, rank: int = 0) -> dict[str, Any]:
    """Measure one case on this rank (under TP, megatron must already be initialized)."""
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    from kd_module.losses import LogitsKDLoss

    device = _device()
    local_vocab = vocab // tp
    student = _shard_logits(tokens, local_vocab, SEED + 2 * rank, device).requires_grad_(True)
    teacher = _shard_logits(tokens, local_vocab, SEED + 2 * rank + 1, device)
    ours_fn = LogitsKDLoss("forward_kl", temperature=1.0)
    reference_fn = LogitsKLLoss(
        SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=False), temperature=1.0
    )

    def ours() -> torch.Tensor:
        loss = ours_fn(student, teacher)
        loss.sum().backward()
        return loss.detach()

    def reference() -> torch.Tensor:
        loss = reference_fn(student, teacher)[0]  # [b, s], this rank's vocab share when TP > 1
        loss.sum().backward()
        return loss.detach().transpose(0, 1)

    # Warm up both paths (first-call allocations, lazy imports) on a few tokens.
    ours_fn(student[:8], teacher[:8]).sum().backward()
    reference_fn(student[:8], teacher[:8])[0].sum().backward()
    student.grad = None
    gc.collect()
    ours_loss, ours_peak, ours_time = measure(ours, device)
    ours_grad, student.grad = student.grad, None
    gc.collect()
    reference_loss, reference_peak, reference_time = measure(reference, device)
    if tp > 1:
        torch.distributed.all_reduce(reference_loss)  # ModelOpt leaves the TP sum to its caller
    loss_diff = (ours_loss - reference_loss).abs().max().item()
    grad_diff = _max_abs_diff(ours_grad, student.grad)
    return {
        "ours_peak_mb": ours_peak,
        "reference_peak_mb": reference_peak,
        "ours_time_s": ours_time,
        "reference_time_s": reference_time,
        "max_abs_diff_loss": loss_diff,
        "max_abs_diff_grad": grad_diff,
    }


def tp_rank_cases(cases: list[tuple[int, int]], tp: int) -> list[dict[str, Any]]:
    """One rank of a TP run: every (vocab, tokens) case in turn."""
    from kd_module.runtime import initialize_distributed

    initialize_distributed(tensor_model_parallel_size=tp)
    rank = torch.distributed.get_rank()
    return [run_case(vocab, tokens, tp, rank) for vocab, tokens in cases]


def _summarize(vocab: int, tokens: int, tp: int, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst rank's memory and time, largest difference; ratios ours / reference."""
    ours_peak = max(r["ours_peak_mb"] for r in per_rank)
    reference_peak = max(r["reference_peak_mb"] for r in per_rank)
    ours_time = max(r["ours_time_s"] for r in per_rank)
    reference_time = max(r["reference_time_s"] for r in per_rank)
    loss_diff = max(r["max_abs_diff_loss"] for r in per_rank)
    grad_diff = max(r["max_abs_diff_grad"] for r in per_rank)
    return {
        "vocab": vocab,
        "tokens": tokens,
        "tp": tp,
        "ours_peak_mb": round(ours_peak, 1),
        "reference_peak_mb": round(reference_peak, 1),
        "memory_ratio": round(ours_peak / reference_peak, 4) if reference_peak > 0 else None,
        "ours_time_s": round(ours_time, 3),
        "reference_time_s": round(reference_time, 3),
        "time_ratio": round(ours_time / reference_time, 4) if reference_time > 0 else None,
        "max_abs_diff": max(loss_diff, grad_diff),
        "max_abs_diff_loss": loss_diff,
        "max_abs_diff_grad": grad_diff,
    }


def _targets(cases: list[dict[str, Any]]) -> dict[str, Any]:
    largest = [c for c in cases if c["vocab"] == 131072 and c["tokens"] == 4096]
    return {
        "memory_ratio_target": MEMORY_TARGET,
        "time_ratio_target": TIME_TARGET,
        "memory_ratio_met_at_131072x4096": (
            all(c["memory_ratio"] <= MEMORY_TARGET for c in largest) if largest else None
        ),
        "time_ratio_met_everywhere": all(
            c["time_ratio"] is not None and c["time_ratio"] <= TIME_TARGET for c in cases
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON summary as the last line of stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.kd_loss", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI (< ~60 s)")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (s * b)")
    parser.add_argument("--tp", type=int, nargs="+", default=list(TP_SIZES), help="TP sizes")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per TP launch")
    options = parser.parse_args(argv)
    vocabs = options.vocab or (QUICK_VOCABS if options.quick else FULL_VOCABS)
    token_counts = options.tokens or (QUICK_TOKENS if options.quick else FULL_TOKENS)
    grid = [(vocab, tokens) for vocab in vocabs for tokens in token_counts]

    results = []
    for tp in options.tp:
        bad = [vocab for vocab in vocabs if vocab % tp]
        if bad:
            parser.error(f"--vocab {bad} not divisible by --tp {tp}")
        print(f"[bench.kd_loss] TP={tp}: {grid}", file=sys.stderr, flush=True)
        if tp == 1:
            for vocab, tokens in grid:
                results.append(_summarize(vocab, tokens, 1, [run_case(vocab, tokens, 1)]))
                print(f"[bench.kd_loss] {results[-1]}", file=sys.stderr, flush=True)
        else:
            from kd_module.testing import run_distributed

            # By name: under ``python -m`` this module is ``__main__``, which ranks cannot import.
            target = "bench.kd_loss:tp_rank_cases"
            per_rank = run_distributed(target, tp, grid, tp, timeout=options.timeout)
            for index, (vocab, tokens) in enumerate(grid):
                ranks = [rank_results[index] for rank_results in per_rank]
                results.append(_summarize(vocab, tokens, tp, ranks))
                print(f"[bench.kd_loss] {results[-1]}", file=sys.stderr, flush=True)

    summary = {
        "benchmark": "logits KD loss forward+backward: kd_module LogitsKDLoss vs ModelOpt "
        "LogitsKLLoss",
        "machine": machine_description(),
        "settings": {
            "loss_type": "forward_kl",
            "temperature": 1.0,
            "dtype": "bfloat16",
            "chunk_size": 1024,
            "quick": options.quick,
            "peak_memory": "peak RSS growth over the call (CPU) / max_memory_allocated (CUDA)",
        },
        "cases": results,
        "targets": _targets(results),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
