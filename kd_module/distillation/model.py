"""Student + frozen teacher in a ModelOpt ``DistillationModel``, and the KD loss for megatron.

:func:`build_distillation_model` builds the local pipeline stage of the student and of the teacher
at the current parallel layout, converts the student with ModelOpt's ``kd_loss`` mode (criteria
on the last pipeline stage only, as ModelOpt's megatron plugin requires), applies ModelOpt's
megatron-core adjustments (teacher hidden from checkpoints, pipeline tensor concatenation), and
freezes the teacher.

:func:`forward_backward` runs megatron's forward-backward schedule with an objective of
:mod:`kd_module.distillation.objectives` (:class:`~kd_module.distillation.objectives.KDObjective`
for this model). Its loss function returns megatron's per-token triple ``(loss_sum, num_tokens,
report)``; with ``calculate_per_token_loss`` megatron divides gradients by the global token count
(all micro-batches, all data-parallel and context-parallel ranks), so every term is a per-token
mean over the global batch.

Objective, per token ``t`` with loss mask 1::

    logits_t       = logit KD loss (forward KL by default) between student and teacher
    intermediate_t = mean over intermediate pairs of their per-token loss (cosine or MSE)
    kd_t           = logits_t + intermediate_t
    loss_t         = kd_t                                  if skip_lm_loss
                   = lm_t + kd_loss_scale * kd_t           otherwise

and ``kd_loss`` (logged) is the mean of ``loss_t``: the objective that is backpropagated
(:func:`~kd_module.distillation.objectives.mix_terms`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from types import MethodType, SimpleNamespace
from typing import Any

import modelopt.torch.distill as mtd
import torch
from modelopt.torch.distill.plugins import megatron as mtd_megatron

from kd_module.distillation.config import (
    OUTPUT_LAYERS,
    DistillConfig,
    check_module_names,
    check_pipeline_placement,
)
from kd_module.distillation.objectives import (
    Objective,
    cross_entropy_keeping_logits,
    mix_terms,
    resolve_objective,
)
from kd_module.models.gpt import (
    GPTModelConfig,
    ParallelLayout,
    build_model,
    implementation_problems,
)

logger = logging.getLogger(__name__)


class KDLossBalancer(mtd.DistillationLossBalancer):
    """Combines ModelOpt's per-criterion losses into the documented objective (module docstring).

    It receives the dict ``DistillationModel.compute_kd_loss`` builds: the student's LM loss under
    ``student_loss`` and one entry per criterion, keyed by the criterion's class name. Unlike
    ModelOpt's ``LogitsAndIntermediatesLossBalancer`` it rescales nothing dynamically: every term
    keeps its own units, so each logged term means what its name says.
    """

    def __init__(self, kd_loss_scale: float = 1.0, skip_lm_loss: bool = True) -> None:
        super().__init__()
        self.kd_loss_scale = kd_loss_scale
        self.skip_lm_loss = skip_lm_loss

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss_dict = dict(loss_dict)
        lm_loss = loss_dict.pop("student_loss")
        logits_keys = [key for key in loss_dict if "Logits" in key]
        if len(logits_keys) != 1:
            raise RuntimeError(f"expected exactly one logits criterion, got {sorted(loss_dict)}")
        logits_loss = loss_dict.pop(logits_keys[0])
        if loss_dict:
            intermediate_loss = sum(loss_dict.values()) / len(loss_dict)
        else:
            intermediate_loss = torch.zeros_like(logits_loss)
        return mix_terms(
            lm_loss, logits_loss, intermediate_loss, self.kd_loss_scale, self.skip_lm_loss
        )


def _local_layer_name(name: str, layer_offset: int) -> str:
    """``decoder.layers.N.x`` with the global index N turned into this stage's local index."""
    match = re.search(r"(?<=\.layers\.)\d+(?=\.|$)", name)
    if not match:
        return name
    local = int(match.group(0)) - layer_offset
    return name[: match.start()] + str(local) + name[match.end() :]


def _layer_offset(model: Any) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config)


