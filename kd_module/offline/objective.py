"""The offline distillation objective: the student's logits against a teacher cache.

It lives beside the cache because it scores the logits with the cache's loss
(:func:`~kd_module.offline.loss.offline_topk_kd_loss`); the rest (terms, mixing, reduction)
is :mod:`kd_module.distillation.objectives`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from kd_module.distillation.config import DistillConfig
from kd_module.distillation.objectives import (
    REPORT_KEYS,
    Objective,
    cross_entropy_keeping_logits,
    mix_terms,
    report,
)
from kd_module.offline.loss import offline_topk_kd_loss


@dataclass(frozen=True)
class OfflineKDObjective(Objective):
    """Distillation from cached teacher top-k logits (no teacher runs).

    Micro-batches carry the cached entries ``teacher_values``, ``teacher_indices`` ([b, s, k])
    and ``teacher_lse`` ([b, s]) besides ``tokens``, ``labels`` and ``loss_mask``. The terms are
    online distillation's (:func:`~kd_module.distillation.objectives.mix_terms`), with
    ``intermediate_loss`` always 0: the cache holds no activations.
    """

    mode: str = "tail"
    """``"tail"`` or ``"renormalized"`` (:func:`~kd_module.offline.loss.offline_topk_kd_loss`)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions."""
    kd_loss_scale: float = 1.0
    """Multiplies the KD loss when the LM loss is added."""
    skip_lm_loss: bool = True
    """Train on the KD loss alone (the LM loss is only logged)."""
    chunk_size: int = 1024
    """Tokens per chunk of the logged-only LM loss."""
    shared_vocab_size: int | None = None
    """The cache's real vocabulary: student columns at or beyond it (padding) are left out of the
    KD loss; ``None``: the student's whole padded vocabulary."""

    report_keys = REPORT_KEYS

    @classmethod
    def from_config(
        cls, distill: DistillConfig, mode: str, shared_vocab_size: int | None = None
    ) -> OfflineKDObjective:
        """The objective of a distillation config, an offline loss mode and the cache's shared
        vocabulary."""
        return cls(
            mode=mode,
            temperature=float(distill.logit_kl_temperature),
            kd_loss_scale=float(distill.kd_loss_scale),
            skip_lm_loss=bool(distill.skip_lm_loss),
            shared_vocab_size=shared_vocab_size,
        )

    def forward_step(self, data_iterator: Any, model: Any) -> tuple:
        batch = next(data_iterator)
        # No labels: megatron returns the logits [b, s, v_local] on the last stage.
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        return output, partial(self.loss_func, batch)

    def loss_func(self, batch: dict[str, Any], logits: torch.Tensor) -> tuple:
        """``(kd_loss_sum, num_tokens, report)`` of one micro-batch against the cache.

        Args:
            batch: the micro-batch with ``labels``, ``loss_mask`` and the cached teacher entries.
            logits: the student's logits [b, s, v_local] (this rank's vocabulary shard).
        """
        mask = batch["loss_mask"].float()
        lm = cross_entropy_keeping_logits(
            logits, batch["labels"], in_objective=not self.skip_lm_loss, chunk_size=self.chunk_size
        )
        kd = offline_topk_kd_loss(
            logits,
            batch["teacher_values"],
            batch["teacher_indices"],
            batch["teacher_lse"],
            temperature=self.temperature,
            mode=self.mode,
            shared_vocab_size=self.shared_vocab_size,
        )
        kd_sum = torch.sum(kd * mask)
        terms = mix_terms(
            torch.sum(lm.float() * mask),
            kd_sum,
            torch.zeros_like(kd_sum),
            self.kd_loss_scale,
            self.skip_lm_loss,
        )
        num_tokens = mask.sum().to(torch.int)
        return terms["kd_loss"], num_tokens, report(terms, num_tokens)
