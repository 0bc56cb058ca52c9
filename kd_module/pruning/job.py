"""``prune``: the task that cuts a student out of its teacher (``nemo kd prune``)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from kd_module.cli.errors import cli_errors
from kd_module.rules import Problems, checkpoint_problems, writable_dir_problems
from kd_module.specs import TeacherSpec, group_problems

logger = logging.getLogger(__name__)

REPORT_FILE = "pruning.json"
"""What the pruned checkpoint records about its pruning, beside ``model_config.yaml``."""


@cli_errors
def prune(
    data: Any,
    output: str,
    teacher: TeacherSpec | None = None,
    target: Any = None,
    params: int | None = None,
    calibration_samples: int = 256,
    tensor_model_parallel_size: int = 1,
    accelerator: str = "cpu",
    seed: int = 1234,
    export_hf: str | None = None,
    teacher_init_fn: Any = None,
) -> dict[str, Any]:
    """Prune the teacher to a smaller architecture (Minitron), for a student to distill.

    Runs in one process: the teacher is built whole (TP=1, PP=1, local spec), run forward over
    ``calibration_samples`` samples of ``data``'s train split to rank its hidden channels,
    heads, query groups, FFN neurons and layers (:mod:`kd_module.pruning.minitron`), and the
    most important parts are copied into the pruned model, saved as a ``torch_dist`` checkpoint
    with its ``model_config.yaml`` (and ``pruning.json``): ``student_checkpoint`` of
    :func:`~kd_module.api.distill` at any layout.

    Args:
        data: the :class:`~kd_module.data.GPTDataModule` to calibrate on (its train split).
        output: the pruned checkpoint's directory (replaced only once complete).
        teacher: the teacher (:class:`~kd_module.specs.TeacherSpec`), as for ``distill``.
        target: the pruned architecture (:class:`~kd_module.models.gpt.GPTModelConfig`; only
            ``num_layers``, ``hidden_size``, ``ffn_hidden_size``, ``num_attention_heads`` and
            ``num_query_groups`` may differ from the teacher's), or ``None`` with ``params``.
        params: a parameter budget instead of ``target``: hidden and FFN sizes shrink together
            until the model fits (heads and depth kept).
        calibration_samples: train samples the importance is measured over (at least one
            micro-batch).
        tensor_model_parallel_size: the TP size the student will be distilled at (its heads,
            groups and sizes must divide).
        accelerator: ``cpu`` or ``gpu`` for the calibration forward.
        seed: torch and megatron seed.
        export_hf: also write the pruned model as a Hugging Face directory here.
        teacher_init_fn: ``fn(teacher)`` initializing weights when there is no checkpoint
            (tests).

    Returns:
        The report written to ``output/pruning.json``: architectures, parameter counts, the
        kept layers, groups and heads, the layer scores, time.

    Raises:
        ValueError: before any model is built, for a target that is not smaller than the
            teacher or differs from it in another field, heads not divisible by the query
            groups or the TP size, a budget no architecture meets, too few calibration samples,
            more than one rank, or an unwritable output.

    Examples:
        ``nemo kd prune --factory tiny_cpu output=runs/pruned``
    """
    import torch

    from kd_module.data.tokenizers import padded_vocab_size
    from kd_module.models.gpt import GPTModelConfig
    from kd_module.nemo_format.discovery import load_teacher_model_config
    from kd_module.pruning import minitron

    problems = Problems(group_problems({"teacher": teacher}))
    teacher = teacher or TeacherSpec()
    problems += checkpoint_problems("teacher.checkpoint", teacher.checkpoint, teacher.ckpt_format)
    problems.positive_int("calibration_samples", calibration_samples)
    problems.positive_int("tensor_model_parallel_size", tensor_model_parallel_size)
    known_accelerator = problems.one_of("accelerator", accelerator, ("cpu", "gpu"))
    if known_accelerator and accelerator == "gpu" and not torch.cuda.is_available():
        problems.add("accelerator='gpu' but CUDA is not available; use accelerator='cpu'")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        problems.add(
            f"pruning runs in one process (TP=1, PP=1) but this launch has "
            f"{os.environ['WORLD_SIZE']} ranks; run it without torchrun"
        )
    if (target is None) == (params is None):
        problems.add("give exactly one of target (an architecture) and params (a budget)")
    problems += writable_dir_problems(output, "output")
    if export_hf is not None:
        problems += writable_dir_problems(export_hf, "export_hf")
    problems.raise_if_any("prune")

    architecture, tokenizer = teacher.config, {}
    if architecture is None:
        resolved = load_teacher_model_config(
            teacher.model_config, GPTModelConfig(seq_length=data.seq_length), teacher.checkpoint
        )
        architecture, tokenizer = resolved.model, resolved.tokenizer or {}
    vocab = architecture.vocab_size or padded_vocab_size(
        data.tokenizer.build().vocab_size, architecture.make_vocab_size_divisible_by
    )
    if params is not None:
        if not problems.positive_int("params", params):
            problems.raise_if_any("prune")
        target = minitron.budget_target(architecture, params, vocab)
    problems += minitron.target_problems(architecture, target, vocab)
    if not problems:
        pruned = minitron.pruned_config(architecture, target)
        problems += pruned.layout_problems(tensor_model_parallel_size, 1, 1, who="pruned model")
    if isinstance(calibration_samples, int) and calibration_samples < data.micro_batch_size:
        problems.add(
            f"calibration_samples={calibration_samples} is less than one micro-batch "
            f"({data.micro_batch_size} samples); calibrate on at least that many"
        )
    problems.raise_if_any("prune")

    from kd_module.checkpoints.atomic import write_json_atomic
    from kd_module.checkpoints.model import load_model_checkpoint, save_model_checkpoint
    from kd_module.data.datamodule import model_inputs
    from kd_module.models.gpt import build_model
    from kd_module.parallel import runtime

    start = time.perf_counter()
    local = architecture.replace(transformer_impl="local")
    runtime.initialize_distributed(seed=seed, device="cuda" if accelerator == "gpu" else "cpu")
    try:
        device = torch.device("cuda" if accelerator == "gpu" else "cpu")
        teacher_model = build_model(local, vocab_size=vocab)
        if teacher.checkpoint is not None:
            load_model_checkpoint(teacher_model, teacher.checkpoint, teacher.ckpt_format)
        elif teacher_init_fn is not None:
            teacher_init_fn(teacher_model)
        else:
            logger.warning("prune: no teacher checkpoint, pruning a randomly initialized teacher")
        data.num_train_samples = max(data.num_train_samples or 0, calibration_samples)
        data.setup("fit")
        dataset, size = data.train_dataset, data.micro_batch_size
        batches = (
            model_inputs(
                [dataset[i] for i in range(first, min(first + size, calibration_samples))], device
            )
            for first in range(0, calibration_samples, size)
        )
        importance = minitron.activation_importance(teacher_model, batches)
        plan = minitron.plan_pruning(architecture, target, importance)
        student = build_model(plan.config.replace(transformer_impl="local"), vocab_size=vocab)
        minitron.copy_pruned_weights(teacher_model, student, plan, architecture)
        del teacher_model
        saved = save_model_checkpoint(
            student,
            output,
            "torch_dist",
            model_config=plan.config.replace(vocab_size=vocab),
            tokenizer=tokenizer or data.tokenizer.to_dict(),
        )
        report = {
            "teacher": {
                "checkpoint": teacher.checkpoint,
                "parameters": minitron.parameter_count(architecture, vocab),
            },
            "pruned": {
                "parameters": minitron.parameter_count(plan.config, vocab),
                **{key: getattr(plan.config, key) for key in minitron.PRUNED_FIELDS},
            },
            "calibration": {"samples": calibration_samples, "tokens": importance.tokens},
            "layer_importance": [float(score) for score in importance.layers],
            **plan.summary(),
            "wall_s": time.perf_counter() - start,
        }
        write_json_atomic(Path(saved) / REPORT_FILE, report)
        if export_hf is not None:
            from kd_module.hf.exporter import export_hf as write_hf

            report["export_hf"] = str(write_hf(saved, export_hf))
            write_json_atomic(Path(saved) / REPORT_FILE, report)
    finally:
        runtime.destroy_distributed()
    logger.info(
        "prune: %s parameters -> %s, saved to %s",
        f"{report['teacher']['parameters']:,}",
        f"{report['pruned']['parameters']:,}",
        saved,
    )
    return report