def _projection_layer(student: Any, teacher: Any) -> torch.nn.Module:
    """ModelOpt's student-to-teacher projection, on the student's device and in its dtype.

    One projection is shared by all intermediate pairs (identity when the hidden sizes match),
    as in ModelOpt. It is made after the student, so neither ``build_model``'s move to the run's
    device nor the student's ``params_dtype`` reached it; and it is initialized on the CPU
    (explicitly, even under Lightning's ``torch.device("cuda")`` init context) so that its
    initial weights come from the same generator, and are the same, on every device.
    """
    reference = next(student.parameters())
    with torch.device("cpu"):
        projection = mtd_megatron.ProjectionLayer(student.config, teacher.config)
    return projection.to(device=reference.device, dtype=student.config.params_dtype)


FUSED_MIN_VOCAB = 32768
"""From this padded vocabulary size on, ``logit_loss_impl: auto`` fuses the logits loss."""


def resolve_logit_loss_impl(
    distill: DistillConfig, shared_vocab_size: int | None, vocab_size: int | None = None
) -> str:
    """The logits loss implementation ``distill.logit_loss_impl`` names, ``auto`` resolved.

    ``auto`` is ``fused`` where it applies (``logit_layers`` are both models' output layers and
    the two vocabularies are padded alike: ``shared_vocab_size`` is ``None``) and the padded
    vocabulary has at least :data:`FUSED_MIN_VOCAB` entries; ``chunked`` otherwise. What was
    measured (``bench/RESULTS.md``, fp32 on CPU, student width 512, teacher 768, 4096 tokens):
    fusing removes both models' ``[tokens, vocab]`` logits from the step, so a whole step's peak
    memory is 0.23x the chunked path's at vocab 131072 and 0.54x at 32768, but only 0.92x at
    16384; the step takes about as long either way from 16384 up (1.02x to 1.04x at 131072,
    0.98x at 32768), and longer at small vocabularies (1.04x to 1.08x at 8192 with
    ``bench.kd_overhead``'s models, where the chunked projections cost more than they save).
    So ``auto`` fuses where the saving is large and keeps the chunked path below.

    Args:
        distill: the distillation config.
        shared_vocab_size: the vocabulary the loss is cut to when the paddings differ, else
            ``None`` (as :func:`build_distillation_model` passes it to the criterion).
        vocab_size: the student's padded vocabulary (``None``: unknown, treated as large).

    Returns:
        ``"fused"``, ``"chunked"`` or ``"modelopt"``.

    Raises:
        ValueError: when ``fused`` or ``modelopt`` is asked for differently padded vocabularies.
    """
    impl = distill.logit_loss_impl
    if impl == "auto":
        fusable = list(distill.logit_layers) == OUTPUT_LAYERS and shared_vocab_size is None
        large = vocab_size is None or vocab_size >= FUSED_MIN_VOCAB
        return "fused" if fusable and large else "chunked"
    if impl in ("fused", "modelopt") and shared_vocab_size is not None:
        raise ValueError(
            f"distill config: logit_loss_impl={impl!r} needs teacher and student vocabularies "
            f"padded alike, but the loss is cut to shared_vocab_size={shared_vocab_size}; use "
            "logit_loss_impl auto or chunked"
        )
    return impl


