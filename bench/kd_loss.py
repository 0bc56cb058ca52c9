"""Benchmark: the chunked logits KD loss against ModelOpt's ``LogitsKLLoss``.

For each vocabulary size, token count and tensor-parallel size it runs forward + backward of
``LogitsKDLoss("forward_kl", temperature=1)`` and of ModelOpt's ``LogitsKLLoss`` (autograd
backward) on the same bf16 vocab-parallel logits, and reports the peak memory each adds (MB, see
:mod:`bench._common`), their wall times, and the largest absolute difference of the per-token
losses and of the student gradients. The ``fused_*`` columns start one step earlier, from both
models' hidden states and output weights: ``LogitsKDLoss.forward_from_hidden`` (projections
inside the loss, gradients computed in its forward as the model path does; the
``fused_recomputed_*`` columns recompute the projections in backward instead) against both
projections then ModelOpt's ``LogitsKLLoss``. TP=2 cases run on
two gloo ranks through ``tests.helpers.run_distributed``; a case's memory and time are the worst
rank's. Cases run one at a time.

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
FUSED_MEMORY_TARGET = 0.10
"""Fused projections + loss against ModelOpt's projections + ``LogitsKLLoss`` (issue #19)."""
FUSED_TIME_TARGET = 1.0
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

    from kd_module.distillation.losses import LogitsKDLoss

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


def run_fused_case(tokens: int, vocab: int, tp: int, hidden: int, rank: int = 0) -> dict[str, Any]:
    """Extra columns: both output projections fused into the loss, against ModelOpt's path.

    Inputs are bf16 hidden states [tokens, 1, hidden] of the student and of the teacher (the same
    on every rank) and this rank's shards [vocab / tp, hidden] of both output weights. ModelOpt's
    path projects both (student with autograd, teacher without, as the teacher runs under
    ``no_grad``), then ``LogitsKLLoss``; ours is ``LogitsKDLoss.forward_from_hidden``. Both
    backpropagate into the student's hidden states and weight.
    """
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    from kd_module.distillation.losses import LogitsKDLoss, LossWeights

    device = _device()
    local_vocab = vocab // tp
    generator = torch.Generator(device=device).manual_seed(SEED)
    student_hidden = torch.randn(tokens, 1, hidden, generator=generator, device=device)
    student_hidden = student_hidden.bfloat16().requires_grad_(True)
    teacher_hidden = torch.randn(tokens, 1, hidden, generator=generator, device=device).bfloat16()
    student_weight = (_shard_logits(local_vocab, hidden, SEED + 10 + rank, device) * 0.05).squeeze(
        1
    )
    student_weight = student_weight.detach().requires_grad_(True)
    teacher_weight = (_shard_logits(local_vocab, hidden, SEED + 20 + rank, device) * 0.05).squeeze(
        1
    )
    loss_fn = LogitsKDLoss("forward_kl", temperature=1.0)
    modelopt_fn = LogitsKLLoss(
        SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=False), temperature=1.0
    )
    # The objective below is loss.sum(): every token weighs 1, which the model path's loss mask
    # tells the pass in the same way.
    told = LossWeights(torch.ones(tokens, 1, device=device))

    def fused(loss_weights: LossWeights | None = told) -> torch.Tensor:
        loss, _ = loss_fn.forward_from_hidden(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            loss_weights=loss_weights,
        )
        loss.sum().backward()
        return loss.detach()

    def modelopt() -> torch.Tensor:
        inputs = student_hidden
        if tp > 1:  # what ColumnParallelLinear does to its input's gradient
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            inputs = copy_to_tensor_model_parallel_region(student_hidden)
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.t()
        loss = modelopt_fn(inputs @ student_weight.t(), teacher_logits)[0]
        del teacher_logits
        loss.sum().backward()
        loss = loss.detach().transpose(0, 1)
        if tp > 1:
            torch.distributed.all_reduce(loss)  # ModelOpt leaves the TP sum to its caller
        return loss

    loss_fn.forward_from_hidden(
        student_hidden[:8], student_weight, teacher_hidden[:8], teacher_weight
    )[0].sum().backward()
    student_hidden.grad = student_weight.grad = None
    gc.collect()
    fused_loss, fused_peak, fused_time = measure(fused, device)
    fused_grads = (student_hidden.grad, student_weight.grad)
    student_hidden.grad = student_weight.grad = None
    gc.collect()
    _, recomputed_peak, recomputed_time = measure(lambda: fused(None), device)
    recomputed_diff = max(
        _max_abs_diff(fused_grads[0], student_hidden.grad),
        _max_abs_diff(fused_grads[1], student_weight.grad),
    )
    student_hidden.grad = student_weight.grad = None
    gc.collect()
    modelopt_loss, modelopt_peak, modelopt_time = measure(modelopt, device)
    diff = max(
        (fused_loss - modelopt_loss).abs().max().item(),
        _max_abs_diff(fused_grads[0], student_hidden.grad),
        _max_abs_diff(fused_grads[1], student_weight.grad),
    )
    ways = dict(loss_fn.fused_backwards)
    if ways != {"precomputed": 1, "recomputed": 2}:  # the warm-up recomputes too
        raise RuntimeError(f"bench.kd_loss: unexpected fused backward ways {ways}")
    return {
        "fused_hidden": hidden,
        "fused_peak_mb": fused_peak,
        "modelopt_projected_peak_mb": modelopt_peak,
        "fused_time_s": fused_time,
        "modelopt_projected_time_s": modelopt_time,
        "fused_max_abs_diff": diff,
        "fused_recomputed_peak_mb": recomputed_peak,
        "fused_recomputed_time_s": recomputed_time,
        "fused_recomputed_max_abs_diff": recomputed_diff,
    }


