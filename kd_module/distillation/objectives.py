"""Training objectives as objects: what megatron's schedule runs for each micro-batch, and what
it reports.

As NeMo's GPT model chooses a loss-reduction object per phase (``training_loss_reduction`` /
``validation_loss_reduction``), a module here chooses an :class:`Objective` per phase. Each owns:

- :meth:`Objective.forward_step`: megatron's ``forward_step_func`` (the model call and the
  per-micro-batch loss function);
- :attr:`Objective.report_keys`: the terms it reports, each as ``[sum over tokens, tokens]``;
  :meth:`Objective.sum_micro_batches` adds them over this rank's micro-batches and
  :meth:`Objective.reduce_across_ranks` over the data- and context-parallel ranks, so that
  ``sum / tokens`` is a per-token mean over the global batch;
- :attr:`Objective.needs_teacher_tensor_shapes`: whether pipeline stages exchange the student's
  and the teacher's activations together (ModelOpt's tensor-shape hook).

Objectives: :class:`KDObjective` (online distillation), :class:`LMObjective` (the model's LM loss
alone) and ``OfflineKDObjective`` (a teacher cache; in :mod:`kd_module.offline.objective`).
:func:`resolve_objective` maps their names (``"kd"``, ``"lm"``, ``"offline"``) to objects.

Two pieces every objective shares live here once: :func:`mix_terms` (the LM/KD mixing) and
:func:`cross_entropy_keeping_logits` (the LM loss without megatron's in-place damage to the logits
the KD loss reads).
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Any

import torch

REPORT_KEYS = ("kd_loss", "logits_loss", "intermediate_loss", "lm_loss")
"""The terms a distillation objective reports (see :func:`mix_terms`)."""

OBJECTIVES = {
    "kd": "kd_module.distillation.objectives:KDObjective",
    "lm": "kd_module.distillation.objectives:LMObjective",
    "offline": "kd_module.offline.objective:OfflineKDObjective",
}
"""Objective names (the strings ``forward_backward`` accepts) and the class each names."""


def resolve_objective(objective: Objective | str) -> Objective:
    """The objective itself, or a default-configured one of the name.

    Raises:
        ValueError: for an unknown name, listing the allowed ones.
    """
    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        allowed = ", ".join(repr(name) for name in OBJECTIVES)
        raise ValueError(
            f"objective: unknown name {objective!r} (allowed: {allowed}, or an Objective)"
        )
    module, name = OBJECTIVES[objective].split(":")
    return getattr(importlib.import_module(module), name)()


def mix_terms(
    lm_loss: torch.Tensor,
    logits_loss: torch.Tensor,
    intermediate_loss: torch.Tensor,
    kd_loss_scale: float,
    skip_lm_loss: bool,
) -> dict[str, torch.Tensor]:
    """The distillation objective from its terms (sums or means, all in the same units)::

        kd      = logits_loss + intermediate_loss
        kd_loss = kd                                if skip_lm_loss
                = lm_loss + kd_loss_scale * kd      otherwise

    Returns:
        Each of :data:`REPORT_KEYS` mapped to its value; ``kd_loss`` is backpropagated.
    """
    kd = logits_loss + intermediate_loss
    total = kd if skip_lm_loss else lm_loss + kd_loss_scale * kd
    return {
        "kd_loss": total,
        "logits_loss": logits_loss,
        "intermediate_loss": intermediate_loss,
        "lm_loss": lm_loss,
    }


def cross_entropy_keeping_logits(
    logits: torch.Tensor, target: torch.Tensor, in_objective: bool, chunk_size: int = 1024
) -> torch.Tensor:
    """Per-token cross entropy of vocab-parallel logits that leaves the logits intact.

    megatron's ``vocab_parallel_cross_entropy`` works in place on ``logits.float()``: for fp32
    logits that is the caller's tensor, which the KD loss reads too (ModelOpt's hook captured it,
    or the offline loss is handed it), so the KD loss would read softmax probabilities instead of
    logits. When no gradient is wanted (``in_objective=False``: the LM loss is only logged; or
    autograd is off, as in evaluation) the loss comes from
    :func:`~kd_module.distillation.losses.vocab_parallel_cross_entropy_no_grad`, which only reads
    the logits, one chunk of tokens at a time. Otherwise megatron's own loss runs, on a copy for
    fp32 logits (for bf16/fp16 ``.float()`` already copies).

    Args:
        logits: [..., v_local], this rank's vocabulary shard.
        target: [...] global vocabulary indices (the logits' layout without the last dimension).
        in_objective: whether the loss enters the objective (needs its gradient).
        chunk_size: tokens per chunk of the no-grad loss.

    Returns:
        fp32 [...] loss, with autograd only when ``in_objective`` and grad mode is on.
    """
    if not in_objective or not torch.is_grad_enabled():
        from kd_module.distillation.losses import vocab_parallel_cross_entropy_no_grad

        return vocab_parallel_cross_entropy_no_grad(logits.detach(), target, chunk_size=chunk_size)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    copy = logits.float()
    if copy.data_ptr() == logits.data_ptr():
        copy = copy.clone()
    return vocab_parallel_cross_entropy(copy, target)


def masked_sum(loss_mask: torch.Tensor) -> Any:
    """Reduction for per-token losses: masked sum over this rank's tokens, TP-summed if flagged.

    The returned function takes a per-token loss, or ModelOpt's criterion output
    ``(per_token, tp_reduce, is_sequence_parallel)``.
    """
    from megatron.core import parallel_state

    def reduce(output: Any) -> torch.Tensor:
        if isinstance(output, tuple):
            per_token, tp_reduce, is_sequence_parallel = output
        else:
            per_token, tp_reduce, is_sequence_parallel = output, False, False
        mask = loss_mask
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        if is_sequence_parallel and tp_size > 1:
            rank = parallel_state.get_tensor_model_parallel_rank()
            mask = torch.tensor_split(mask, tp_size, dim=1)[rank]
        total = torch.sum(per_token.float().reshape(-1) * mask.reshape(-1).float())
        if (tp_reduce or is_sequence_parallel) and tp_size > 1:
            reduced = total.detach().clone()
            torch.distributed.all_reduce(
                reduced, group=parallel_state.get_tensor_model_parallel_group()
            )
            # Value of the TP sum, gradient of this rank's own part: each rank backpropagates
            # the share of the loss its shard produced.
            total = total + (reduced - total).detach()
        return total

    return reduce


def report(terms: dict[str, torch.Tensor], num_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """megatron's per-micro-batch report: each term as a detached ``[sum, num_tokens]``."""
    count = num_tokens.float().view(1)
    return {key: torch.cat([value.detach().float().view(1), count]) for key, value in terms.items()}


class Objective:
    """What a phase of training optimizes and reports (see the module docstring).

    Subclasses set :attr:`report_keys` and implement :meth:`forward_step`, whose
    loss function returns megatron's per-token triple ``(loss_sum, num_tokens, report)``: with
    ``calculate_per_token_loss`` megatron divides gradients by the global token count.
    """

    report_keys: tuple[str, ...] = ()

    @property
    def needs_teacher_tensor_shapes(self) -> bool:
        """Whether pipeline stages send student and teacher activations concatenated."""
        return False

    def forward_step(self, data_iterator: Any, model: Any) -> tuple:
        """megatron's ``forward_step_func``: ``(output_tensor, loss_func)`` of one micro-batch."""
        raise NotImplementedError

    def tensor_shapes_adjust_fn(self, model: Any, seq_length: int, micro_batch_size: int) -> Any:
        """megatron's ``adjust_tensor_shapes_fn``: ModelOpt's when this objective needs the
        teacher's shapes and the pipeline has more than one stage, else ``None``."""
        from megatron.core import parallel_state

        if not self.needs_teacher_tensor_shapes:
            return None
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return None
        from modelopt.torch.distill.plugins import megatron as mtd_megatron

        return mtd_megatron.get_tensor_shapes_adjust_fn_for_distillation(
            model,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            decoder_seq_length=None,
        )

    def sum_micro_batches(self, reports: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each reported key's ``[sum, num_tokens]`` added over this rank's micro-batches."""
        totals: dict[str, torch.Tensor] = {}
        for item in reports:
            for key, value in item.items():
                totals[key] = totals[key] + value if key in totals else value.clone()
        return totals

    def reduce_across_ranks(
        self, totals: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """``[len(report_keys), 2]`` sums and token counts over the global batch, on every rank.

        Summed over the data- and context-parallel ranks of the last pipeline stage, then sent
        to the other stages. A key missing from ``totals`` counts as ``[0, 0]``.
        """
        from megatron.core import parallel_state

        keys = self.report_keys
        values = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
        for i, key in enumerate(keys):
            if key in totals:
                values[i] = totals[key].to(values)
        if parallel_state.is_pipeline_last_stage():
            torch.distributed.all_reduce(
                values, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
            )
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                values,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return values

    def means(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token means from :meth:`reduce_across_ranks`' output, by report key."""
        return {
            key: values[i, 0] / values[i, 1].clamp(min=1) for i, key in enumerate(self.report_keys)
        }


class LMObjective(Objective):
    """The model's own LM loss (teachers, LM-only baselines, validation without a teacher)."""

    report_keys = ("lm_loss",)

    def forward_step(self, data_iterator: Any, model: Any) -> tuple:
        batch = next(data_iterator)
        output = model(
            batch["tokens"],
            batch["position_ids"],
            batch.get("attention_mask"),
            labels=batch["labels"],
        )
        return output, partial(self.loss_func, batch["loss_mask"])

    def loss_func(self, loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple:
        """``(lm_sum, num_tokens, report)`` of one micro-batch's per-token LM loss [b, s]."""
        lm_sum = masked_sum(loss_mask)(output_tensor)
        num_tokens = loss_mask.sum().to(torch.int)
        return lm_sum, num_tokens, report({"lm_loss": lm_sum}, num_tokens)


class KDObjective(Objective):
    """Online distillation of a ModelOpt ``DistillationModel`` (student and teacher).

    The model computes the terms: its LM loss hook (``labels`` given) and ModelOpt's criteria,
    combined by the model's ``KDLossBalancer`` with the distillation config's ``kd_loss_scale``
    and ``skip_lm_loss`` (see :func:`mix_terms`).
    """

    report_keys = REPORT_KEYS

    @property
    def needs_teacher_tensor_shapes(self) -> bool:
        return True

    def forward_step(self, data_iterator: Any, model: Any) -> tuple:
        from kd_module.distillation.fused import fused_loss_mask

        batch = next(data_iterator)
        # The fused logits loss computes the output layer's gradients in the forward when it
        # knows how the tokens are weighted.
        with fused_loss_mask(model, batch["loss_mask"]):
            output = model(
                batch["tokens"],
                batch["position_ids"],
                batch.get("attention_mask"),
                labels=batch["labels"],
            )
        return output, partial(self.loss_func, model, batch["loss_mask"])

    def loss_func(self, model: Any, loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple:
        """``(kd_loss_sum, num_tokens, report)`` of one micro-batch.

        Args:
            model: the (possibly wrapped) DistillationModel.
            loss_mask: [b, s] float mask of the tokens that count.
            output_tensor: the student's per-token LM loss [b, s] (megatron's output with labels).
        """
        from kd_module.models.gpt import unwrap

        reduce = masked_sum(loss_mask)
        lm_sum = reduce(output_tensor)
        num_tokens = loss_mask.sum().to(torch.int)
        terms = unwrap(model).compute_kd_loss(student_loss=lm_sum, loss_reduction_fn=reduce)
        terms = {key: terms[key] for key in REPORT_KEYS}
        return terms["kd_loss"], num_tokens, report(terms, num_tokens)