def build_criterion(
    distill: DistillConfig,
    student: Any,
    teacher: Any,
    chunk_size: int = 1024,
    shared_vocab_size: int | None = None,
) -> dict[tuple[str, str], torch.nn.Module]:
    """ModelOpt criterion dict for the last pipeline stage: logits pair plus intermediate pairs.

    ``shared_vocab_size`` (see :class:`~kd_module.distillation.losses.LogitsKDLoss`) restricts
    the logits loss to the real vocabulary when teacher and student pad theirs differently. With
    ``logit_loss_impl`` resolving to ``modelopt`` the logits pair gets ModelOpt's
    ``LogitsKLLoss`` (``TopKLogitsKLLoss`` with ``logit_kl_topk``); otherwise our
    :class:`~kd_module.distillation.losses.KDLogitsCriterion`, which the fused path feeds too.
    """
    from kd_module.distillation.losses import KDLogitsCriterion

    if distill.logit_loss_impl == "modelopt":
        temperature = distill.logit_kl_temperature
        if distill.logit_kl_topk is None:
            logits_criterion = mtd_megatron.LogitsKLLoss(student.config, temperature=temperature)
        else:
            logits_criterion = mtd_megatron.TopKLogitsKLLoss(
                student.config, temperature=temperature, top_k=distill.logit_kl_topk
            )
    else:
        logits_criterion = KDLogitsCriterion(
            student.config, logits_loss(distill, chunk_size, shared_vocab_size)
        )
    criterion: dict[tuple[str, str], torch.nn.Module] = {
        tuple(distill.logit_layers): logits_criterion
    }
    if distill.intermediate_layer_pairs:
        projection = _projection_layer(student, teacher)
        student_offset, teacher_offset = _layer_offset(student), _layer_offset(teacher)
        losses = {"cosine": mtd_megatron.HiddenStateCosineLoss, "mse": mtd_megatron.MSELoss}
        for pair in distill.intermediate_layer_pairs:
            student_name = _local_layer_name(pair[0], student_offset)
            teacher_name = _local_layer_name(pair[1], teacher_offset)
            loss_cls = losses[pair[2] if len(pair) == 3 else "cosine"]
            criterion[(student_name, teacher_name)] = loss_cls(
                student.config, projection_layer=projection
            )
    return criterion


def logits_loss(
    distill: DistillConfig, chunk_size: int = 1024, shared_vocab_size: int | None = None
) -> Any:
    """The :class:`~kd_module.distillation.losses.LogitsKDLoss` the config describes."""
    from kd_module.distillation.losses import LogitsKDLoss

    return LogitsKDLoss(
        loss_type=distill.logit_loss,
        temperature=distill.logit_kl_temperature,
        jsd_beta=distill.jsd_beta,
        top_k=distill.logit_kl_topk,
        chunk_size=chunk_size,
        shared_vocab_size=shared_vocab_size,
    )


