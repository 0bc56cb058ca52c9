"""Objectives as objects: their terms on a tiny model, the pipeline-shape decision, their names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_module.distillation.config import DistillConfig
from kd_module.models.gpt import GPTModelConfig, ParallelLayout
from tests.helpers import run_distributed

SEQ, VOCAB, MICRO_BATCH, K = 16, 128, 2, 8

STUDENT = GPTModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    seq_length=SEQ,
    vocab_size=VOCAB,
    share_embeddings_and_output_weights=False,
)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
    loss_mask = torch.ones(MICRO_BATCH, SEQ)
    loss_mask[:, SEQ - 3 :] = 0.0
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
    }


def _student():
    from kd_module.models.gpt import build_model
    from tests.helpers import init_weights_by_global_key

    model = build_model(STUDENT)
    init_weights_by_global_key(model, seed=1)
    return model


def _means(report: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: (value[0] / value[1]).item() for key, value in report.items()}


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> float:
    return ((per_token * mask).sum() / mask.sum()).item()


def test_mix_terms_is_the_documented_formula():
    """kd_loss = logits + intermediate with skip_lm_loss, else lm + scale * (logits + inter)."""
    from kd_module.distillation.objectives import REPORT_KEYS, mix_terms

    lm, logits, intermediate = torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.5)
    mixed = mix_terms(lm, logits, intermediate, kd_loss_scale=3.0, skip_lm_loss=False)
    assert tuple(mixed) == REPORT_KEYS
    assert mixed["kd_loss"].item() == 6.5  # 2 + 3 * 1.5
    assert mixed["lm_loss"].item() == 2.0 and mixed["intermediate_loss"].item() == 0.5
    pure = mix_terms(lm, logits, intermediate, kd_loss_scale=3.0, skip_lm_loss=True)
    assert pure["kd_loss"].item() == 1.5


def test_lm_objective_reports_the_masked_cross_entropy(single_rank):
    """LMObjective's lm_loss is the masked per-token mean of F.cross_entropy (rtol 1e-5), and its
    token count leaves out the masked tokens."""
    from kd_module.distillation.model import forward_backward
    from kd_module.distillation.objectives import LMObjective

    model, batch = _student(), _batch()
    report = forward_backward(
        model, iter([batch]), 1, SEQ, MICRO_BATCH, forward_only=True, objective=LMObjective()
    )
    assert set(report) == {"lm_loss"}
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)
    lm = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="none")
    expected = _masked_mean(lm.view(MICRO_BATCH, SEQ), batch["loss_mask"])
    assert _means(report)["lm_loss"] == pytest.approx(expected, rel=1e-5)
    assert report["lm_loss"][1].item() == batch["loss_mask"].sum().item()


def _cached_teacher(batch: dict[str, torch.Tensor], seed: int = 7) -> dict[str, torch.Tensor]:
    """The batch with a teacher's top-k entries, as the cache stores them ([b, s, k], [b, s])."""
    generator = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(MICRO_BATCH, SEQ, VOCAB, generator=generator) * 2.0
    values, indices = teacher_logits.topk(K, dim=-1)
    return {
        **batch,
        "teacher_values": values,
        "teacher_indices": indices,
        "teacher_lse": teacher_logits.logsumexp(dim=-1),
    }


def test_offline_objective_terms_match_a_hand_computation(single_rank):
    """OfflineKDObjective (renormalized top-k, T=2, LM loss in the objective, scale 0.5): its
    logits_loss is KL(teacher top-k || student top-k) after dividing by T, its lm_loss the
    masked cross entropy, kd_loss = lm + 0.5 * logits, intermediate 0 (rtol 1e-5). In fp32 the
    LM loss runs first: had it overwritten the logits, the KL would be wrong."""
    from kd_module.distillation.model import forward_backward
    from kd_module.offline.objective import OfflineKDObjective

    model, batch = _student(), _cached_teacher(_batch())
    objective = OfflineKDObjective(
        mode="renormalized", temperature=2.0, kd_loss_scale=0.5, skip_lm_loss=False
    )
    report = forward_backward(
        model, iter([batch]), 1, SEQ, MICRO_BATCH, forward_only=True, objective=objective
    )
    mean = _means(report)

    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)
    mask = batch["loss_mask"]
    teacher = F.log_softmax(batch["teacher_values"] / 2.0, dim=-1)
    student = F.log_softmax(logits.gather(-1, batch["teacher_indices"]) / 2.0, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    lm = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="none")
    logits_loss = _masked_mean(kl, mask)
    lm_loss = _masked_mean(lm.view(MICRO_BATCH, SEQ), mask)
    assert mean["logits_loss"] == pytest.approx(logits_loss, rel=1e-5)
    assert mean["lm_loss"] == pytest.approx(lm_loss, rel=1e-5)
    assert mean["intermediate_loss"] == 0.0
    assert mean["kd_loss"] == pytest.approx(lm_loss + 0.5 * logits_loss, rel=1e-5)

    only_logged = OfflineKDObjective(mode="renormalized", temperature=2.0, skip_lm_loss=True)
    report = forward_backward(
        model, iter([batch]), 1, SEQ, MICRO_BATCH, forward_only=True, objective=only_logged
    )
    mean = _means(report)
    assert mean["kd_loss"] == pytest.approx(logits_loss, rel=1e-5)
    assert mean["lm_loss"] == pytest.approx(lm_loss, rel=1e-5)


