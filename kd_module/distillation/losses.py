"""Memory-efficient, tensor-parallel logits distillation losses.

:class:`LogitsKDLoss` computes a per-token divergence between the student's and the teacher's
softmax distributions over the full vocabulary, for vocab-parallel logits (each tensor-parallel
rank holds a contiguous vocabulary shard, as megatron's ``ColumnParallelLinear`` output layer
produces them). Unlike ModelOpt's ``LogitsKLLoss``, which casts both full logits tensors to fp32
and lets autograd keep every intermediate, it never materializes fp32 copies of the whole
``[tokens x vocab]`` logits: a custom autograd function walks the tokens in chunks, reduces the
global softmax statistics across the TP group (per-token max and sum of exponentials, as
megatron's vocab-parallel cross entropy does), saves only per-token statistics, and recomputes
each chunk in backward.

Definitions (``p = softmax(logits / temperature)`` over the full vocabulary, no ``T**2`` factor,
as in ModelOpt):

- ``forward_kl``: ``KL(p_teacher || p_student)`` (ModelOpt's ``LogitsKLLoss``);
- ``reverse_kl``: ``KL(p_student || p_teacher)``;
- ``jsd``: generalized Jensen-Shannon divergence with ``m = beta * p_teacher + (1 - beta) *
  p_student``: ``beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m)``.

With ``top_k``, both distributions are restricted to the teacher's global top-k vocabulary
entries and renormalized over them before the divergence (``forward_kl`` then matches
ModelOpt's ``TopKLogitsKLLoss``).

:meth:`LogitsKDLoss.forward_from_hidden` also fuses both models' output projections into the
chunked loss (``hidden_states @ weight.T`` per chunk, student and teacher) and computes the
student's LM cross entropy in the same pass, so neither model's full logits ever exist.

Non-finite inputs: each token is computed on its own, so a NaN or ``+inf`` logit makes that
token's loss and gradient row NaN and leaves every other token untouched. A ``-inf`` logit is a
zero-probability entry: it contributes nothing where it sits in the distribution the expectation
is taken over, and makes the divergence ``+inf`` where the other distribution puts mass on it.
Empty inputs (no tokens) give an empty loss and an empty gradient without communicating.

Teacher and student with differently padded embedding tables (one tokenizer, e.g. Qwen2.5-7B's
152064 rows against Qwen2.5-0.5B's 151936 for 151665 tokens): with ``shared_vocab_size=N``
both distributions are taken over the real vocabulary ``[0, N)`` only; the padding columns are
left out on both sides and get an exactly zero gradient. Under tensor parallelism each rank
holds a contiguous shard of its own model's padded size, so the shards do not line up; each
token chunk of the teacher is gathered over the TP group and cut to the student's range (see
:class:`_VocabAlignment`), so the extra memory stays one ``[chunk_size, teacher_vocab]`` buffer.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from modelopt.torch.distill.plugins.megatron import BaseLoss
from torch import Tensor

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
FUSED_CHUNK_BYTES = 256 * 1024 * 1024
"""The fused pass keeps one fp32 ``[chunk, local_vocab]`` buffer within this: its chunk is
``chunk_size`` tokens or fewer (512 tokens at a 131072-entry shard, 1024 up to 65536 entries).
It holds about four such buffers at once (the two models' logits, the divergence's work space),
whatever the token count. Each chunk also adds its product into the ``[local_vocab, h]`` weight
gradient, a pass over that whole tensor, so smaller chunks cost time: at vocab 131072, width
512, 4096 tokens, 128 MiB (256 tokens) took 1.12x (bf16) and 1.07x (fp32) as long as 256 MiB,
and 512 MiB saved another 10% in bf16 for twice the memory (``bench/RESULTS.md``)."""

__all__ = [
    "LOSS_TYPES",
    "FusedLogitsLoss",
    "KDLogitsCriterion",
    "LogitsKDLoss",
    "LossWeights",
    "reference_logits_kd_loss",
    "vocab_parallel_cross_entropy_no_grad",
]


@dataclass(frozen=True)
class _KDSpec:
    """What to compute; shared by the forward and backward passes."""

    loss_type: str
    """One of :data:`LOSS_TYPES`."""
    temperature: float
    """Logits are divided by this before the softmax."""
    jsd_beta: float
    """Teacher weight of the JSD mixture."""
    chunk_size: int
    """Tokens processed at once."""


def resolve_tp_group(tp_group: Any = None) -> Any:
    """The explicit group, else megatron's TP group when TP > 1, else ``None`` (no comms)."""
    if tp_group is not None:
        return tp_group
    if (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_tensor_model_parallel_world_size() > 1
    ):
        return parallel_state.get_tensor_model_parallel_group()
    return None