def _case(
    vocab: int, tokens: int, tp: int, fused_hidden: int, rank: int = 0, fused_only: bool = False
) -> dict[str, Any]:
    if fused_only:
        return run_fused_case(tokens, vocab, tp, fused_hidden, rank)
    result = run_case(vocab, tokens, tp, rank)
    if fused_hidden:
        result.update(run_fused_case(tokens, vocab, tp, fused_hidden, rank))
    return result


def tp_rank_cases(
    cases: list[tuple[int, int]], tp: int, fused_hidden: int, fused_only: bool = False
) -> list[dict[str, Any]]:
    """One rank of a TP run: every (vocab, tokens) case in turn."""
    from kd_module.parallel.runtime import initialize_distributed

    initialize_distributed(tensor_model_parallel_size=tp)
    rank = torch.distributed.get_rank()
    return [_case(vocab, tokens, tp, fused_hidden, rank, fused_only) for vocab, tokens in cases]


def _summarize(vocab: int, tokens: int, tp: int, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst rank's memory and time, largest difference; ratios ours / reference."""
    if "ours_peak_mb" not in per_rank[0]:  # --fused-only
        return {"vocab": vocab, "tokens": tokens, "tp": tp, **_summarize_fused(per_rank)}
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
        **_summarize_fused(per_rank),
    }