def _lm_loss_keeping_logits(self: Any, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The student's LM loss hook: megatron's ``compute_language_model_loss`` (no loss fusion in
    our models) through :func:`~kd_module.distillation.objectives.cross_entropy_keeping_logits`,
    which leaves the logits the KD criterion reads intact. The loss needs its gradient only when
    it enters the objective (``skip_lm_loss: false``) and the model is training.
    """
    in_objective = not self.training or getattr(self, "_lm_loss_in_objective", True)
    # megatron's layout: labels [b, s], logits [s, b, v_local], loss [b, s].
    loss = cross_entropy_keeping_logits(
        logits,
        labels.transpose(0, 1).contiguous(),
        in_objective=in_objective,
        chunk_size=getattr(self, "_lm_loss_chunk_size", 1024),
    )
    return loss.transpose(0, 1).contiguous()


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher: eval mode and no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class DistillationParts:
    """What :func:`build_distillation_model` made, for callers that need the pieces."""

    model: Any
    """The ModelOpt ``DistillationModel`` (student module with the teacher inside)."""
    distill: DistillConfig
    """The validated distillation config."""
    is_last_stage: bool
    """Whether this rank holds criteria (the last pipeline stage)."""


def validate_modules(
    distill: DistillConfig,
    student: Any,
    teacher: Any,
    student_config: GPTModelConfig,
    teacher_config: GPTModelConfig,
    layout: ParallelLayout,
) -> None:
    """Module names exist on the built models and sit on the last pipeline stage."""
    from megatron.core import parallel_state

    problems: list[str] = []
    pairs = distill.intermediate_layer_pairs
    problems += check_pipeline_placement(
        [p[0] for p in pairs],
        student_config.num_layers,
        layout.pipeline_model_parallel_size,
        "student",
    )
    problems += check_pipeline_placement(
        [p[1] for p in pairs],
        teacher_config.num_layers,
        layout.pipeline_model_parallel_size,
        "teacher",
    )
    if not problems and parallel_state.is_pipeline_last_stage():
        s_off, t_off = _layer_offset(student), _layer_offset(teacher)
        student_names = [distill.logit_layers[0]] + [_local_layer_name(p[0], s_off) for p in pairs]
        teacher_names = [distill.logit_layers[1]] + [_local_layer_name(p[1], t_off) for p in pairs]
        problems += check_module_names(student, student_names, "student")
        problems += check_module_names(teacher, teacher_names, "teacher")
    if problems:
        raise ValueError("distill config: " + "; ".join(problems))


def vocabulary_problems(
    student_vocab: int | None, teacher_vocab: int | None, shared_vocab_size: int | None
) -> list[str]:
    """Whether teacher and student can be distilled over one vocabulary (messages unprefixed).

    Each padded vocabulary must hold the tokenizer's ``shared_vocab_size`` entries; different
    paddings need it (the loss then compares ``[0, shared_vocab_size)``).
    """
    problems = []
    if shared_vocab_size is not None:
        for who, padded in (("teacher", teacher_vocab), ("student", student_vocab)):
            if padded is not None and padded < shared_vocab_size:
                problems.append(
                    f"the {who}'s padded vocab_size {padded} is smaller than the tokenizer's "
                    f"{shared_vocab_size} tokens; the {who} cannot have been trained with this "
                    "tokenizer (check its config's vocab_size, or the data's tokenizer)"
                )
    elif student_vocab != teacher_vocab:
        problems.append(
            f"teacher vocab_size {teacher_vocab} differs from student vocab_size {student_vocab}"
            "; pass shared_vocab_size (the tokenizer's size) to distill over the real vocabulary"
        )
    return problems


def check_virtual_pipeline(layout: ParallelLayout) -> None:
    """Megatron-LM's restriction: no interleaved (virtual) pipeline schedule with distillation."""
    if layout.virtual_pipeline_model_parallel_size not in (None, 1):
        raise ValueError(
            "parallel layout: virtual_pipeline_model_parallel_size="
            f"{layout.virtual_pipeline_model_parallel_size} (interleaved pipeline parallelism) is "
            "not supported for distillation; use None (the 1F1B schedule)"
        )


def build_distillation_model(
    student_config: GPTModelConfig,
    teacher_config: GPTModelConfig,
    distill: DistillConfig | None = None,
    layout: ParallelLayout | None = None,
    vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    params_dtype: Any = None,
    teacher: torch.nn.Module | None = None,
    teacher_loader: Any = None,
    student_init: Any = None,
    loss_chunk_size: int = 1024,
    shared_vocab_size: int | None = None,
) -> DistillationParts:
    """Build student and frozen teacher for this rank's pipeline stage inside a DistillationModel.

    megatron's parallel state must already be initialized at ``layout``.

    Args:
        student_config: student architecture.
        teacher_config: teacher architecture (see ``kd_module.nemo_format``).
        distill: distillation config; ``None`` means logits-only defaults.
        layout: parallel sizes (must match megatron's parallel state).
        vocab_size: padded vocabulary size when the configs leave it unset.
        teacher_vocab_size: the teacher's padded vocabulary when its config leaves it unset
            (defaults to the student's).
        params_dtype: parameter dtype (fp32 default).
        teacher: an already built teacher stage (its weights are used as they are).
        teacher_loader: ``fn(teacher_module) -> None`` loading teacher weights in place.
        student_init: ``fn(student_module) -> None`` initializing student weights in place.
        loss_chunk_size: tokens per chunk of the memory-efficient logits loss.
        shared_vocab_size: the tokenizer's size ``N`` (the data tokenizer's ``vocab_size``).
            Both padded vocabularies must hold it. When they differ (one tokenizer, embedding
            tables padded differently) the KD loss is taken over ``[0, N)`` only; when they are
            equal the whole padded vocabulary is compared, as it always was (row ``i`` is the
            same token on both sides, padding included). ``None``: the padded sizes must match.

    Returns:
        The :class:`DistillationParts`.

    Raises:
        ValueError: for a config the models cannot satisfy (names, placement, vocabulary,
            interleaved pipeline).
    """
    from megatron.core import parallel_state

    distill = distill or DistillConfig()
    layout = layout or ParallelLayout()
    check_virtual_pipeline(layout)
    student_vocab = student_config.vocab_size or vocab_size
    teacher_vocab = teacher_config.vocab_size or teacher_vocab_size or student_vocab
    problems = vocabulary_problems(student_vocab, teacher_vocab, shared_vocab_size)
    if problems:
        raise ValueError("vocabulary: " + "; ".join(problems))
    # Equal tables are compared whole (today's loss, bit for bit); only differently padded ones
    # need the cut to the shared vocabulary.
    loss_vocab = None if student_vocab == teacher_vocab else shared_vocab_size
    # Refused here, before anything is built.
    logit_loss_impl = resolve_logit_loss_impl(distill, loss_vocab, student_vocab)
    problems = student_config.layout_problems(
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.context_parallel_size,
        who="student",
    ) + teacher_config.layout_problems(
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.context_parallel_size,
        who="teacher",
    )
    if problems:
        raise ValueError("parallel layout: " + "; ".join(problems))
    problems = implementation_problems(
        student_config, layout.context_parallel_size, who="student"
    ) + implementation_problems(teacher_config, layout.context_parallel_size, who="teacher")
    if problems:
        raise ValueError("model config: " + "; ".join(problems))

    student = build_model(student_config, layout, student_vocab, params_dtype)
    built_teacher = teacher is None
    if built_teacher:
        teacher = build_model(teacher_config, layout, teacher_vocab, params_dtype)
    # Names are checked on the built modules, before any weights are read.
    validate_modules(distill, student, teacher, student_config, teacher_config, layout)
    if student_init is not None:
        student_init(student)
    if built_teacher and teacher_loader is not None:
        teacher_loader(teacher)
    freeze(teacher)

    is_last = parallel_state.is_pipeline_last_stage()
    criterion = (
        build_criterion(distill, student, teacher, loss_chunk_size, loss_vocab) if is_last else {}
    )
    balancer = KDLossBalancer(distill.kd_loss_scale, distill.skip_lm_loss)
    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {"teacher_model": teacher, "criterion": criterion, "loss_balancer": balancer},
            )
        ],
    )
    # The student's LM loss is always computed so that ``lm_loss`` can be logged; whether it
    # enters the objective is decided by KDLossBalancer.
    mtd_megatron.adjust_distillation_model_for_mcore(model, SimpleNamespace(skip_lm_loss=False))
    model.compute_language_model_loss = MethodType(_lm_loss_keeping_logits, model)
    model._lm_loss_in_objective = not distill.skip_lm_loss
    model._lm_loss_chunk_size = loss_chunk_size
    if is_last and logit_loss_impl == "fused":
        from kd_module.distillation.fused import install_fused_logits_loss

        kd_weight = 1.0 if distill.skip_lm_loss else distill.kd_loss_scale
        install_fused_logits_loss(model, logits_loss(distill, loss_chunk_size), kd_weight)
    freeze(model.teacher_model)
    return DistillationParts(model=model, distill=distill, is_last_stage=is_last)


