"""The offline KD loss: :func:`offline_topk_kd_loss`, student logits against a cached teacher's
top-k, either renormalized over the top-k (equal to ``LogitsKDLoss(top_k=k)``) or with a tail
bucket that keeps the teacher's probability mass outside the top-k; vocab-parallel and chunked."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch import Tensor

from kd_module.distillation.losses import resolve_tp_group, vocab_parallel_max
from kd_module.rules import Problems

OFFLINE_LOSS_MODES = ("renormalized", "tail")
"""How :func:`offline_topk_kd_loss` treats the vocabulary outside the teacher's top-k."""


def _gather_student(student: Tensor, indices: Tensor) -> Tensor:
    """Student logits at global vocabulary ``indices`` from a vocab-parallel shard (autograd).

    Each rank gathers the entries it owns and zeros the rest; the sum over the TP group (identity
    in backward, megatron's ``reduce_from_tensor_model_parallel_region``) assembles them.
    """
    group = resolve_tp_group()
    local_vocab = student.shape[-1]
    if group is None:
        return torch.gather(student, -1, indices)
    local = indices - dist.get_rank(group) * local_vocab
    owned = (local >= 0) & (local < local_vocab)
    picked = torch.gather(student, -1, local.clamp(0, local_vocab - 1))
    return reduce_from_tensor_model_parallel_region(picked.masked_fill(~owned, 0.0))


class _VocabParallelLogSumExps(torch.autograd.Function):
    """Log-sum-exp of vocab-parallel logits over the whole vocabulary and over its tail.

    The tail is the vocabulary without each token's ``excluded`` entries (the teacher's top-k).
    Computing ``log q_tail`` from the tail's own sum, rather than as ``log(1 - sum_i q_i)``,
    keeps it exact when the student's top-k mass is close to 1. Chunked over tokens, one fp32
    chunk of exponentials at a time; backward recomputes them (as ``LogitsKDLoss`` does).
    Only this rank's first ``valid`` columns count (the rest are padding beyond the shared
    vocabulary; their gradient is zero); ``valid`` may be 0.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, excluded: Tensor, chunk: int, valid: int
    ) -> tuple[Tensor, Tensor]:
        group = resolve_tp_group()
        full, logits = logits, logits[:, :valid]
        rows = logits.shape[0]
        shift = vocab_parallel_max(logits, chunk, group)
        sums = torch.zeros(2, rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows if valid else 0, chunk):
            end = start + chunk
            exp = torch.exp(logits[start:end].float() - shift[start:end, None])
            sums[0, start:end] = exp.sum(dim=-1)
            target, any_owned = _excluded_targets(excluded[start:end])
            zeros = torch.where(any_owned, 0.0, exp.gather(-1, target))
            sums[1, start:end] = exp.scatter_(-1, target, zeros).sum(dim=-1)
        if group is not None:
            dist.all_reduce(sums, group=group)
        lse = shift + torch.log(sums)  # the tail's is -inf when it is empty
        ctx.save_for_backward(full, excluded, lse)
        ctx.chunk, ctx.valid = chunk, valid
        return lse[0], lse[1]

    @staticmethod
    def backward(ctx: Any, grad_all: Tensor, grad_tail: Tensor) -> tuple:
        full, excluded, lse = ctx.saved_tensors
        valid = ctx.valid
        logits = full[:, :valid]
        # d lse_all / dx = softmax; d lse_tail / dx = softmax * exp(lse_all - lse_tail) on the
        # tail, 0 on excluded entries. The exponent is capped: beyond exp(80) the tail's mass is
        # below fp32's range anyway.
        ratio = torch.exp((lse[0] - lse[1]).clamp(max=80.0))
        tail_scale = torch.where(torch.isfinite(lse[1]), grad_tail.float() * ratio, 0.0)
        grad_all = grad_all.float()
        full_grad = torch.empty_like(full)
        full_grad[:, valid:].zero_()
        grad = full_grad[:, :valid]
        for start in range(0, logits.shape[0] if valid else 0, ctx.chunk):
            end = start + ctx.chunk
            softmax = torch.exp(logits[start:end].float() - lse[0, start:end, None])
            chunk_grad = softmax * (grad_all[start:end] + tail_scale[start:end])[:, None]
            target, any_owned = _excluded_targets(excluded[start:end])
            fixed = torch.where(
                any_owned,
                softmax.gather(-1, target) * grad_all[start:end, None],
                chunk_grad.gather(-1, target),
            )
            grad[start:end] = chunk_grad.scatter_(-1, target, fixed).to(grad.dtype)
        return full_grad, None, None, None


def _excluded_targets(excluded: Tensor) -> tuple[Tensor, Tensor]:
    """Columns to overwrite for each row's excluded entries, safe for one ``scatter_``.

    ``excluded`` holds local vocabulary indices, -1 for entries on another TP rank. Those -1
    slots are pointed at a column the same row really excludes (so every write to a column
    carries the same value); a row excluding nothing locally points all its slots at column 0,
    which the caller rewrites with its own value.

    Returns:
        ``(target [rows, k], any_owned [rows, 1])``.
    """
    owned = excluded >= 0
    any_owned = owned.any(dim=-1, keepdim=True)
    first = torch.where(owned, excluded, torch.full_like(excluded, torch.iinfo(excluded.dtype).max))
    first = torch.where(any_owned, first.amin(dim=-1, keepdim=True), 0)
    return torch.where(owned, excluded, first), any_owned


def _student_log_sum_exps(
    student: Tensor, indices: Tensor, chunk: int, shared_vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Differentiable full-vocabulary and tail log-sum-exps of vocab-parallel logits.

    Args:
        student: [..., v_local] logits (this rank's contiguous vocabulary shard).
        indices: [..., k] global vocabulary indices excluded from the tail.
        chunk: tokens per chunk.
        shared_vocab_size: only columns below it count; ``None``: all of them.

    Returns:
        fp32 ``(lse_all, lse_tail)``, each [...], identical on every TP rank.
    """
    group = resolve_tp_group()
    local_vocab = student.shape[-1]
    rank = 0 if group is None else dist.get_rank(group)
    local = indices - rank * local_vocab
    valid = local_vocab
    if shared_vocab_size is not None:
        valid = min(max(shared_vocab_size - rank * local_vocab, 0), local_vocab)
    local = torch.where((local >= 0) & (local < valid), local, torch.full_like(local, -1))
    flat = student.reshape(-1, local_vocab)
    lse_all, lse_tail = _VocabParallelLogSumExps.apply(
        flat, local.reshape(flat.shape[0], -1), chunk, valid
    )
    return lse_all.reshape(student.shape[:-1]), lse_tail.reshape(student.shape[:-1])