def all_gather_last_dim(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """Each tensor gathered over ``group`` and concatenated along its last dimension, rank order.

    What the tensor-parallel top-k selections use to collect every rank's candidates; without a
    group (TP=1) the tensors come back unchanged.
    """
    world = _group_size(group)
    if world == 1:
        return list(tensors)
    out = []
    for tensor in tensors:
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(gathered, tensor.contiguous(), group=group)
        out.append(torch.cat(gathered, dim=-1))
    return out


def _group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(tensor: Tensor, op: Any, group: Any) -> Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _chunks(num_tokens: int, chunk_size: int) -> range:
    return range(0, num_tokens, chunk_size)


@dataclass(frozen=True)
class _VocabAlignment:
    """This rank's student columns inside the shared vocabulary, and where the teacher's are.

    The student's shard starts at global column ``start`` (``rank * v_local``); its first
    ``valid`` columns are below the shared vocabulary size, the rest are padding. When the
    teacher's shard width differs from the student's (and TP > 1), the teacher's columns for
    the same global range sit on up to two other ranks: each chunk of teacher tokens is
    all-gathered over the TP group and cut to ``[start, start + valid)``. That is exact (the
    values are only moved) and bounded (one ``[chunk, teacher_vocab]`` buffer per chunk, in the
    teacher's dtype); the chunk is gathered again in backward instead of being kept.
    """

    start: int
    """Global index of this rank's first student column."""
    valid: int
    """Student columns of this rank that are in the shared vocabulary (may be 0)."""
    gather: bool
    """Teacher shards do not line up with the student's: gather each chunk over ``group``."""
    group: Any
    """The tensor-parallel group (``None`` on one rank)."""


class _AlignedTeacher:
    """``teacher[rows]`` read as the student's valid columns, chunk by chunk.

    Stands in for the teacher tensor in the chunked loss loops, which only index rows and read
    ``shape``; every rank indexes the same chunks in the same order, so the gathers pair up.
    """

    def __init__(self, logits: Tensor, alignment: _VocabAlignment) -> None:
        self.logits = logits
        self.alignment = alignment
        self.shape = (logits.shape[0], alignment.valid)

    def __getitem__(self, rows: slice) -> Tensor:
        align = self.alignment
        chunk = self.logits[rows]
        if not align.gather:
            return chunk[:, : align.valid]
        (full,) = all_gather_last_dim([chunk], align.group)
        return full[:, align.start : align.start + align.valid]


def _aligned(student: Tensor, teacher: Tensor, alignment: _VocabAlignment | None) -> tuple:
    """The student's valid columns (a view) and the teacher read in the same columns."""
    if alignment is None:
        return student, teacher
    return student[:, : alignment.valid], _AlignedTeacher(teacher, alignment)


def _row_max(x: Tensor) -> Tensor:
    """Per-row maximum; ``-inf`` for a shard with no columns (only padding on this rank)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], -math.inf)
    return x.amax(dim=-1)


def vocab_parallel_max(logits: Tensor, chunk_size: int, group: Any) -> Tensor:
    """fp32 per-row maximum of [rows, v_local] vocab-parallel logits over the whole vocabulary.

    Read chunk by chunk in the logits' own dtype (the maximum needs no fp32 copy), then
    max-reduced over the TP group.
    """
    maxima = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in _chunks(logits.shape[0], chunk_size):
        maxima[start : start + chunk_size] = _row_max(logits[start : start + chunk_size])
    return _all_reduce(maxima, dist.ReduceOp.MAX, group)


@torch.no_grad()
def vocab_parallel_cross_entropy_no_grad(
    logits: Tensor, target: Tensor, chunk_size: int = 1024, tp_group: Any = None
) -> Tensor:
    """Per-token cross entropy of vocab-parallel logits, without autograd and without copying them.

    The values of megatron's ``tensor_parallel.vocab_parallel_cross_entropy`` (same steps: fp32,
    global max subtracted, ``log(sum exp) - target logit``, sums over the TP group), but the
    logits are only read: megatron's version overwrites ``logits.float()`` in place, which for
    fp32 logits is the caller's tensor, so using it for a logged-only loss means cloning the
    whole ``[tokens x vocab]`` tensor. Here the extra memory is one fp32
    ``[chunk_size, v_local]`` chunk.

    Args:
        logits: [..., v_local], this rank's contiguous vocabulary shard (rank ``r`` holds entries
            ``r * v_local`` to ``(r + 1) * v_local - 1``); any float dtype. Contiguous logits
            (what megatron's output layer returns) are read in place.
        target: [...] global vocabulary indices; an index outside the vocabulary contributes a
            target logit of 0, as in megatron.
        chunk_size: tokens per chunk.
        tp_group: the group the vocabulary is split across; ``None`` means megatron's
            tensor-parallel group when TP > 1, else no communication.

    Returns:
        fp32 [...] loss, identical on every TP rank, without an autograd graph.

    Raises:
        ValueError: when ``target``'s shape is not ``logits``' without the vocabulary dimension.
    """
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            "vocab_parallel_cross_entropy_no_grad: target must be the logits' shape without the "
            f"vocabulary dimension, got logits {tuple(logits.shape)} and target "
            f"{tuple(target.shape)}"
        )
    group = resolve_tp_group(tp_group)
    local_vocab = logits.shape[-1]
    flat = logits.reshape(-1, local_vocab)
    local_target = target.reshape(-1) - (0 if group is None else dist.get_rank(group)) * local_vocab
    owned = (local_target >= 0) & (local_target < local_vocab)
    local_target = local_target.clamp(0, max(local_vocab - 1, 0)).unsqueeze(-1)
    maxima = vocab_parallel_max(flat, chunk_size, group)
    # Row 0: sum of exp(logit - max); row 1: the target's logit - max (0 off this shard).
    sums = torch.zeros(2, flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in _chunks(flat.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        shifted = flat[rows].to(torch.float32, copy=True).sub_(maxima[rows].unsqueeze(-1))
        picked = shifted.gather(-1, local_target[rows]).squeeze(-1)
        sums[1, rows] = picked.masked_fill_(~owned[rows], 0.0)
        sums[0, rows] = shifted.exp_().sum(dim=-1)
        del shifted
    sum_exp, target_logit = _all_reduce(sums, dist.ReduceOp.SUM, group)
    return (torch.log(sum_exp) - target_logit).reshape(target.shape)


def _scaled_fp32(logits: Tensor, temperature: float) -> Tensor:
    """A fresh fp32 copy of a chunk, divided by the temperature."""
    out = logits.to(torch.float32, copy=True)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def _masked_product(weights: Tensor, values: Tensor) -> Tensor:
    """``weights * values`` in place in ``values``, with ``0 * anything = 0`` (``-inf`` logits)."""
    return values.mul_(weights).masked_fill_(weights == 0, 0.0)


def _masked_sum(weights: Tensor, values: Tensor) -> Tensor:
    """Per-row ``sum(weights * values)`` with ``0 * anything = 0``; overwrites ``values``."""
    return _masked_product(weights, values).sum(dim=-1)


def _nan_zeroed_sum(weights: Tensor, values: Tensor) -> Tensor:
    """:func:`_masked_sum` without the boolean mask, for sums next to a normalizer.

    A NaN product is either ``0 * inf`` (a ``-inf`` logit) or comes from a NaN input; the latter
    also makes the token's normalizer NaN, and the caller adds the normalizer to the loss, so
    zeroing NaN products cannot hide a NaN input. Saves a ``[chunk, vocab]`` bool buffer.
    """
    values.mul_(weights).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return values.sum(dim=-1)


def _row_sum_exp(x: Tensor, scratch: Tensor) -> Tensor:
    """Per-row ``sum(exp(x))`` through a small reused ``scratch`` buffer of rows.

    A fresh ``exp(x)`` would be a third ``[chunk, vocab]`` fp32 buffer; fresh per-block temporaries
    were seen to grow the CPU allocator's resident set instead of being reused.
    """
    step = scratch.shape[0]
    sums = []
    for start in range(0, x.shape[0], step):
        block = x[start : start + step]
        out = scratch[: block.shape[0]]
        torch.exp(block, out=out)
        sums.append(out.sum(dim=-1))
    return torch.cat(sums)


def _kl_forward(
    student: Tensor, teacher: Tensor, spec: _KDSpec, group: Any
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """KL(p || q) in one pass over the data, p = teacher (forward) or student (reverse).

    Per chunk and rank it keeps the local max ``m``, ``z = sum exp(x - m)`` of both sides and
    ``a = sum exp(p - m_p) * ((p - m_p) - (q - m_q))``; rescaled to the global maxima and summed
    over ranks, ``KL = A / Z_p - log Z_p + log Z_q``.
    """
    num_tokens = student.shape[0]
    stats = torch.empty(5, num_tokens, dtype=torch.float32, device=student.device)
    reverse = spec.loss_type == "reverse_kl"
    scratch = student.new_empty(
        min(64, spec.chunk_size, num_tokens), student.shape[-1], dtype=torch.float32
    )
    for start in _chunks(num_tokens, spec.chunk_size):
        rows = slice(start, start + spec.chunk_size)
        p = _scaled_fp32((student if reverse else teacher)[rows], spec.temperature)
        q = _scaled_fp32((teacher if reverse else student)[rows], spec.temperature)
        m_p = _row_max(p)
        m_q = _row_max(q)
        p.sub_(m_p.unsqueeze(-1))
        q.sub_(m_q.unsqueeze(-1))
        stats[3, rows] = m_q
        stats[4, rows] = _row_sum_exp(q, scratch)
        q.neg_().add_(p)  # q now holds the shifted difference (p - m_p) - (q - m_q)
        p.exp_()
        stats[0, rows] = m_p
        stats[1, rows] = p.sum(dim=-1)
        stats[2, rows] = _nan_zeroed_sum(p, q)
        del p, q
    m_p, z_p, a, m_q, z_q = stats
    global_max = _all_reduce(torch.stack([m_p, m_q]), dist.ReduceOp.MAX, group)
    local_shift = torch.stack([m_p, m_q]) - global_max
    scale_p, scale_q = torch.exp(local_shift)
    # Re-express each rank's shifted difference against the global maxima. A rank without
    # columns (z = 0, both shifts -inf) adds nothing: its 0 * (-inf - -inf) would be NaN.
    a = a + torch.where(z_p > 0, z_p * (local_shift[0] - local_shift[1]), 0.0)
    sums = _all_reduce(
        torch.stack([z_p * scale_p, a * scale_p, z_q * scale_q]), dist.ReduceOp.SUM, group
    )
    z_p, a, z_q = sums
    loss = a / z_p - torch.log(z_p) + torch.log(z_q)
    lse_p = global_max[0] + torch.log(z_p)
    lse_q = global_max[1] + torch.log(z_q)
    lse_student, lse_teacher = (lse_p, lse_q) if reverse else (lse_q, lse_p)
    return loss, (lse_student, lse_teacher, loss)


def _log_sum_exp(student: Tensor, teacher: Tensor, spec: _KDSpec, group: Any) -> Tensor:
    """Global per-token log-sum-exp of both sides, shape [2, tokens] (student, teacher)."""
    num_tokens = student.shape[0]
    local = torch.empty(2, 2, num_tokens, dtype=torch.float32, device=student.device)
    for start in _chunks(num_tokens, spec.chunk_size):
        rows = slice(start, start + spec.chunk_size)
        for side, logits in enumerate((student, teacher)):
            x = _scaled_fp32(logits[rows], spec.temperature)
            m = _row_max(x)
            local[0, side, rows] = m
            local[1, side, rows] = x.sub_(m.unsqueeze(-1)).exp_().sum(dim=-1)
            del x
    maxima = _all_reduce(local[0].clone(), dist.ReduceOp.MAX, group)
    sums = _all_reduce(local[1] * torch.exp(local[0] - maxima), dist.ReduceOp.SUM, group)
    return maxima + torch.log(sums)


def _log_mixture(log_p_teacher: Tensor, log_p_student: Tensor, beta: float) -> Tensor:
    return torch.logaddexp(log_p_teacher + math.log(beta), log_p_student + math.log1p(-beta))


def _jsd_forward(
    student: Tensor, teacher: Tensor, spec: _KDSpec, group: Any
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Generalized JSD in two passes: global log-sum-exp first, then the two KLs to the mixture."""
    lse = _log_sum_exp(student, teacher, spec, group)
    num_tokens = student.shape[0]
    partial = torch.empty(2, num_tokens, dtype=torch.float32, device=student.device)
    for start in _chunks(num_tokens, spec.chunk_size):
        rows = slice(start, start + spec.chunk_size)
        log_p_s = _scaled_fp32(student[rows], spec.temperature).sub_(lse[0, rows].unsqueeze(-1))
        log_p_t = _scaled_fp32(teacher[rows], spec.temperature).sub_(lse[1, rows].unsqueeze(-1))
        log_m = _log_mixture(log_p_t, log_p_s, spec.jsd_beta)
        partial[0, rows] = _masked_sum(log_p_t.exp(), log_p_t.sub_(log_m))
        partial[1, rows] = _masked_sum(log_p_s.exp(), log_p_s.sub_(log_m))
        del log_p_s, log_p_t, log_m
    kl_teacher_mix, kl_student_mix = _all_reduce(partial, dist.ReduceOp.SUM, group)
    beta = spec.jsd_beta
    loss = beta * kl_teacher_mix + (1.0 - beta) * kl_student_mix
    return loss, (lse[0], lse[1], kl_student_mix)


def _dense_forward(
    student: Tensor, teacher: Tensor, spec: _KDSpec, group: Any
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Per-token loss [tokens] and the per-token statistics backward needs."""
    if spec.loss_type == "jsd":
        return _jsd_forward(student, teacher, spec, group)
    return _kl_forward(student, teacher, spec, group)


def _dense_backward(
    student: Tensor,
    teacher: Tensor,
    spec: _KDSpec,
    stats: tuple[Tensor, ...],
    grad_loss: Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """Gradient w.r.t. the (local shard of the) student logits, recomputed chunk by chunk.

    With ``s = student / T`` and ``d_j`` the per-entry log-ratio of the distribution the
    expectation is over: forward KL ``p_s - p_t``; reverse KL ``p_s * (log p_s - log p_t - KL)``;
    JSD ``(1 - beta) * p_s * (log p_s - log m - KL(p_s || m))``; all divided by ``T``.
    Written into ``out`` when given (a view of a wider gradient), else into a new tensor.
    """
    lse_student, lse_teacher, extra = stats
    grad = torch.empty_like(student) if out is None else out
    scale = grad_loss.to(torch.float32) / spec.temperature
    for start in _chunks(student.shape[0], spec.chunk_size):
        rows = slice(start, start + spec.chunk_size)
        log_p_s = _scaled_fp32(student[rows], spec.temperature)
        log_p_s.sub_(lse_student[rows].unsqueeze(-1))
        log_p_t = _scaled_fp32(teacher[rows], spec.temperature)
        log_p_t.sub_(lse_teacher[rows].unsqueeze(-1))
        if spec.loss_type == "forward_kl":
            chunk_grad = log_p_s.exp_().sub_(log_p_t.exp_())
        else:
            if spec.loss_type == "reverse_kl":
                ratio = log_p_t.neg_().add_(log_p_s)
            else:
                ratio = log_p_s - _log_mixture(log_p_t, log_p_s, spec.jsd_beta)
            ratio.sub_(extra[rows].unsqueeze(-1))
            p_s = log_p_s.exp_()
            chunk_grad = _masked_product(p_s, ratio)
            if spec.loss_type == "jsd":
                chunk_grad.mul_(1.0 - spec.jsd_beta)
        grad[rows].copy_(chunk_grad.mul_(scale[rows].unsqueeze(-1)))
        del log_p_s, log_p_t, chunk_grad
    return grad


class _LogitsKDFunction(torch.autograd.Function):
    """Full-vocabulary loss on [tokens, local_vocab] logits; saves per-token statistics only.

    With an alignment, only the student's shared-vocabulary columns enter, against the teacher's
    same columns; the padding columns' gradient is zero.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        spec: _KDSpec,
        group: Any,
        alignment: _VocabAlignment | None = None,
    ) -> Tensor:
        loss, stats = _dense_forward(*_aligned(student, teacher, alignment), spec, group)
        ctx.spec, ctx.alignment = spec, alignment
        ctx.save_for_backward(student, teacher, *stats)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        student, teacher, *stats = ctx.saved_tensors
        alignment = ctx.alignment
        if alignment is None:
            grad = _dense_backward(student, teacher, ctx.spec, tuple(stats), grad_loss)
            return grad, None, None, None, None
        grad = torch.empty_like(student)
        grad[:, alignment.valid :].zero_()
        valid_student, aligned_teacher = _aligned(student, teacher, alignment)
        _dense_backward(
            valid_student,
            aligned_teacher,
            ctx.spec,
            tuple(stats),
            grad_loss,
            out=grad[:, : alignment.valid],
        )
        return grad, None, None, None, None


def _top_k_candidates(
    student: Tensor,
    teacher: Tensor,
    top_k: int,
    spec: _KDSpec,
    group: Any,
    alignment: _VocabAlignment | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's global top-k entries: (student values, teacher values, global vocab index).

    Each rank takes its local top-k (selection in the input dtype: widening is exact and the
    temperature is monotonic), the candidates are gathered over the TP group, and the global
    top-k is picked among them. Values are fp32 and divided by the temperature.

    With an alignment only the shared-vocabulary columns are candidates. A rank with fewer of
    them than the others fills its slots (the gather needs equal sizes) with ``-inf`` values and
    index -1, which no rank owns; with ``top_k`` at most the shared vocabulary they are never
    picked over a finite logit.
    """
    local_vocab = student.shape[-1]
    slots = min(top_k, local_vocab)
    rank = 0 if group is None else dist.get_rank(group)
    offset = rank * local_vocab
    student, teacher = _aligned(student, teacher, alignment)
    num_tokens, width = teacher.shape
    local_k = min(slots, width)
    device = student.device
    values = torch.empty(2, num_tokens, slots, dtype=torch.float32, device=device)
    index = torch.empty(num_tokens, slots, dtype=torch.int64, device=device)
    if local_k < slots:
        values[:, :, local_k:] = -math.inf
        index[:, local_k:] = -1
    for start in _chunks(num_tokens, spec.chunk_size):
        rows = slice(start, start + spec.chunk_size)
        top_teacher, top_index = torch.topk(teacher[rows], local_k, dim=-1)
        values[0, rows, :local_k] = torch.gather(student[rows], -1, top_index).float()
        values[1, rows, :local_k] = top_teacher.float()
        index[rows, :local_k] = top_index + offset
    values.div_(spec.temperature)
    values, index = all_gather_last_dim([values, index], group)
    _, pick = torch.topk(values[1], top_k, dim=-1)
    return (
        torch.gather(values[0], -1, pick),
        torch.gather(values[1], -1, pick),
        torch.gather(index, -1, pick),
    )


class _TopKLogitsKDFunction(torch.autograd.Function):
    """Loss restricted to the teacher's global top-k entries; gradient scattered to the shard."""

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        spec: _KDSpec,
        top_k: int,
        group: Any,
        alignment: _VocabAlignment | None = None,
    ) -> Tensor:
        top_student, top_teacher, index = _top_k_candidates(
            student, teacher, top_k, spec, group, alignment
        )
        inner = replace(spec, temperature=1.0)
        loss, stats = _dense_forward(top_student, top_teacher, inner, None)
        ctx.spec = inner
        ctx.temperature = spec.temperature
        ctx.student_meta = (student.shape, student.dtype, student.device)
        ctx.local_offset = (0 if group is None else dist.get_rank(group)) * student.shape[-1]
        ctx.save_for_backward(top_student, top_teacher, index, *stats)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        top_student, top_teacher, index, *stats = ctx.saved_tensors
        top_grad = _dense_backward(top_student, top_teacher, ctx.spec, tuple(stats), grad_loss)
        top_grad.div_(ctx.temperature)
        shape, dtype, device = ctx.student_meta
        local = index - ctx.local_offset
        owned = (local >= 0) & (local < shape[-1])
        grad = torch.zeros(shape, dtype=torch.float32, device=device)
        # Entries owned by other ranks are clamped onto this shard with a zero value; scatter_add
        # keeps them from overwriting an owned entry at the same position.
        grad.scatter_add_(-1, local.clamp(0, shape[-1] - 1), top_grad.masked_fill(~owned, 0.0))
        return grad.to(dtype), None, None, None, None, None


def _local_targets(labels: Tensor, local_vocab: int, group: Any) -> tuple[Tensor, Tensor]:
    """This rank's column of each label (clamped into the shard) and whether the rank owns it."""
    local = labels - (0 if group is None else dist.get_rank(group)) * local_vocab
    owned = (local >= 0) & (local < local_vocab)
    return local.clamp(0, max(local_vocab - 1, 0)), owned


def _chunk_cross_entropy(
    logits: Tensor, local_target: Tensor, owned: Tensor, group: Any
) -> tuple[Tensor, Tensor]:
    """Cross entropy and log-sum-exp (temperature 1) of one chunk of vocab-parallel logits.

    The steps of megatron's ``vocab_parallel_cross_entropy`` (fp32, global max subtracted,
    ``log(sum exp) - target logit``, sums over the TP group) on ``[chunk, v_local]`` logits.
    """
    shifted = logits.to(torch.float32, copy=True)
    maxima = _all_reduce(_row_max(shifted), dist.ReduceOp.MAX, group)
    shifted.sub_(maxima.unsqueeze(-1))
    sums = torch.empty(2, shifted.shape[0], dtype=torch.float32, device=shifted.device)
    picked = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    sums[1] = picked.masked_fill_(~owned, 0.0)
    sums[0] = shifted.exp_().sum(dim=-1)
    del shifted
    sum_exp, target_logit = _all_reduce(sums, dist.ReduceOp.SUM, group)
    log_sum_exp = torch.log(sum_exp)
    return log_sum_exp - target_logit, maxima + log_sum_exp


@dataclass(frozen=True)
class _FusedSpec:
    """What the fused pass computes besides the divergence (see :class:`_FusedKDFunction`)."""

    kd: _KDSpec
    """Divergence, temperature and chunk size."""
    top_k: int | None
    """Restrict the divergence to the teacher's global top-k entries, or ``None``."""
    with_lm_loss: bool
    """Also compute the student's cross entropy against the labels."""


@dataclass(frozen=True)
class LossWeights:
    """How backward will weight the fused pass's two per-token outputs, up to one constant.

    Given to :meth:`LogitsKDLoss.forward_from_hidden`, it lets the pass compute the student's
    projection gradients in its forward, while each chunk's logits are at hand, instead of
    recomputing both projections in backward (``2 * tokens * vocab * (h_s + h_t)`` flops, the
    fused path's only extra arithmetic). Backward checks that the incoming per-token gradients
    are ``c * kd * tokens`` and ``c * lm * tokens`` for one constant ``c`` and returns ``c`` times
    the precomputed gradients; when they are not (the caller weighted the tokens otherwise) it
    recomputes, with the same result. The idea is Liger-Kernel's fused linear losses, which
    compute the gradient in the forward; here it works with any downstream constant (the global
    token count, loss scaling, a balancer's factor) because backward learns the constant.

    Examples:
        >>> # objective = sum_t mask_t * (lm_t + 10 * kd_t) / N, with N known only later
        >>> weights = LossWeights(loss_mask.transpose(0, 1), kd=10.0, lm=1.0)
    """

    tokens: Tensor
    """[s, b] weight of each token in the objective (the loss mask), the hidden states' token
    layout (the whole sequence under sequence parallelism)."""
    kd: float = 1.0
    """The KD loss's weight relative to the tokens' weights."""
    lm: float = 0.0
    """The LM cross entropy's weight; 0 when it is only logged (or when there are no labels)."""


@dataclass
class _FusedGradients:
    """The student gradients a fused forward computed, for the weights it was given."""

    kd_weights: Tensor
    """[tokens] fp32, the KD loss's expected per-token gradient up to a constant."""
    lm_weights: Tensor | None
    """[tokens] fp32, the same for the LM cross entropy, or ``None`` (no gradient expected)."""
    hidden: Tensor
    """[tokens, h_s] in the hidden states' dtype, this rank's vocabulary shard's share."""
    weight: Tensor
    """[v_local, h_s] fp32."""


def _common_factor(
    grads: tuple[Tensor | None, Tensor | None], weights: tuple[Tensor, Tensor | None]
) -> float | None:
    """``c`` with ``grads[i] == c * weights[i]`` for both outputs (``None`` counts as zeros),
    to a relative 1e-5, or ``None`` when no such constant exists."""
    observed, expected = [], []
    for grad, weight in zip(grads, weights, strict=True):
        reference = grad if grad is not None else weight
        if reference is None:
            continue
        zeros = torch.zeros(reference.shape, dtype=torch.float64, device=reference.device)
        observed.append(zeros if grad is None else grad.to(torch.float64))
        expected.append(zeros if weight is None else weight.to(torch.float64))
    observed_all, expected_all = torch.cat(observed), torch.cat(expected)
    norm = expected_all.dot(expected_all)
    factor = observed_all.dot(expected_all) / norm.clamp(min=1e-300)
    error = (observed_all - factor * expected_all).abs().max()
    factor_value, error_value, size = torch.stack(
        [factor, error, observed_all.abs().max()]
    ).tolist()
    if norm.item() == 0.0:
        factor_value = 0.0
    return factor_value if error_value <= 1e-5 * size else None


def _fused_chunk_grad(
    student: Tensor,
    teacher: Tensor | None,
    top: tuple[Tensor, Tensor, Tensor] | None,
    stats: tuple[Tensor, ...],
    lm_log_sum_exp: Tensor,
    targets: tuple[Tensor, Tensor],
    kd_scale: Tensor | None,
    lm_scale: Tensor | None,
    spec: _FusedSpec,
    offset: int,
) -> Tensor:
    """``d(sum_t kd_scale_t * kd_t + lm_scale_t * lm_t) / d(student logits)`` of one chunk.

    Args:
        student: [chunk, v_local] student logits shard.
        teacher: the teacher's (full-vocabulary divergence), or ``None`` (top-k, or no KD term).
        top: the chunk's top-k selection ``(student values, teacher values, global index)``.
        stats: the divergence's per-token statistics of the chunk.
        lm_log_sum_exp: [chunk] the student's log-sum-exp at temperature 1.
        targets: [chunk] this rank's target column of each label and whether the rank owns it.
        kd_scale: [chunk] gradient of each token's divergence, or ``None``.
        lm_scale: [chunk] gradient of each token's cross entropy, or ``None``.
        spec: what the pass computes.
        offset: this rank's first global vocabulary index.

    Returns:
        fp32 [chunk, v_local].
    """
    local_vocab = student.shape[-1]
    if kd_scale is not None and top is None:
        # Every entry is written: no zero fill of a [chunk, v_local] buffer.
        grad = torch.empty(student.shape, dtype=torch.float32, device=student.device)
        _dense_backward(student, teacher, spec.kd, stats, kd_scale, out=grad)
    else:
        grad = torch.zeros(student.shape, dtype=torch.float32, device=student.device)
    if kd_scale is not None and top is not None:
        top_student, top_teacher, top_index = top
        inner = replace(spec.kd, temperature=1.0)
        top_grad = _dense_backward(top_student, top_teacher, inner, stats, kd_scale)
        local = top_index - offset
        owned = (local >= 0) & (local < local_vocab)
        grad.scatter_add_(
            -1,
            local.clamp(0, local_vocab - 1),
            top_grad.div_(spec.kd.temperature).masked_fill_(~owned, 0.0),
        )
    if lm_scale is not None:
        # d(cross entropy)/d(logits) = softmax(logits) - one_hot(target), times the incoming
        # gradient; the one-hot entry only on the rank that owns the target.
        local_target, owned = targets
        scale = lm_scale.to(torch.float32)
        probs = student.to(torch.float32, copy=True)
        probs.sub_(lm_log_sum_exp.unsqueeze(-1)).exp_().mul_(scale.unsqueeze(-1))
        grad.add_(probs)
        del probs
        grad.scatter_add_(
            -1, local_target.unsqueeze(-1), (-scale).masked_fill_(~owned, 0.0).unsqueeze(-1)
        )
    return grad


def _project_back(
    grad: Tensor, weight: Tensor, hidden: Tensor, grad_hidden: Tensor, grad_weight: Tensor
) -> None:
    """A chunk's logits gradient through the projection ``hidden @ weight.T``: written into
    ``grad_hidden`` (the chunk's rows), accumulated into the fp32 ``grad_weight``."""
    grad = grad.to(weight.dtype)
    torch.matmul(grad, weight, out=grad_hidden)
    if grad.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad.t(), hidden)
    else:  # bf16 / fp16 products, accumulated over the chunks in fp32
        grad_weight.add_(grad.t() @ hidden)