def forward_backward(
    model: Any,
    data_iterator: Any,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    objective: Objective | str = "kd",
) -> dict[str, torch.Tensor]:
    """One pass of megatron's forward-backward schedule over ``num_microbatches`` micro-batches.

    Picks megatron's schedule for the current layout; the objective gives the forward step and,
    when it needs them with PP > 1, ModelOpt's tensor shapes (student and teacher activations
    travel concatenated between stages).

    Args:
        model: the (possibly DDP-wrapped) model of this stage.
        data_iterator: yields micro-batch dicts (``tokens``, ``labels``, ``loss_mask``,
            ``position_ids``, optional ``attention_mask``).
        num_microbatches: micro-batches in this step.
        seq_length: tokens per sample.
        micro_batch_size: samples per micro-batch.
        forward_only: evaluation (no backward).
        objective: an :class:`~kd_module.distillation.objectives.Objective`, or its name
            (``"kd"``, ``"lm"``, ``"offline"``; see
            :func:`~kd_module.distillation.objectives.resolve_objective`).

    Returns:
        On the last pipeline stage, each report key mapped to ``[sum, num_tokens]`` summed over
        this rank's micro-batches; empty on other stages.

    Raises:
        ValueError: for an unknown objective name.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    objective = resolve_objective(objective)
    reports = get_forward_backward_func()(
        forward_step_func=objective.forward_step,
        data_iterator=data_iterator,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=objective.tensor_shapes_adjust_fn(
            model, seq_length, micro_batch_size
        ),
    )
    return objective.sum_micro_batches(reports or [])