def _x_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``p * (log p - log q)`` with ``0 * anything = 0``."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def offline_topk_kd_loss(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    mode: str = "renormalized",
    chunk_size: int = 1024,
    shared_vocab_size: int | None = None,
) -> Tensor:
    """Per-token forward KL ``KL(teacher || student)`` against cached teacher top-k logits.

    Modes:

    - ``"renormalized"``: both distributions restricted to the teacher's top-k entries and
      renormalized over them, after dividing by ``temperature``; equals
      ``LogitsKDLoss("forward_kl", temperature, top_k=k)`` up to the rounding of the stored values.
      ``lse`` is unused.
    - ``"tail"``: the teacher's full-distribution probabilities ``p_i = exp(v_i - lse)`` on the
      top-k and one tail bucket holding the rest, ``p_tail = 1 - sum_i p_i``; the student likewise
      ``q_i = softmax(student)_i`` over the full vocabulary and ``q_tail`` the softmax mass of the
      other entries (computed from their own log-sum-exp, exact even when tiny). The loss
      is ``sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)``: the exact KL between the two
      distributions coarsened to k + 1 outcomes, a lower bound of the full-vocabulary KL (it
      ignores how each side spreads its tail mass) and equal to it when the teacher's tail is
      empty. Only ``temperature=1``: the cache holds the raw logits' log-sum-exp, and the
      log-sum-exp of ``logits / T`` cannot be recovered from it.

    Args:
        student_logits: [s, b, v_local], the student's logits or this rank's vocabulary shard.
        values: [s, b, k] cached teacher top-k logits (any float dtype; used in fp32).
        indices: [s, b, k] their global vocabulary indices.
        lse: [s, b] cached teacher full log-sum-exp (``"tail"`` only).
        temperature: logits are divided by this before the softmax (no ``T**2`` factor).
        mode: one of :data:`OFFLINE_LOSS_MODES`.
        chunk_size: tokens per chunk of the student's log-sum-exps (``"tail"``), which never
            hold an fp32 copy of all the logits.
        shared_vocab_size: the real vocabulary teacher and student share (the tokenizer's
            size, the cache's ``shared_vocab_size``): student columns at or beyond it (padding)
            are left out of its log-sum-exp and tail, and get no gradient. ``None``: the
            student's whole padded vocabulary. The cached indices must be below it (a cache
            written with the same ``shared_vocab_size`` guarantees that).

    Note:
        :meth:`TeacherCache.lookup` returns ``[b, s, ...]``; transpose its outputs with
        ``.transpose(0, 1)`` to the student's ``[s, b]`` token order.

    Returns:
        fp32 [s, b], identical on every TP rank; gradients flow to ``student_logits`` only.

    Raises:
        ValueError: on an unknown mode, ``temperature != 1`` with ``"tail"``, or mismatched shapes.

    Examples:
        >>> values, indices, lse = (t.transpose(0, 1) for t in cache.lookup(sample_index))
        >>> per_token = offline_topk_kd_loss(student_logits, values, indices, lse, mode="tail")
    """
    problems = Problems()
    problems.one_of("mode", mode, OFFLINE_LOSS_MODES)
    if problems.positive_number("temperature", temperature) and mode == "tail" and temperature != 1:
        problems.append(
            f"temperature={temperature!r} needs mode='renormalized': the cache stores the "
            "log-sum-exp of the raw logits, so the tail mass at another temperature is unknown"
        )
    token_shape = tuple(student_logits.shape[:-1])
    if tuple(values.shape) != tuple(indices.shape) or tuple(values.shape[:-1]) != token_shape:
        problems.append(
            f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must be "
            f"[*{list(token_shape)}, k] like the student logits {tuple(student_logits.shape)}"
        )
    if mode == "tail" and tuple(lse.shape) != token_shape:
        problems.append(f"lse {tuple(lse.shape)} must be {list(token_shape)}")
    if shared_vocab_size is not None:
        problems.positive_int("shared_vocab_size", shared_vocab_size)
    if problems:
        raise ValueError("offline_topk_kd_loss: " + "; ".join(problems))
    student = _gather_student(student_logits, indices.long()).float()
    teacher = values.detach().float()
    if mode == "renormalized":
        log_q = torch.log_softmax(student / temperature, dim=-1)
        log_p = torch.log_softmax(teacher / temperature, dim=-1)
        return _x_log_ratio(log_p.exp(), log_p, log_q).sum(dim=-1)
    log_p = teacher - lse.detach().float().unsqueeze(-1)
    lse_all, lse_tail = _student_log_sum_exps(
        student_logits, indices.long(), chunk_size, shared_vocab_size
    )
    log_q = student - lse_all.unsqueeze(-1)
    p = log_p.exp()
    top = _x_log_ratio(p, log_p, log_q).sum(dim=-1)
    # The teacher's tail mass from its stored log-sum-exp (clamped: rounding can push the top-k
    # sum just past 1); the student's directly from its tail log-sum-exp.
    tail_p = (1.0 - p.sum(dim=-1)).clamp_min(0.0)
    # k = the whole vocabulary: no tail on either side, whatever rounding left in 1 - sum(p).
    tail_p = torch.where(torch.isfinite(lse_tail), tail_p, torch.zeros_like(tail_p))
    log_tail_p = torch.log(tail_p.clamp_min(torch.finfo(torch.float32).tiny))
    tail = _x_log_ratio(tail_p, log_tail_p, lse_tail - lse_all)
    return top + tail