class _FusedKDFunction(torch.autograd.Function):
    """Both output projections, the divergence and the LM cross entropy in one chunked pass.

    Per chunk of tokens it computes the student's and the teacher's logits shards
    (``hidden[chunk] @ weight.T``), the chunk's divergence (full vocabulary or the teacher's
    top-k) and cross entropy, and drops the logits. Tokens are independent, so the per-chunk
    computation is exact. The hidden-state gradient is this rank's vocabulary shard's share; the
    caller sums it over the TP group (megatron's input mappings do).

    Backward, two ways:

    * With ``kd_weights`` (see :class:`LossWeights`) the forward also computes each chunk's
      logits gradient for those per-token weights and projects it back (``[tokens, h_s]`` and an
      fp32 ``[v_local, h_s]``); backward scales them by the constant it finds in the incoming
      gradients. The arithmetic is the unfused path's: no projection runs twice.
    * Otherwise, or when the incoming gradients are not proportional to the weights, backward
      recomputes each chunk's logits (both projections) from the per-token statistics the forward
      kept (and, for top-k, the ``[tokens, k]`` selection).

    ``counts`` (a :class:`collections.Counter`) tallies ``"precomputed"`` and ``"recomputed"``
    backward passes.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor,
        spec: _FusedSpec,
        group: Any,
        kd_weights: Tensor | None,
        lm_weights: Tensor | None,
        counts: Counter,
    ) -> tuple[Tensor, Tensor]:
        num_tokens, local_vocab = student_hidden.shape[0], student_weight.shape[0]
        chunk = spec.kd.chunk_size
        kd_losses, kd_stats, top_k_saved = [], [], []
        lm_loss = torch.zeros(num_tokens, dtype=torch.float32, device=student_hidden.device)
        lm_log_sum_exp = torch.zeros_like(lm_loss)
        targets = _local_targets(labels, local_vocab, group)
        inner = replace(spec.kd, temperature=1.0)
        offset = (0 if group is None else dist.get_rank(group)) * local_vocab
        gradients = None
        if kd_weights is not None:
            gradients = _FusedGradients(
                kd_weights,
                lm_weights,
                torch.empty_like(student_hidden),
                torch.zeros(
                    student_weight.shape, dtype=torch.float32, device=student_weight.device
                ),
            )
        for start in _chunks(num_tokens, chunk):
            rows = slice(start, start + chunk)
            student = student_hidden[rows] @ student_weight.t()
            teacher = teacher_hidden[rows] @ teacher_weight.t()
            top = None
            if spec.top_k is None:
                loss, stats = _dense_forward(student, teacher, spec.kd, group)
            else:
                top = _top_k_candidates(student, teacher, spec.top_k, spec.kd, group)
                teacher = None
                loss, stats = _dense_forward(top[0], top[1], inner, None)
                top_k_saved.append(top)
            kd_losses.append(loss)
            kd_stats.append(torch.stack(stats))
            if spec.with_lm_loss:
                lm_loss[rows], lm_log_sum_exp[rows] = _chunk_cross_entropy(
                    student, targets[0][rows], targets[1][rows], group
                )
            if gradients is not None:
                grad = _fused_chunk_grad(
                    student,
                    teacher,
                    top,
                    stats,
                    lm_log_sum_exp[rows],
                    (targets[0][rows], targets[1][rows]),
                    kd_weights[rows],
                    None if lm_weights is None else lm_weights[rows],
                    spec,
                    offset,
                )
                teacher = None
                _project_back(
                    grad,
                    student_weight,
                    student_hidden[rows],
                    gradients.hidden[rows],
                    gradients.weight,
                )
                del grad
            del student, teacher
        ctx.spec, ctx.group, ctx.gradients, ctx.counts = spec, group, gradients, counts
        ctx.set_materialize_grads(False)
        empty = student_hidden.new_empty(0)
        top_values = (
            torch.cat([torch.stack(pick[:2]) for pick in top_k_saved], dim=1)
            if top_k_saved
            else empty
        )
        top_index = torch.cat([pick[2] for pick in top_k_saved]) if top_k_saved else empty
        ctx.save_for_backward(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            torch.cat(kd_stats, dim=1),
            lm_log_sum_exp,
            top_values,
            top_index,
        )
        return torch.cat(kd_losses), lm_loss

    @staticmethod
    def backward(
        ctx: Any, grad_kd: Tensor | None, grad_lm: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        (
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            kd_stats,
            lm_log_sum_exp,
            top_values,
            top_index,
        ) = ctx.saved_tensors
        spec, group, gradients = ctx.spec, ctx.group, ctx.gradients
        unused = [None] * 8
        if grad_kd is None and grad_lm is None:
            return torch.zeros_like(student_hidden), torch.zeros_like(student_weight), *unused
        if gradients is not None:
            factor = _common_factor(
                (grad_kd, grad_lm), (gradients.kd_weights, gradients.lm_weights)
            )
            if factor is not None:
                ctx.counts["precomputed"] += 1
                return (
                    gradients.hidden.mul_(factor),
                    gradients.weight.mul_(factor).to(student_weight.dtype),
                    *unused,
                )
        ctx.counts["recomputed"] += 1
        num_tokens, local_vocab = student_hidden.shape[0], student_weight.shape[0]
        grad_hidden = torch.empty_like(student_hidden)
        grad_weight = torch.zeros(
            student_weight.shape, dtype=torch.float32, device=student_weight.device
        )
        local_target, owned = _local_targets(labels, local_vocab, group)
        offset = (0 if group is None else dist.get_rank(group)) * local_vocab
        dense_kd = grad_kd is not None and spec.top_k is None
        for start in _chunks(num_tokens, spec.kd.chunk_size):
            rows = slice(start, start + spec.kd.chunk_size)
            student = student_hidden[rows] @ student_weight.t()
            teacher = teacher_hidden[rows] @ teacher_weight.t() if dense_kd else None
            top = None
            if spec.top_k is not None:
                top = (top_values[0, rows], top_values[1, rows], top_index[rows])
            grad = _fused_chunk_grad(
                student,
                teacher,
                top,
                tuple(kd_stats[:, rows]),
                lm_log_sum_exp[rows],
                (local_target[rows], owned[rows]),
                None if grad_kd is None else grad_kd[rows],
                None if grad_lm is None else grad_lm[rows],
                spec,
                offset,
            )
            del student, teacher
            _project_back(
                grad, student_weight, student_hidden[rows], grad_hidden[rows], grad_weight
            )
            del grad
        return grad_hidden, grad_weight.to(student_weight.dtype), *unused


class LogitsKDLoss(torch.nn.Module):
    """Per-token KD loss between vocab-parallel student and teacher logits.

    Args:
        loss_type: ``"forward_kl"`` (``KL(teacher || student)``), ``"reverse_kl"``
            (``KL(student || teacher)``) or ``"jsd"`` (generalized Jensen-Shannon).
        temperature: logits are divided by this before the softmax (no ``T**2`` factor).
        jsd_beta: teacher weight of the JSD mixture ``beta * p_t + (1 - beta) * p_s``.
        top_k: restrict both distributions to the teacher's global top-k entries, or ``None``.
        chunk_size: tokens processed at once; peak extra memory is a few fp32
            ``[chunk_size, local_vocab]`` buffers.
        tp_group: process group the vocabulary is split across; ``None`` means megatron's
            tensor-parallel group when megatron is initialized with TP > 1, else no
            communication.
        shared_vocab_size: the real vocabulary both models share (the tokenizer's size ``N``):
            only entries ``[0, N)`` enter both distributions, the padding columns at or beyond
            ``N`` are left out and get a zero gradient, and the teacher's padded size may differ
            from the student's. ``None``: the whole padded vocabulary, the same on both sides.

    Raises:
        ValueError: naming every invalid argument.

    Examples:
        >>> loss_fn = LogitsKDLoss("forward_kl", temperature=2.0)
        >>> per_token = loss_fn(student_logits, teacher_logits)  # [s, b, v_local] -> [s, b]
        >>> # Qwen2.5-0.5B student (151936 rows) from Qwen2.5-7B (152064), 151665 tokens:
        >>> loss_fn = LogitsKDLoss("forward_kl", shared_vocab_size=151665)
    """

    def __init__(
        self,
        loss_type: str = "forward_kl",
        temperature: float = 1.0,
        jsd_beta: float = 0.5,
        top_k: int | None = None,
        chunk_size: int = 1024,
        tp_group: Any = None,
        shared_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if loss_type not in LOSS_TYPES:
            problems.append(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            problems.append(f"temperature={temperature!r} must be a number > 0")
        if not isinstance(jsd_beta, (int, float)) or not 0 < jsd_beta < 1:
            problems.append(f"jsd_beta={jsd_beta!r} must be a number with 0 < jsd_beta < 1")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0
        ):
            problems.append(f"top_k={top_k!r} must be a positive int or None")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            problems.append(f"chunk_size={chunk_size!r} must be a positive int")
        if shared_vocab_size is not None and (
            isinstance(shared_vocab_size, bool)
            or not isinstance(shared_vocab_size, int)
            or shared_vocab_size <= 0
        ):
            problems.append(
                f"shared_vocab_size={shared_vocab_size!r} must be a positive int or None"
            )
        elif top_k is not None and shared_vocab_size is not None and top_k > shared_vocab_size:
            problems.append(
                f"top_k={top_k} is larger than the shared vocabulary "
                f"(shared_vocab_size={shared_vocab_size})"
            )
        if problems:
            raise ValueError("LogitsKDLoss: " + "; ".join(problems))
        self.loss_type = loss_type
        self.temperature = float(temperature)
        self.jsd_beta = float(jsd_beta)
        self.top_k = top_k
        self.chunk_size = chunk_size
        self.tp_group = tp_group
        self.shared_vocab_size = shared_vocab_size
        self.fused_backwards: Counter = Counter()
        """How many fused backward passes (:meth:`forward_from_hidden`) scaled the gradients the
        forward computed (``"precomputed"``) and how many recomputed the projections
        (``"recomputed"``)."""

    def extra_repr(self) -> str:
        return (
            f"loss_type={self.loss_type!r}, temperature={self.temperature}, "
            f"jsd_beta={self.jsd_beta}, top_k={self.top_k}, chunk_size={self.chunk_size}, "
            f"shared_vocab_size={self.shared_vocab_size}"
        )

    def _alignment(
        self, student_local: int, teacher_local: int, group: Any
    ) -> _VocabAlignment | None:
        """How this rank's shards meet the shared vocabulary; ``None`` when nothing is cut.

        Raises:
            ValueError: when a side's padded vocabulary is smaller than the shared one, or the
                sides differ without a shared vocabulary.
        """
        world = _group_size(group)
        student_vocab, teacher_vocab = student_local * world, teacher_local * world
        shared = self.shared_vocab_size
        if shared is None:
            if student_local != teacher_local:
                raise ValueError(
                    "LogitsKDLoss: without shared_vocab_size student and teacher logits must have "
                    f"the same shape, but the student vocabulary {student_vocab} and teacher "
                    f"vocabulary {teacher_vocab} differ; pass shared_vocab_size (the tokenizer's "
                    "size) to distill over the real vocabulary"
                )
            return None
        if shared > min(student_vocab, teacher_vocab):
            raise ValueError(
                f"LogitsKDLoss: shared_vocab_size={shared} is larger than the student's "
                f"(padded) vocabulary {student_vocab} or the teacher's {teacher_vocab}"
            )
        if shared == student_vocab and student_local == teacher_local:
            return None  # nothing to cut or move: today's path, bit for bit
        start = (0 if group is None else dist.get_rank(group)) * student_local
        return _VocabAlignment(
            start=start,
            valid=min(max(shared - start, 0), student_local),
            gather=student_local != teacher_local and world > 1,
            group=group,
        )

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Per-token loss summed over the full (or the shared) vocabulary.

        Args:
            student_logits: [s, b, v_local], this rank's vocabulary shard; any float dtype.
            teacher_logits: [s, b, v_local], same shard of the teacher; detached here. With
                ``shared_vocab_size`` its last dimension is the teacher's own shard width
                (``teacher_vocab / TP``), which may differ from the student's.

        Returns:
            fp32 [s, b], identical on every TP rank; gradients flow to ``student_logits`` only.

        Raises:
            ValueError: on mismatched shapes, ``top_k`` larger than the full vocabulary, or a
                padded vocabulary smaller than ``shared_vocab_size``.
        """
        if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.dim() < 1:
            raise ValueError(
                "LogitsKDLoss: student and teacher logits must have the same shape [s, b, v], got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        group = resolve_tp_group(self.tp_group)
        token_shape = student_logits.shape[:-1]
        local_vocab = student_logits.shape[-1]
        full_vocab = local_vocab * _group_size(group)
        if self.top_k is not None and self.top_k > full_vocab:
            raise ValueError(
                f"LogitsKDLoss: top_k={self.top_k} is larger than the vocabulary ({full_vocab})"
            )
        alignment = self._alignment(local_vocab, teacher_logits.shape[-1], group)
        student = student_logits.reshape(-1, local_vocab)
        teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        if student.shape[0] == 0:
            # Nothing to reduce; ranks agree on the token count, so skipping comms is safe.
            return (student.float().sum(dim=-1) * 0.0).reshape(token_shape)
        spec = _KDSpec(self.loss_type, self.temperature, self.jsd_beta, self.chunk_size)
        if alignment is None and self.top_k is None:
            loss = _LogitsKDFunction.apply(student, teacher, spec, group)
        elif alignment is None:
            loss = _TopKLogitsKDFunction.apply(student, teacher, spec, self.top_k, group)
        elif self.top_k is None:
            loss = _LogitsKDFunction.apply(student, teacher, spec, group, alignment)
        else:
            loss = _TopKLogitsKDFunction.apply(student, teacher, spec, self.top_k, group, alignment)
        return loss.reshape(token_shape)

    def forward_from_hidden(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        sequence_parallel: bool = False,
        loss_weights: LossWeights | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The loss of ``student_hidden @ student_weight.T`` against ``teacher_hidden @
        teacher_weight.T``, and the student's LM cross entropy, without either model's logits.

        Both output projections run inside the chunked loss (see :class:`_FusedKDFunction`): the
        extra memory is a few ``[chunk, local_vocab]`` buffers whatever the token count, with the
        chunk at most ``chunk_size`` tokens and capped by :data:`FUSED_CHUNK_BYTES`.
        The inputs are what megatron's ``ColumnParallelLinear`` output layer receives, so under
        tensor parallelism the hidden states are replicated on every TP rank (or, with sequence
        parallelism, split along the sequence and gathered here, as the output layer would) and
        the weights are this rank's vocabulary shards. The hidden-state gradient goes through
        megatron's own input mappings (all-reduce over the TP group, or reduce-scatter under
        sequence parallelism), exactly as for the output layer.

        Args:
            student_hidden: [s, b, h_s] (``[s / tp, b, h_s]`` with ``sequence_parallel``), the
                input of the student's output layer.
            student_weight: [v_local, h_s], this rank's shard of the student's output weight (the
                embedding weight when they are tied); no bias.
            teacher_hidden: [s, b, h_t] (sequence-split like the student's); detached here.
            teacher_weight: [v_local, h_t], the teacher's shard; detached here.
            labels: [s, b] global vocabulary indices for the cross entropy, or ``None``.
            sequence_parallel: the hidden states are split along the sequence over the TP group.
            loss_weights: how the caller will weight the two outputs per token, up to a
                constant: then the student's gradients are computed in this forward, and
                backward does not recompute the projections (see :class:`LossWeights`). Without
                it, or when grad mode is off, backward recomputes them.

        Returns:
            ``(kd_loss, lm_loss)``, fp32 [s, b] each and identical on every TP rank; ``kd_loss``
            equals :meth:`forward` on the logits, ``lm_loss`` megatron's
            ``vocab_parallel_cross_entropy`` of the student's logits (``None`` without
            ``labels``). Gradients flow to ``student_hidden`` and ``student_weight`` from both.

        Raises:
            ValueError: on mismatched shapes, ``top_k`` larger than the vocabulary,
                ``shared_vocab_size`` (differently padded vocabularies are not fused), or
                ``loss_weights`` whose tokens are not the hidden states' or that weight the LM
                loss without labels.
        """
        if self.shared_vocab_size is not None:
            raise ValueError(
                "LogitsKDLoss.forward_from_hidden: shared_vocab_size is not supported (differently "
                "padded vocabularies); use forward on the logits"
            )
        group = resolve_tp_group(self.tp_group)
        world = _group_size(group)
        if sequence_parallel and world > 1:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            student_hidden = gather_from_sequence_parallel_region(student_hidden, group=group)
            with torch.no_grad():
                teacher_hidden = gather_from_sequence_parallel_region(
                    teacher_hidden.detach(), tensor_parallel_output_grad=False, group=group
                )
        elif world > 1:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            student_hidden = copy_to_tensor_model_parallel_region(student_hidden, group=group)
        token_shape = student_hidden.shape[:-1]
        problems = []
        if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
            problems.append(
                f"student hidden {tuple(student_hidden.shape)} and weight "
                f"{tuple(student_weight.shape)} are not [s, b, h] and [v, h]"
            )
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            problems.append(
                f"teacher hidden {tuple(teacher_hidden.shape)} and weight "
                f"{tuple(teacher_weight.shape)} are not [s, b, h] and [v, h]"
            )
        if teacher_hidden.shape[:-1] != token_shape:
            problems.append(
                f"student tokens {tuple(token_shape)} and teacher tokens "
                f"{tuple(teacher_hidden.shape[:-1])} differ"
            )
        if student_weight.shape[0] != teacher_weight.shape[0]:
            problems.append(
                f"student vocabulary shard {student_weight.shape[0]} and teacher's "
                f"{teacher_weight.shape[0]} differ"
            )
        if labels is not None and tuple(labels.shape) != tuple(token_shape):
            problems.append(f"labels {tuple(labels.shape)} are not [s, b] {tuple(token_shape)}")
        full_vocab = student_weight.shape[0] * world
        if self.top_k is not None and self.top_k > full_vocab:
            problems.append(f"top_k={self.top_k} is larger than the vocabulary ({full_vocab})")
        if loss_weights is not None:
            if tuple(loss_weights.tokens.shape) != tuple(token_shape):
                problems.append(
                    f"loss_weights.tokens {tuple(loss_weights.tokens.shape)} are not the hidden "
                    f"states' tokens [s, b] {tuple(token_shape)}"
                )
            if loss_weights.lm != 0 and labels is None:
                problems.append(
                    f"loss_weights.lm={loss_weights.lm} weights an LM loss but labels is None"
                )
        if problems:
            raise ValueError("LogitsKDLoss.forward_from_hidden: " + "; ".join(problems))
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        if hidden.shape[0] == 0:
            # Nothing to reduce; ranks agree on the token count, so skipping comms is safe.
            empty = (hidden @ student_weight.t()).float().sum(dim=-1).reshape(token_shape) * 0.0
            return empty, (None if labels is None else empty.clone())
        chunk_size = min(
            self.chunk_size, max(1, FUSED_CHUNK_BYTES // (4 * student_weight.shape[0]))
        )
        spec = _FusedSpec(
            _KDSpec(self.loss_type, self.temperature, self.jsd_beta, chunk_size),
            self.top_k,
            with_lm_loss=labels is not None,
        )
        target = (
            labels.reshape(-1).long()
            if labels is not None
            else torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        )
        kd_weights = lm_weights = None
        wants_grad = hidden.requires_grad or student_weight.requires_grad
        if loss_weights is not None and wants_grad and torch.is_grad_enabled():
            tokens = loss_weights.tokens.detach().reshape(-1).to(torch.float32)
            kd_weights = tokens * loss_weights.kd
            lm_weights = tokens * loss_weights.lm if loss_weights.lm != 0 else None
        kd_loss, lm_loss = _FusedKDFunction.apply(
            hidden,
            student_weight,
            teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
            teacher_weight.detach(),
            target,
            spec,
            group,
            kd_weights,
            lm_weights,
            self.fused_backwards,
        )
        return kd_loss.reshape(token_shape), (
            None if labels is None else lm_loss.reshape(token_shape)
        )


def reference_logits_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    top_k: int | None = None,
) -> Tensor:
    """Straightforward fp32 full-vocabulary reference of :class:`LogitsKDLoss` (autograd).

    Args:
        student_logits: unsharded [s, b, v].
        teacher_logits: unsharded [s, b, v] (detached here).
        loss_type: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        temperature: logits are divided by this before the softmax.
        jsd_beta: teacher weight of the JSD mixture.
        top_k: restrict to the teacher's top-k entries, renormalized, or ``None``.

    Returns:
        fp32 per-token loss [s, b].
    """
    student = student_logits.float() / temperature
    teacher = teacher_logits.detach().float() / temperature
    if top_k is not None:
        index = torch.topk(teacher, top_k, dim=-1).indices
        student = torch.gather(student, -1, index)
        teacher = torch.gather(teacher, -1, index)
    log_p_s = torch.log_softmax(student, dim=-1)
    log_p_t = torch.log_softmax(teacher, dim=-1)

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
        return torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)

    if loss_type == "forward_kl":
        return kl(log_p_t, log_p_s)
    if loss_type == "reverse_kl":
        return kl(log_p_s, log_p_t)
    if loss_type == "jsd":
        log_m = torch.logsumexp(
            torch.stack([log_p_t + math.log(jsd_beta), log_p_s + math.log(1.0 - jsd_beta)]), dim=0
        )
        return jsd_beta * kl(log_p_t, log_m) + (1.0 - jsd_beta) * kl(log_p_s, log_m)
    raise ValueError(f"reference_logits_kd_loss: loss_type={loss_type!r} not in {LOSS_TYPES}")


@dataclass
class FusedLogitsLoss:
    """The per-token logits loss [s, b] a fused pass already computed (see
    :mod:`kd_module.distillation.fused`); ModelOpt's capture hook hands it to the criterion in
    place of the student's logits."""

    per_token: Tensor


class KDLogitsCriterion(BaseLoss):
    """Adapter that plugs :class:`LogitsKDLoss` into a ModelOpt ``DistillationModel`` criterion.

    The class name contains ``Logits`` because ModelOpt's
    ``LogitsAndIntermediatesLossBalancer`` finds the logits loss by that substring.

    Args:
        model_config: megatron ``TransformerConfig`` of the student.
        loss: the configured loss.

    Examples:
        >>> kd = KDLogitsCriterion(config, LogitsKDLoss("forward_kl", temperature=2.0))
        >>> criterion = {("output_layer", "output_layer"): kd}
    """

    def __init__(self, model_config: Any, loss: LogitsKDLoss) -> None:
        super().__init__(model_config)
        self.loss = loss

    def forward(self, predictions: Any, targets: Any) -> tuple[Tensor, bool, bool]:
        """Loss between output-layer outputs (tensors or ``(logits, bias)`` tuples), or the
        :class:`FusedLogitsLoss` the fused pass left in place of the student's.

        Returns:
            ``(loss [b, s], False, False)``: already reduced over TP, not sequence-parallel.
        """
        fused = predictions[0] if isinstance(predictions, tuple) else predictions
        if isinstance(fused, FusedLogitsLoss):
            return self.post_forward(fused.per_token, tp_reduce=False)
        predictions, targets = self.pre_forward(predictions, targets)
        return self.post_forward(self.loss(predictions, targets), tp_reduce=False)