def _summarize_fused(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    if "fused_peak_mb" not in per_rank[0]:
        return {}
    fused_peak = max(r["fused_peak_mb"] for r in per_rank)
    modelopt_peak = max(r["modelopt_projected_peak_mb"] for r in per_rank)
    fused_time = max(r["fused_time_s"] for r in per_rank)
    modelopt_time = max(r["modelopt_projected_time_s"] for r in per_rank)
    return {
        "fused_hidden": per_rank[0]["fused_hidden"],
        "fused_peak_mb": round(fused_peak, 1),
        "modelopt_projected_peak_mb": round(modelopt_peak, 1),
        "fused_memory_ratio": round(fused_peak / modelopt_peak, 4) if modelopt_peak > 0 else None,
        "fused_time_s": round(fused_time, 3),
        "modelopt_projected_time_s": round(modelopt_time, 3),
        "fused_time_ratio": round(fused_time / modelopt_time, 4) if modelopt_time > 0 else None,
        "fused_max_abs_diff": max(r["fused_max_abs_diff"] for r in per_rank),
        "fused_recomputed_peak_mb": round(max(r["fused_recomputed_peak_mb"] for r in per_rank), 1),
        "fused_recomputed_time_s": round(max(r["fused_recomputed_time_s"] for r in per_rank), 3),
        "fused_recomputed_time_ratio": (
            round(max(r["fused_recomputed_time_s"] for r in per_rank) / modelopt_time, 4)
            if modelopt_time > 0
            else None
        ),
        "fused_recomputed_max_abs_diff": max(r["fused_recomputed_max_abs_diff"] for r in per_rank),
    }


def _targets(cases: list[dict[str, Any]]) -> dict[str, Any]:
    largest = [c for c in cases if c["vocab"] == 131072 and c["tokens"] == 4096]
    return {
        "memory_ratio_target": MEMORY_TARGET,
        "time_ratio_target": TIME_TARGET,
        "memory_ratio_met_at_131072x4096": (
            all(c["memory_ratio"] <= MEMORY_TARGET for c in largest)
            if largest and "memory_ratio" in largest[0]
            else None
        ),
        "time_ratio_met_everywhere": all(
            c.get("time_ratio") is not None and c["time_ratio"] <= TIME_TARGET for c in cases
        ),
        "fused_memory_ratio_target": FUSED_MEMORY_TARGET,
        "fused_time_ratio_target": FUSED_TIME_TARGET,
        "fused_memory_ratio_met_at_131072x4096": (
            all(c["fused_memory_ratio"] <= FUSED_MEMORY_TARGET for c in largest)
            if largest and "fused_memory_ratio" in largest[0]
            else None
        ),
        "fused_time_ratio_met_at_131072x4096": (
            all(c["fused_time_ratio"] <= FUSED_TIME_TARGET for c in largest)
            if largest and "fused_time_ratio" in largest[0]
            else None
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON summary as the last line of stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.kd_loss", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI (< ~60 s)")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (s * b)")
    parser.add_argument("--tp", type=int, nargs="+", default=list(TP_SIZES), help="TP sizes")
    parser.add_argument(
        "--fused-hidden",
        type=int,
        help="hidden size (student and teacher) of the fused-projection columns (0: skip; "
        "default 512, quick 32)",
    )
    parser.add_argument(
        "--fused-only",
        action="store_true",
        help="only the fused columns (the logits-loss comparison needs its own ~16 GB at "
        "131072 x 4096; run it separately on a 24 GB machine)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per TP launch")
    options = parser.parse_args(argv)
    vocabs = options.vocab or (QUICK_VOCABS if options.quick else FULL_VOCABS)
    token_counts = options.tokens or (QUICK_TOKENS if options.quick else FULL_TOKENS)
    if options.fused_hidden is None:
        options.fused_hidden = 32 if options.quick else 512
    grid = [(vocab, tokens) for vocab in vocabs for tokens in token_counts]

    results = []
    for tp in options.tp:
        bad = [vocab for vocab in vocabs if vocab % tp]
        if bad:
            parser.error(f"--vocab {bad} not divisible by --tp {tp}")
        print(f"[bench.kd_loss] TP={tp}: {grid}", file=sys.stderr, flush=True)
        if tp == 1:
            for vocab, tokens in grid:
                case = _case(vocab, tokens, 1, options.fused_hidden, fused_only=options.fused_only)
                results.append(_summarize(vocab, tokens, 1, [case]))
                print(f"[bench.kd_loss] {results[-1]}", file=sys.stderr, flush=True)
        else:
            from tests.helpers import run_distributed

            # By name: under ``python -m`` this module is ``__main__``, which ranks cannot import.
            target = "bench.kd_loss:tp_rank_cases"
            per_rank = run_distributed(
                target,
                tp,
                grid,
                tp,
                options.fused_hidden,
                options.fused_only,
                timeout=options.timeout,
            )
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
            "fused_hidden": options.fused_hidden,
            "fused_columns": "fused_*: LogitsKDLoss.forward_from_hidden (both output projections "
            "inside the chunked loss) vs modelopt_projected_*: both bf16 projections (student "
            "with autograd, teacher without) + ModelOpt LogitsKLLoss",
            "quick": options.quick,
            "fused_only": options.fused_only,
            "peak_memory": "peak RSS growth over the call (CPU) / max_memory_allocated (CUDA)",
        },
        "cases": results,
        "targets": _targets(results),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
