"""The fused logits loss inside a ModelOpt ``DistillationModel``: no full-vocabulary logits.

With ``logit_loss_impl: fused`` (see :mod:`kd_module.distillation.config`), neither model's
output layer computes logits during a forward with labels. ModelOpt's ``DistillationModel`` stays
the container and its capture hooks stay the mechanism; three small, marked extensions do the
rest (:func:`install_fused_logits_loss`):

1. Each model's output layer (megatron's ``ColumnParallelLinear``) gets an instance ``forward``
   that, while deferral is on, returns ``(OutputLayerInput(hidden_states, weight), None)``
   instead of ``(logits, bias)``: what the projection would have read. ModelOpt's forward hooks
   on the output layers capture these as they would capture logits. With tied embeddings
   megatron passes the embedding weight in, so its gradient reaches the embedding.
2. The ``DistillationModel``'s ``forward`` turns deferral on for calls with ``labels`` (the
   training and validation steps) and off otherwise, so a forward without labels still returns
   logits.
3. The student's LM-loss hook (megatron's ``compute_language_model_loss``, which it calls with the
   output layer's output right after it; the teacher ran first) reads the teacher's captured
   input and runs :meth:`~kd_module.distillation.losses.LogitsKDLoss.forward_from_hidden` once:
   both projections, the divergence and the LM cross entropy per chunk of tokens. It returns the
   cross entropy (megatron's per-token LM loss: with a gradient when ``skip_lm_loss`` is false,
   detached for logging otherwise) and leaves the per-token divergence in the student output
   layer's ModelOpt capture slot as :class:`FusedLogitsLoss`, which
   :class:`~kd_module.distillation.losses.KDLogitsCriterion` returns as the logits loss.
   With the loss mask it tells the pass how the objective weights the two per-token losses
   (:class:`~kd_module.distillation.losses.LossWeights`: the mask, times ``kd_weight`` for the
   divergence and 1 for the cross entropy when it is in the objective), so the pass computes the
   student's projection gradients in its forward and backward only scales them; the objective
   (:func:`~kd_module.distillation.objectives.mix_terms`, megatron's per-token reduction) is
   linear in both, with one constant (``1 / global tokens`` and loss scaling) that backward reads
   off the incoming gradient. :class:`~kd_module.distillation.objectives.KDObjective` hands the
   micro-batch's mask over with :func:`fused_loss_mask` (megatron's ``GPTModel.forward`` has a
   ``loss_mask`` keyword, ``MambaModel.forward`` has none). Without a mask, backward recomputes
   the projections.

Pipeline parallelism: only the last stage has output layers, so only there is anything deferred;
intermediate losses and the stages' activation exchange are untouched. Sequence parallelism: the
captured hidden states are sequence-split, ``forward_from_hidden`` gathers them as the output
layer would. Multi-token prediction heads call the output layer several times per forward; the
models of this library have none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
from torch import Tensor

from kd_module.distillation.losses import FusedLogitsLoss, LogitsKDLoss, LossWeights
from kd_module.upstream.modelopt import captured_output, replace_captured_output

__all__ = ["OutputLayerInput", "fused_loss_mask", "install_fused_logits_loss"]


@dataclass
class OutputLayerInput:
    """What a deferred output layer returns in place of its logits."""

    hidden_states: Tensor
    """[s, b, h] (``[s / tp, b, h]`` under sequence parallelism), the output layer's input."""
    weight: Tensor
    """[v_local, h], the weight the projection would use (the embedding weight when tied)."""
    sequence_parallel: bool
    """Whether ``hidden_states`` is split along the sequence over the TP group."""

    @property
    def dtype(self) -> torch.dtype:
        """The logits' dtype; ModelOpt's teacher LM-loss stub makes its zeros in it."""
        return self.hidden_states.dtype


@dataclass
class _Fusion:
    """What the extensions share, kept on the model as one plain attribute (not a submodule, so
    neither ``state_dict`` nor ``named_modules`` sees the output layers twice)."""

    student_layer: torch.nn.Module
    teacher_layer: torch.nn.Module
    loss: LogitsKDLoss
    kd_weight: float
    """The divergence's factor in the objective relative to the LM loss's (``kd_loss_scale``, or
    1 when the LM loss is only logged)."""
    forward: Any
    """The model's ``forward`` before the fusion."""
    language_model_loss: Any
    """The student's LM-loss hook before the fusion."""
    loss_mask: Tensor | None = None
    """[b, s], the current micro-batch's loss mask (:func:`fused_loss_mask`), if any."""