def test_offline_objective_follows_the_distill_config():
    """OfflineKDObjective.from_config takes temperature, kd_loss_scale and skip_lm_loss from the
    distillation config and the mode as given."""
    from kd_module.offline.objective import OfflineKDObjective

    distill = DistillConfig(logit_kl_temperature=2.0, kd_loss_scale=0.25, skip_lm_loss=False)
    objective = OfflineKDObjective.from_config(distill, "renormalized")
    assert objective == OfflineKDObjective(
        mode="renormalized", temperature=2.0, kd_loss_scale=0.25, skip_lm_loss=False
    )


def test_only_online_kd_needs_the_teachers_tensor_shapes(single_rank):
    """needs_teacher_tensor_shapes: KD yes, LM and offline no; at PP=1 no objective asks ModelOpt
    for its tensor-shape hook."""
    from kd_module.distillation.objectives import KDObjective, LMObjective
    from kd_module.offline.objective import OfflineKDObjective

    assert KDObjective().needs_teacher_tensor_shapes
    assert not LMObjective().needs_teacher_tensor_shapes
    assert not OfflineKDObjective().needs_teacher_tensor_shapes
    model = _student()
    for objective in (KDObjective(), LMObjective(), OfflineKDObjective()):
        assert objective.tensor_shapes_adjust_fn(model, SEQ, MICRO_BATCH) is None


def _pipeline_shape_decisions() -> dict[str, object]:
    """At PP=2 on a DistillationModel: which objectives get ModelOpt's hook, and what it does."""
    from kd_module.distillation.model import build_distillation_model
    from kd_module.distillation.objectives import KDObjective, LMObjective
    from kd_module.parallel import runtime

    class LMWithTeacherShapes(LMObjective):
        @property
        def needs_teacher_tensor_shapes(self) -> bool:
            return True

    runtime.initialize_distributed(1, 2, seed=5)
    teacher = STUDENT.replace(hidden_size=48, ffn_hidden_size=96)
    model = build_distillation_model(
        STUDENT, teacher, DistillConfig(), ParallelLayout(pipeline_model_parallel_size=2)
    ).model
    hooks = {
        type(objective).__name__: objective.tensor_shapes_adjust_fn(model, SEQ, MICRO_BATCH)
        for objective in (KDObjective(), LMObjective(), LMWithTeacherShapes())
    }
    shape = (SEQ, MICRO_BATCH, 32)
    adjusted = hooks["KDObjective"]([shape], [shape])
    return {
        "has_hook": {name: hook is not None for name, hook in hooks.items()},
        "adjusted": adjusted,
    }


def test_pipeline_shape_hook_is_the_objectives_decision():
    """At PP=2 (2 gloo ranks) ModelOpt's hook comes with KDObjective and with any objective whose
    needs_teacher_tensor_shapes is true, never with LMObjective; it widens the activations sent
    between stages by the teacher's hidden size (32 + 48)."""
    for result in run_distributed(_pipeline_shape_decisions, 2, timeout=300):
        assert result["has_hook"] == {
            "KDObjective": True,
            "LMObjective": False,
            "LMWithTeacherShapes": True,
        }
        received, sent = result["adjusted"]
        assert received == [(SEQ, MICRO_BATCH, 80)] and sent == [(SEQ, MICRO_BATCH, 80)]


def test_unknown_objective_name_lists_the_allowed_ones():
    """An unknown objective name is refused before megatron's schedule runs, naming the allowed
    names; the known names map to their objects."""
    from kd_module.distillation.model import forward_backward
    from kd_module.distillation.objectives import KDObjective, LMObjective, resolve_objective
    from kd_module.offline.objective import OfflineKDObjective

    message = r"objective: unknown name 'kld' \(allowed: 'kd', 'lm', 'offline'"
    with pytest.raises(ValueError, match=message):
        forward_backward(None, iter([]), 1, SEQ, MICRO_BATCH, objective="kld")
    assert type(resolve_objective("kd")) is KDObjective
    assert type(resolve_objective("lm")) is LMObjective
    assert resolve_objective("offline") == OfflineKDObjective()
    objective = LMObjective()
    assert resolve_objective(objective) is objective
