"""``distill(...)``: the task function recipes point at.

It takes the teacher, the run and the offline cache as small configs (:mod:`kd_module.specs`),
checks every input before any model is built (files, configs, parallel layout, batch sizes,
sequence length, tokenizer), attaches a CSV logger at ``<job.log_dir>/<job.name>``, runs
``trainer.fit`` and writes ``summary.json`` there.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from kd_module.checkpoints.atomic import write_json_atomic
from kd_module.cli.errors import cli_errors
from kd_module.rules import Problems, checkpoint_problems, tokenizer_problems
from kd_module.specs import (
    OfflineConfig,
    RunConfig,
    TeacherSpec,
    fold_flat_keywords,
    group_problems,
)
from kd_module.versions import jsonable, package_versions

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def _placement_problems(module: Any, layout: Any, earlier: list[str]) -> list[str]:
    """Intermediate layers that do not exist or are not on the last pipeline stage."""
    from kd_module.distillation.config import check_pipeline_placement

    pairs = module.distill_config.intermediate_layer_pairs
    if earlier or not pairs:  # a layer count the layout cannot split is already reported
        return []
    out: list[str] = []
    for who, config, names in (
        ("student", module.student_config, [pair[0] for pair in pairs]),
        ("teacher", module.teacher_config, [pair[1] for pair in pairs]),
    ):
        out += check_pipeline_placement(
            names, config.num_layers, layout.pipeline_model_parallel_size, who
        )
    return [f"distill config: {problem}" for problem in out]


def _vocabulary_problems(module: Any, tokenizer_size: int | None) -> list[str]:
    """Each padded vocabulary a config fixes holds the tokenizer's entries; the paddings may
    differ (the KD loss then compares the tokenizer's vocabulary only)."""
    from kd_module.distillation.model import vocabulary_problems

    if module.teacher_config is None or tokenizer_size is None:
        return []
    student, teacher = module.student_config.vocab_size, module.teacher_config.vocab_size
    problems = vocabulary_problems(student or None, teacher or None, tokenizer_size)
    return [f"vocabulary: {problem}" for problem in problems]


def _tokenizer_size(tokenizer: Any) -> int | None:
    """The data tokenizer's vocabulary size; ``None`` when its library is not installed (that
    is reported when the data module builds it)."""
    try:
        return int(tokenizer.build().vocab_size)
    except ImportError:
        return None


def _with_hf_tokenizer_size(section: dict[str, Any], data_tokenizer: Any) -> dict[str, Any]:
    """The teacher's tokenizer section with the size of the HF tokenizer it names, when that is
    not the data's own tokenizer directory (an HF directory's section gives no size)."""
    from kd_module.data.tokenizers import TokenizerConfig
    from kd_module.hf.config import hf_tokenizer_dir

    path = hf_tokenizer_dir(section)
    if section.get("vocab_size") is not None or path is None:
        return section
    if data_tokenizer.library != "huggingface":
        return section
    if Path(path).resolve() == Path(str(data_tokenizer.path)).resolve():
        return section
    size = _tokenizer_size(TokenizerConfig(library="huggingface", path=path))
    return section if size is None else {**section, "vocab_size": size}


def _hf_problems(label: str, path: str | None, config: Any, tp: int) -> list[str]:
    """An HF checkpoint's tensors against ``config`` and the TP size, from the headers alone."""
    if path is None or config is None:
        return []
    from kd_module.checkpoints.model import detect_checkpoint_format, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(path)
    if detect_checkpoint_format(directory) != "hf":
        return []
    from kd_module.hf.importer import check_hf_checkpoint

    try:
        check_hf_checkpoint(directory, config, tp)
    except (ValueError, FileNotFoundError) as error:
        return [f"{label}: {error}"]
    return []


def check_inputs(
    module: Any,
    data: Any,
    trainer: Any,
    teacher_tokenizer: dict[str, Any] | None = None,
) -> None:
    """Every problem with the run's inputs, raised as one ValueError before any model is built."""
    from kd_module.data.datamodule import check_prefixes_exist, check_seq_length
    from kd_module.distillation.model import check_virtual_pipeline
    from kd_module.models.gpt import implementation_problems
    from kd_module.training.strategy import MegatronStrategy

    problems = Problems()
    strategy = trainer.strategy
    if not isinstance(strategy, MegatronStrategy):
        raise ValueError(
            f"trainer.strategy is {type(strategy).__name__}; distillation needs "
            "kd_module.MegatronStrategy"
        )
    world_size = trainer.num_nodes * trainer.num_devices
    problems += strategy.layout_problems(world_size)
    layout = strategy.layout
    try:
        check_virtual_pipeline(layout)
    except ValueError as error:
        problems.append(str(error))
    configs = (("student", module.student_config), ("teacher", module.teacher_config))
    for who, config in configs:
        if config is None:  # offline distillation: no teacher model
            continue
        problems += config.layout_problems(
            layout.tensor_model_parallel_size,
            layout.pipeline_model_parallel_size,
            layout.context_parallel_size,
            who=who,
        )
        problems += implementation_problems(
            config,
            layout.context_parallel_size,
            reset_attention_mask=data.reset_attention_mask,
            cuda=strategy.root_device.type == "cuda",
            who=who,
        )
        try:
            check_seq_length(data.seq_length, config.padded_max_position_embeddings)
        except ValueError as error:
            problems.append(f"{who}: {error}")
    if not problems:
        problems += layout.problems(world_size, data.global_batch_size, data.micro_batch_size)
    if not data.mock:
        try:
            check_prefixes_exist(data.prefixes())
        except ValueError as error:
            problems.append(str(error))
    problems += _placement_problems(module, layout, problems)
    tokenizer_size = _tokenizer_size(data.tokenizer)
    problems += _vocabulary_problems(module, tokenizer_size)
    for label, path, requested, config in (
        (
            "teacher_checkpoint",
            module.teacher_checkpoint,
            module.teacher_ckpt_format,
            module.teacher_config,
        ),
        (
            "student_checkpoint",
            module.student_checkpoint,
            module.student_ckpt_format,
            module.student_config,
        ),
    ):
        found = checkpoint_problems(label, path, requested)
        problems += found or _hf_problems(label, path, config, layout.tensor_model_parallel_size)
    teacher_tokenizer = _with_hf_tokenizer_size(teacher_tokenizer or {}, data.tokenizer)
    problems += tokenizer_problems(data.tokenizer, teacher_tokenizer, tokenizer_size)
    problems.positive_int("trainer.max_steps", trainer.max_steps)
    problems.raise_if_any("distill")


def _attach_logger(trainer: Any, run_dir: Path, logger: Any = None) -> None:
    """The CSV logger at ``run_dir`` and the loggers ``logger`` names, unless the trainer came
    with its own (``Trainer(logger=...)``)."""
    from kd_module.lightning_factories import build_loggers

    if not trainer.loggers:
        trainer.loggers = build_loggers(logger, run_dir)


def _drop_default_checkpointing(trainer: Any) -> None:
    """Drop Lightning's default ModelCheckpoint (no dirpath); RunCheckpoint saves runs."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kd_module.checkpoints.run import RunCheckpoint

    trainer.callbacks[:] = [
        callback
        for callback in trainer.callbacks
        if not (
            isinstance(callback, ModelCheckpoint)
            and not isinstance(callback, RunCheckpoint)
            and callback.dirpath is None
        )
    ]


@cli_errors
def distill(
    student: Any,
    data: Any,
    trainer: Any,
    teacher: TeacherSpec | None = None,
    job: RunConfig | None = None,
    offline: OfflineConfig | None = None,
    student_checkpoint: str | None = None,
    student_ckpt_format: str = "auto",
    student_from: str = "init",
    prune_calibration_samples: int = 256,
    logger: str | list[str] | None = None,
    distill_config: str | dict | Any = None,
    optimizer: Any = None,
    loss_chunk_size: int = 1024,
    on_nonfinite: str = "stop",
    check_teacher_integrity: bool = True,
    **deprecated: Any,
) -> dict[str, Any]:
    """Distill a teacher into a student with megatron-core, ModelOpt and Lightning.

    Args:
        student: the student's :class:`~kd_module.models.gpt.GPTModelConfig`.
        data: a :class:`~kd_module.data.GPTDataModule`.
        trainer: a Lightning ``Trainer`` with a :class:`~kd_module.MegatronStrategy`.
        teacher: the teacher (:class:`~kd_module.specs.TeacherSpec`: checkpoint, architecture,
            ``model_config.yaml``, checkpoint format); ``None`` is ``TeacherSpec()`` (a random
            teacher of the student's architecture, tests only). Leave it ``None`` with
            ``offline``.
        job: logs, checkpoints, resume and export (:class:`~kd_module.specs.RunConfig`);
            ``None`` is ``RunConfig()``.
        offline: distill from a teacher cache instead of running a teacher
            (:class:`~kd_module.specs.OfflineConfig`); ``data`` must be the data the cache was
            made of.
        student_checkpoint: initialize the student from these weights (``None``: from scratch).
        student_ckpt_format: ``auto``, ``torch_dist`` or ``torch``.
        student_from: ``"init"`` (random weights, or ``student_checkpoint``) or ``"prune"``:
            prune the teacher to ``student``'s architecture first (Minitron,
            :func:`~kd_module.pruning.job.prune`, into ``<job.log_dir>/<job.name>/pruned``,
            reused when it is already there) and start the student from it.
        prune_calibration_samples: with ``student_from="prune"``, the train samples the
            pruning's importance is measured over.
        logger: loggers beside the CSV one (``<job.log_dir>/<job.name>/metrics.csv``):
            ``tensorboard``, ``wandb``, ``mlflow``, Lightning logger objects, or a list of them
            (:func:`~kd_module.lightning_factories.build_loggers`); ignored when the trainer
            brings its own loggers.
        distill_config: distillation YAML (``--export-kd-distill-cfg``), dict or config.
        optimizer: :class:`~kd_module.training.optim.OptimizerConfig`.
        loss_chunk_size: tokens per chunk of the memory-efficient logits loss.
        on_nonfinite: a step whose loss terms (``kd_loss``, ``logits_loss``,
            ``intermediate_loss``, ``lm_loss``) are NaN/Inf ``"stop"``s the run or is
            ``"skip"``ped (no update; listed as ``skipped_steps`` in the summary).
        check_teacher_integrity: hash the teacher's weights when built (``teacher_sha256`` in
            the summary) and fail at the end of training if they changed.
        **deprecated: the flat keywords of the release before (``teacher_checkpoint``,
            ``teacher_model_config``, ``teacher_ckpt_format``, ``log_dir``, ``name``,
            ``checkpoint_every_n_steps``, ``keep_last``, ``resume``, ``export``,
            ``teacher_cache``, ``offline_loss_mode``; and ``teacher=GPTModelConfig``), mapped
            onto the groups with a ``DeprecationWarning``
            (:data:`~kd_module.specs.FLAT_KEYWORDS`).

    Returns:
        The summary written to ``<job.log_dir>/<job.name>/summary.json``.

    Raises:
        ValueError: naming every problem with the inputs, before any model is built (and a
            deprecated keyword given together with its group's field, naming both).
        TypeError: a keyword that is neither an argument nor a deprecated one.

    Examples:
        From a shell::

            nemo kd distill --factory tiny_cpu -y trainer.max_steps=50 job.name=short

        From Python::

            distill(student, data, trainer, teacher=TeacherSpec(checkpoint="/ckpt/teacher"),
                    job=RunConfig(log_dir="/results", name="exp1"))
    """
    from kd_module.nemo_format.discovery import load_teacher_model_config
    from kd_module.training.module import DistillationModule

    start = time.perf_counter()
    groups = fold_flat_keywords(
        "distill", {"teacher": teacher, "job": job, "offline": offline}, deprecated
    )
    Problems(group_problems(groups)).raise_if_any("distill")
    teacher, offline = groups["teacher"], groups["offline"]
    job = groups["job"] or RunConfig()
    problems = Problems()
    problems.one_of("student_from", student_from, STUDENT_FROM)
    from kd_module.lightning_factories import logger_problems

    problems += logger_problems(logger)
    if student_from == "prune":
        problems.positive_int("prune_calibration_samples", prune_calibration_samples)
        if offline is not None:
            problems.add("student_from='prune' needs the teacher; it does not work with offline")
    problems.raise_if_any("distill")
    teacher_tokenizer: dict[str, Any] = {}
    if offline is not None:
        from kd_module.offline.module import OfflineDistillationModule

        if teacher is not None and (teacher.checkpoint is not None or teacher.config is not None):
            raise ValueError(
                "distill: offline.teacher_cache replaces the teacher; leave teacher unset (None) "
                "for offline distillation"
            )
        module = OfflineDistillationModule(
            student,
            offline.teacher_cache,
            distill_config=distill_config,
            offline_loss_mode=offline.loss_mode,
            student_checkpoint=student_checkpoint,
            student_ckpt_format=student_ckpt_format,
            optimizer=optimizer,
            on_nonfinite=on_nonfinite,
        )
        offline_problems = module.data_problems(data, trainer.max_steps)
        if offline_problems:
            raise ValueError("distill: " + "; ".join(offline_problems))
    else:
        teacher = teacher or TeacherSpec()
        architecture = teacher.config
        if architecture is None:
            resolved = load_teacher_model_config(teacher.model_config, student, teacher.checkpoint)
            architecture, teacher_tokenizer = resolved.model, resolved.tokenizer or {}
        if student_from == "prune":
            student, student_checkpoint = _pruned_student(
                student,
                architecture,
                teacher,
                data,
                job,
                student_checkpoint,
                prune_calibration_samples,
            )
        module = DistillationModule(
            student=student,
            teacher=architecture,
            teacher_checkpoint=teacher.checkpoint,
            teacher_ckpt_format=teacher.ckpt_format,
            teacher_model_config=teacher.model_config,
            student_checkpoint=student_checkpoint,
            student_ckpt_format=student_ckpt_format,
            distill_config=distill_config,
            optimizer=optimizer,
            loss_chunk_size=loss_chunk_size,
            on_nonfinite=on_nonfinite,
            check_teacher_integrity=check_teacher_integrity,
        )
    _adopt_teacher_tokenizer(data, teacher_tokenizer)
    check_inputs(module, data, trainer, teacher_tokenizer)
    run_dir = Path(job.log_dir) / job.name
    from kd_module.rules import writable_dir_problems

    problems = writable_dir_problems(run_dir, "run directory")
    if job.export_hf is not None:
        problems += _export_hf_problems(module.student_config, job.export_hf)
    if job.checkpoint_every_n_steps is not None and not problems:
        problems = writable_dir_problems(run_dir / "checkpoints", "checkpoint directory")
    if problems:
        raise ValueError("distill: " + "; ".join(problems))
    _attach_logger(trainer, run_dir, logger)
    checkpoint_dir = run_dir / "checkpoints"
    _drop_default_checkpointing(trainer)
    if job.checkpoint_every_n_steps is not None:
        from kd_module.checkpoints.run import RunCheckpoint

        trainer.callbacks.append(
            RunCheckpoint(str(checkpoint_dir), job.checkpoint_every_n_steps, job.keep_last)
        )
    ckpt_path = None
    if job.resume:
        from kd_module.checkpoints.run import latest_checkpoint

        latest = latest_checkpoint(checkpoint_dir)
        if latest is None:
            log.info("distill: resume requested, no complete checkpoint in %s", checkpoint_dir)
        else:
            ckpt_path = str(latest)
            log.info("distill: resuming from %s", latest)
    if job.export:
        module.export_dir = str(run_dir / "student")
        module.export_tokenizer = data.tokenizer.to_dict()
    _fit(trainer, module, data, ckpt_path, checkpoint_dir if job.checkpoint_every_n_steps else None)
    summary = build_summary(module, data, trainer, time.perf_counter() - start)
    if job.export_hf is not None and trainer.is_global_zero:
        summary["export_hf"] = str(export_hf_subprocess(run_dir / "student", job.export_hf))
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
        log.info("distill: summary written to %s", run_dir / SUMMARY_FILE)
    return summary


def _fit(trainer: Any, module: Any, data: Any, ckpt_path: str | None, checkpoint_dir: Any) -> None:
    """``trainer.fit``; a collective that lost its peer (a rank or a node died) is raised as
    :class:`~kd_module.parallel.collectives.PeerLostError`, saying where a rerun resumes."""
    from kd_module.parallel.collectives import is_peer_lost, peer_lost_error

    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Exception as error:
        if trainer.world_size == 1 or not is_peer_lost(error):
            raise
        resume_from = "the start (this run writes no checkpoints)"
        if checkpoint_dir is not None:
            from kd_module.checkpoints.run import latest_checkpoint

            latest = latest_checkpoint(checkpoint_dir)
            resume_from = (
                f"the last complete checkpoint {latest}"
                if latest is not None
                else f"the start (no complete checkpoint in {checkpoint_dir} yet)"
            )
        timeout = getattr(trainer.strategy, "timeout_minutes", None)
        raise peer_lost_error(error, timeout, resume_from) from error


def _adopt_teacher_tokenizer(data: Any, teacher_tokenizer: dict[str, Any]) -> None:
    """A data module left with the default tokenizer takes the teacher's HF tokenizer (the one
    in an HF teacher directory, or the one its ``model_config.yaml`` names) when it exists."""
    from kd_module.data.tokenizers import TokenizerConfig
    from kd_module.hf.config import hf_tokenizer_dir

    path = hf_tokenizer_dir(teacher_tokenizer)
    if getattr(data, "tokenizer_given", True) or path is None:
        return
    data.tokenizer = TokenizerConfig(library="huggingface", path=path)
    data.tokenizer_given = True
    log.info("distill: the data uses the teacher's tokenizer %s", path)


STUDENT_FROM = ("init", "prune")
"""Where :func:`distill`'s student starts: its initialization (or ``student_checkpoint``), or
the teacher pruned to its architecture."""


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
"""torchrun's per-process variables; a child process that keeps them would join the run's group."""


def run_single_rank(module_args: list[str], what: str) -> None:
    """``python -m MODULE ARGS`` in a fresh single-rank process: this process's environment
    without torchrun's variables, since this process's distributed state is the run's layout and
    the child's work (pruning, HF export) runs at TP=1.

    Raises:
        RuntimeError: when the child fails, with ``what`` and the end of its stderr.
    """
    import os
    import subprocess
    import sys

    env = {
        key: value
        for key, value in os.environ.items()
        if key not in LAUNCHER_ENV
        and not key.startswith(("TORCHELASTIC_", "MASTER_", "TORCH_NCCL_"))
    }
    done = subprocess.run(
        [sys.executable, "-m", *module_args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"distill: {what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )


def _pruned_student(
    student: Any,
    teacher_config: Any,
    teacher: TeacherSpec,
    data: Any,
    job: RunConfig,
    student_checkpoint: str | None,
    calibration_samples: int,
) -> tuple[Any, str]:
    """The student's architecture and checkpoint after pruning the teacher to ``student``.

    Global rank 0 prunes in a fresh single-rank process (the pruning runs at TP=1 whatever the
    run's layout) into ``<run>/pruned``; the other ranks wait for it. A ``<run>/pruned`` that is
    already complete (a restarted job) is used as it is.
    """
    import os
    import pickle

    from kd_module.nemo_format.discovery import load_teacher_model_config
    from kd_module.pruning.minitron import target_problems

    problems = Problems()
    if student_checkpoint is not None:
        problems.add(
            f"student_from='prune' starts the student from the pruned teacher; leave "
            f"student_checkpoint unset (got {student_checkpoint!r})"
        )
    if teacher.checkpoint is None:
        problems.add("student_from='prune' needs teacher.checkpoint (the weights to prune)")
    problems += [f"student_from='prune': {p}" for p in target_problems(teacher_config, student)]
    problems.raise_if_any("distill")
    output = Path(job.log_dir) / job.name / "pruned"
    done = output / "pruning.json"
    if not done.is_file():
        if os.environ.get("RANK", "0") == "0":
            output.parent.mkdir(parents=True, exist_ok=True)
            request = output.parent / ".prune-request.pkl"
            request.write_bytes(
                pickle.dumps(
                    {
                        "data": data,
                        "output": str(output),
                        "teacher": TeacherSpec(
                            checkpoint=teacher.checkpoint,
                            config=teacher_config,
                            ckpt_format=teacher.ckpt_format,
                        ),
                        "target": student,
                        "calibration_samples": calibration_samples,
                    }
                )
            )
            log.info("distill: pruning the teacher into %s", output)
            try:
                run_single_rank(
                    ["kd_module.pruning", str(request)], f"pruning the teacher into {output}"
                )
            finally:
                request.unlink(missing_ok=True)
        else:
            _wait_for(done, timeout_s=6 * 3600)
    pruned = load_teacher_model_config(None, student, str(output)).model
    return pruned.replace(transformer_impl=student.transformer_impl), str(output)


def _wait_for(path: Path, timeout_s: float) -> None:
    """Poll for ``path`` (another rank is writing it; no process group exists yet)."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"distill: {path} did not appear within {timeout_s:.0f} s")
        time.sleep(2.0)


def _export_hf_problems(student: Any, output: str) -> list[str]:
    """Why the student cannot be written as an HF directory at ``output``."""
    from kd_module.hf.config import architecture_for, export_problems
    from kd_module.rules import writable_dir_problems

    problems = writable_dir_problems(output, "job.export_hf")
    architecture = architecture_for(student)
    problems += [
        f"job.export_hf: the student cannot be written as {architecture}: {problem}"
        for problem in export_problems(student, architecture)
    ]
    return problems


def export_hf_subprocess(student_dir: Path, output: str) -> Path:
    """``python -m kd_module.hf export`` in a fresh single-rank process."""
    log.info("distill: writing the student as an HF directory to %s", output)
    run_single_rank(
        ["kd_module.hf", "export", str(student_dir), str(output)],
        f"the HF export of {student_dir} to {output} (the student checkpoint is complete; rerun "
        f"`nemo kd export-hf checkpoint={student_dir} output={output}`)",
    )
    return Path(output)


def build_summary(module: Any, data: Any, trainer: Any, wall_s: float) -> dict[str, Any]:
    """What ``summary.json`` holds: metrics, throughput, wall time, configs and versions."""
    strategy = trainer.strategy
    train = dict(getattr(module, "last_train_metrics", {}) or {})
    val = dict(getattr(module, "last_val_metrics", {}) or {})
    steps = list(module.step_times)
    # The first steps pay for lazy initialization; report the steady state when there is one.
    steady = steps[1:] if len(steps) > 1 else steps
    tokens_per_step = data.global_batch_size * data.seq_length
    summary: dict[str, Any] = {
        "train": train,
        "val_loss": val.get("val_loss"),
        "val_kd_loss": val.get("val_kd_loss"),
        "teacher_val_loss": module.teacher_val_loss,
        "teacher_sha256": getattr(module, "teacher_sha256", None),
        "skipped_steps": list(getattr(module, "skipped_steps", [])),
        "steps": trainer.global_step,
        "tokens": trainer.global_step * tokens_per_step,
        "tokens_per_s": tokens_per_step * len(steady) / sum(steady) if steady else None,
        "step_time_s": sum(steady) / len(steady) if steady else None,
        "wall_s": wall_s,
        "step_time_breakdown": None,
        "world_size": trainer.world_size,
        "configs": {
            "student": jsonable(module.student_config),
            "teacher": jsonable(module.teacher_config),
            "distill": jsonable(module.distill_config),
            "optimizer": jsonable(module.optimizer_config),
            "layout": jsonable(strategy.layout),
            "precision": strategy.precision_name,
            "data": {
                "paths": jsonable(data.paths),
                "mock": data.mock,
                "seq_length": data.seq_length,
                "micro_batch_size": data.micro_batch_size,
                "global_batch_size": data.global_batch_size,
                "tokenizer": jsonable(data.tokenizer),
            },
            "teacher_checkpoint": module.teacher_checkpoint,
            "teacher_cache": getattr(module, "teacher_cache", None),
            "offline_loss_mode": getattr(module, "offline_loss_mode", None),
            "student_checkpoint": module.student_checkpoint,
            "max_steps": trainer.max_steps,
        },
        "versions": package_versions(),
    }
    for callback in trainer.callbacks:
        breakdown = getattr(callback, "summary", None)
        if callable(breakdown):
            summary["step_time_breakdown"] = breakdown()
    return summary