def _deferring_forward(
    self: Any, input_: Tensor, weight: Tensor | None = None, runtime_gather_output: Any = None
) -> tuple[Any, Any]:
    """Extension 1: megatron's ``ColumnParallelLinear.forward``, or its input while deferred."""
    if not self._defer_projection:
        return type(self).forward(self, input_, weight, runtime_gather_output)
    if self.bias is not None or getattr(self, "gather_output", False):
        raise RuntimeError(
            "fused logits loss: the output layer has a bias or gathers its output; "
            "use logit_loss_impl: chunked"
        )
    return OutputLayerInput(
        input_, self.weight if weight is None else weight, bool(self.sequence_parallel)
    ), None


def _forward_deferring_with_labels(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Extension 2: defer both output projections during forwards that are given labels."""
    labels = kwargs.get("labels", args[4] if len(args) > 4 else None)
    fusion = self._fusion
    layers = (fusion.student_layer, fusion.teacher_layer)
    for layer in layers:
        layer._defer_projection = labels is not None
    try:
        return fusion.forward(*args, **kwargs)
    finally:
        for layer in layers:
            layer._defer_projection = False


def _fused_language_model_loss(self: Any, labels: Tensor, logits: Any) -> Tensor:
    """Extension 3: the student's LM-loss hook, running the fused pass (module docstring)."""
    fusion = self._fusion
    if not isinstance(logits, OutputLayerInput):
        return fusion.language_model_loss(labels, logits)
    captured = captured_output(fusion.teacher_layer)
    if captured is None or not isinstance(captured[0], OutputLayerInput):
        raise RuntimeError(
            "fused logits loss: the teacher's output layer input was not captured before the "
            "student's LM loss; the teacher must run first in the DistillationModel's forward"
        )
    student, teacher = logits, captured[0]
    in_objective = not self.training or self._lm_loss_in_objective
    # megatron's layouts: labels and mask [b, s], hidden [s, b, h], per-token losses [s, b].
    weights = None
    if fusion.loss_mask is not None:
        weights = LossWeights(
            fusion.loss_mask.transpose(0, 1),
            kd=fusion.kd_weight,
            lm=1.0 if self._lm_loss_in_objective else 0.0,
        )
    kd_loss, lm_loss = fusion.loss.forward_from_hidden(
        student.hidden_states,
        student.weight,
        teacher.hidden_states,
        teacher.weight,
        labels.transpose(0, 1),
        sequence_parallel=student.sequence_parallel,
        loss_weights=weights,
    )
    replace_captured_output(fusion.student_layer, (FusedLogitsLoss(kd_loss), None))
    return (lm_loss if in_objective else lm_loss.detach()).transpose(0, 1).contiguous()


def install_fused_logits_loss(model: Any, loss: LogitsKDLoss, kd_weight: float = 1.0) -> None:
    """Make ``model`` (a ModelOpt ``DistillationModel`` adjusted for megatron-core, on the last
    pipeline stage) compute its logits loss fused with both output projections.

    Call it after ``adjust_distillation_model_for_mcore`` and after the student's LM-loss hook is
    set: it wraps both (the previous ones still run for forwards without labels).

    Args:
        model: the DistillationModel; the student and the teacher have ``output_layer``.
        loss: the configured logits loss (its ``forward_from_hidden`` runs the pass).
        kd_weight: the logits loss's factor in the objective relative to the LM loss's
            (``kd_loss_scale`` when the LM loss is in the objective; any value otherwise).
    """
    student_layer, teacher_layer = model.output_layer, model.teacher_model.output_layer
    for layer in (student_layer, teacher_layer):
        layer._defer_projection = False
        layer.forward = MethodType(_deferring_forward, layer)
    model._fusion = _Fusion(
        student_layer,
        teacher_layer,
        loss,
        kd_weight,
        forward=model.forward,
        language_model_loss=model.compute_language_model_loss,
    )
    model.forward = MethodType(_forward_deferring_with_labels, model)
    model.compute_language_model_loss = MethodType(_fused_language_model_loss, model)


@contextmanager
def fused_loss_mask(model: Any, loss_mask: Tensor) -> Iterator[None]:
    """Within the block, ``model``'s fused logits loss (if it has one) knows the micro-batch's
    loss mask, so that it computes the output layer's gradients in the forward (module
    docstring, step 3). A model without the fusion (other stages, other implementations) is left
    alone.

    Args:
        model: the DistillationModel, possibly wrapped (DDP, Float16Module).
        loss_mask: [b, s] the micro-batch's mask, by which the objective weights every token.
    """
    from kd_module.models.gpt import unwrap

    fusion = getattr(unwrap(model), "_fusion", None)
    if fusion is None:
        yield
        return
    fusion.loss_mask = loss_mask
    try:
        yield
    finally:
        fusion.loss_mask = None
