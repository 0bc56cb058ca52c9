"""``distill(...)``: the task function recipes point at.

It checks every input before any model is built (files, configs, parallel layout, batch sizes,
sequence length, tokenizer), attaches a CSV logger at ``<log_dir>/<name>``, runs ``trainer.fit``
and writes ``summary.json`` there.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from kd_module.reliability import cli_errors, write_json_atomic

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PACKAGES = ("torch", "lightning", "megatron-core", "nvidia-modelopt", "nemo-run", "megatron-kd")


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (for summaries and benchmark results)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _tokenizer_problems(data_tokenizer: Any, teacher_tokenizer: dict[str, Any]) -> list[str]:
    """The teacher's NeMo ``tokenizer:`` section against the data's tokenizer."""
    if not teacher_tokenizer:
        return []
    library = str(teacher_tokenizer.get("library") or "").lower() or None
    aliases = {"hf": "huggingface", "megatron": "huggingface", "byte-level": "byte"}
    library = aliases.get(library, library)
    if library and library != data_tokenizer.library:
        return [
            f"tokenizer: the teacher's model_config.yaml uses library={library!r} but the data "
            f"uses library={data_tokenizer.library!r}; teacher and student must share a tokenizer"
        ]
    return []


def _placement_problems(module: Any, layout: Any, earlier: list[str]) -> list[str]:
    """Intermediate layers that do not exist or are not on the last pipeline stage."""
    from kd_module.distill_config import check_pipeline_placement

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


def _vocabulary_problems(module: Any) -> list[str]:
    """Teacher and student vocabularies, when both configs fix one, must be the same."""
    if module.teacher_config is None:
        return []
    student, teacher = module.student_config.vocab_size, module.teacher_config.vocab_size
    if student and teacher and student != teacher:
        return [
            f"vocabulary: teacher vocab_size={teacher} differs from student vocab_size={student}; "
            "teacher and student must share one (padded) vocabulary"
        ]
    return []


def check_inputs(
    module: Any,
    data: Any,
    trainer: Any,
    teacher_tokenizer: dict[str, Any] | None = None,
) -> None:
    """Every problem with the run's inputs, raised as one ValueError before any model is built."""
    from kd_module.data.datamodule import check_prefixes_exist, check_seq_length
    from kd_module.distillation import check_virtual_pipeline
    from kd_module.models import implementation_problems
    from kd_module.strategy import MegatronStrategy

    problems: list[str] = []
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
    model_parallel = (
        layout.tensor_model_parallel_size
        * layout.pipeline_model_parallel_size
        * layout.context_parallel_size
    )
    if not problems:
        data_parallel = world_size // model_parallel
        if data.global_batch_size % (data.micro_batch_size * data_parallel):
            problems.append(
                f"global_batch_size={data.global_batch_size} is not divisible by "
                f"micro_batch_size={data.micro_batch_size} x data_parallel_size={data_parallel}"
            )
    if not data.mock:
        try:
            check_prefixes_exist(data.prefixes())
        except ValueError as error:
            problems.append(str(error))
    problems += _placement_problems(module, layout, problems)
    problems += _vocabulary_problems(module)
    for label, path, requested in (
        ("teacher_checkpoint", module.teacher_checkpoint, module.teacher_ckpt_format),
        ("student_checkpoint", module.student_checkpoint, module.student_ckpt_format),
    ):
        problems += _checkpoint_problems(label, path, requested)
    problems += _tokenizer_problems(data.tokenizer, teacher_tokenizer or {})
    if trainer.max_steps is None or trainer.max_steps <= 0:
        problems.append(f"trainer.max_steps={trainer.max_steps} must be a positive integer")
    if problems:
        raise ValueError("distill: " + "; ".join(problems))


def _attach_logger(trainer: Any, run_dir: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    if not trainer.loggers:
        trainer.loggers = [CSVLogger(save_dir=str(run_dir.parent), name=run_dir.name, version="")]


def _drop_default_checkpointing(trainer: Any) -> None:
    """Drop Lightning's default ModelCheckpoint (no dirpath); RunCheckpoint saves runs."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kd_module.run_checkpoint import RunCheckpoint

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
    teacher_checkpoint: str | None = None,
    teacher: Any = None,
    teacher_model_config: str | None = None,
    teacher_ckpt_format: str = "auto",
    student_checkpoint: str | None = None,
    student_ckpt_format: str = "auto",
    distill_config: str | dict | Any = None,
    optimizer: Any = None,
    log_dir: str = "runs",
    name: str = "default",
    loss_chunk_size: int = 1024,
    checkpoint_every_n_steps: int | None = None,
    keep_last: int = 2,
    resume: bool = False,
    export: bool = True,
    on_nonfinite: str = "stop",
    check_teacher_integrity: bool = True,
    teacher_cache: str | None = None,
    offline_loss_mode: str = "tail",
) -> dict[str, Any]:
    """Distill a teacher into a student with megatron-core, ModelOpt and Lightning.

    Args:
        student: the student's :class:`~kd_module.models.GPTModelConfig`.
        data: a :class:`~kd_module.data.GPTDataModule`.
        trainer: a Lightning ``Trainer`` with a :class:`~kd_module.MegatronStrategy`.
        teacher_checkpoint: the teacher's weights (Megatron-LM's ``--export-kd-teacher-load``).
        teacher: the teacher's architecture; ``None`` reads ``teacher_model_config`` or the
            checkpoint's ``model_config.yaml`` over the student's arguments.
        teacher_model_config: NeMo-style ``model_config.yaml``
            (``--export-kd-teacher-model-config``).
        teacher_ckpt_format: ``auto``, ``torch_dist`` or ``torch``
            (``--export-kd-teacher-ckpt-format``).
        student_checkpoint: initialize the student from these weights (``None``: from scratch).
        student_ckpt_format: ``auto``, ``torch_dist`` or ``torch``.
        distill_config: distillation YAML (``--export-kd-distill-cfg``), dict or config.
        optimizer: :class:`~kd_module.optim.OptimizerConfig`.
        log_dir: root of run directories.
        name: run name; logs and ``summary.json`` go to ``<log_dir>/<name>``.
        loss_chunk_size: tokens per chunk of the memory-efficient logits loss.
        checkpoint_every_n_steps: save a run checkpoint (student, optimizer, schedule, data
            position, RNG) to ``<log_dir>/<name>/checkpoints`` every N steps and at the end;
            ``None`` saves none.
        keep_last: how many run checkpoints to keep.
        resume: continue from the latest complete run checkpoint of this run, if any.
        export: write the final student to ``<log_dir>/<name>/student`` as a plain megatron GPT
            checkpoint with its ``model_config.yaml`` (the next round's teacher).
        on_nonfinite: a step whose loss terms (``kd_loss``, ``logits_loss``,
            ``intermediate_loss``, ``lm_loss``) are NaN/Inf ``"stop"``s the run or is
            ``"skip"``ped (no update; listed as ``skipped_steps`` in the summary).
        check_teacher_integrity: hash the teacher's weights when built (``teacher_sha256`` in
            the summary) and fail at the end of training if they changed.
        teacher_cache: distill offline from this teacher cache (``nemo kd cache-teacher``)
            instead of running a teacher; excludes ``teacher_checkpoint``. ``data`` must be the
            data the cache was made of (checked against its manifest and per sample).
        offline_loss_mode: with ``teacher_cache``: ``"tail"`` or ``"renormalized"`` (see
            :class:`~kd_module.offline_module.OfflineDistillationModule`).

    Returns:
        The summary written to ``<log_dir>/<name>/summary.json``.

    Raises:
        ValueError: naming every problem with the inputs, before any model is built.

    Examples:
        From a shell::

            nemo kd distill --factory tiny_cpu -y trainer.max_steps=50

        From Python::

            import nemo_run as run
            from recipes.tiny_cpu import tiny_cpu
            run.run(tiny_cpu(), executor=run.LocalExecutor())
    """
    from kd_module.module import DistillationModule
    from kd_module.teacher_config import load_teacher_model_config

    start = time.perf_counter()
    teacher_tokenizer: dict[str, Any] = {}
    if teacher_cache is not None:
        from kd_module.offline_module import OfflineDistillationModule

        if teacher_checkpoint is not None or teacher is not None:
            raise ValueError(
                "distill: teacher_cache replaces the teacher; leave teacher_checkpoint and "
                "teacher unset (None) for offline distillation"
            )
        module = OfflineDistillationModule(
            student,
            teacher_cache,
            distill_config=distill_config,
            offline_loss_mode=offline_loss_mode,
            student_checkpoint=student_checkpoint,
            student_ckpt_format=student_ckpt_format,
            optimizer=optimizer,
            on_nonfinite=on_nonfinite,
        )
        offline_problems = module.data_problems(data, trainer.max_steps)
        if offline_problems:
            raise ValueError("distill: " + "; ".join(offline_problems))
    else:
        if teacher is None:
            resolved = load_teacher_model_config(teacher_model_config, student, teacher_checkpoint)
            teacher, teacher_tokenizer = resolved.model, resolved.tokenizer or {}
        module = DistillationModule(
            student=student,
            teacher=teacher,
            teacher_checkpoint=teacher_checkpoint,
            teacher_ckpt_format=teacher_ckpt_format,
            teacher_model_config=teacher_model_config,
            student_checkpoint=student_checkpoint,
            student_ckpt_format=student_ckpt_format,
            distill_config=distill_config,
            optimizer=optimizer,
            loss_chunk_size=loss_chunk_size,
            on_nonfinite=on_nonfinite,
            check_teacher_integrity=check_teacher_integrity,
        )
    check_inputs(module, data, trainer, teacher_tokenizer)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"distill: keep_last={keep_last!r} must be a positive integer")
    run_dir = Path(log_dir) / name
    from kd_module.reliability import writable_dir_problems

    problems = writable_dir_problems(run_dir, "run directory")
    if checkpoint_every_n_steps is not None and not problems:
        problems = writable_dir_problems(run_dir / "checkpoints", "checkpoint directory")
    if problems:
        raise ValueError("distill: " + "; ".join(problems))
    _attach_logger(trainer, run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    _drop_default_checkpointing(trainer)
    if checkpoint_every_n_steps is not None:
        from kd_module.run_checkpoint import RunCheckpoint

        trainer.callbacks.append(
            RunCheckpoint(str(checkpoint_dir), checkpoint_every_n_steps, keep_last)
        )
    ckpt_path = None
    if resume:
        from kd_module.run_checkpoint import latest_checkpoint

        latest = latest_checkpoint(checkpoint_dir)
        if latest is None:
            logger.info("distill: resume requested, no complete checkpoint in %s", checkpoint_dir)
        else:
            ckpt_path = str(latest)
            logger.info("distill: resuming from %s", latest)
    if export:
        module.export_dir = str(run_dir / "student")
        module.export_tokenizer = data.tokenizer.to_dict()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    summary = build_summary(module, data, trainer, time.perf_counter() - start)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
        logger.info("distill: summary written to %s", run_dir / SUMMARY_FILE)
    return summary


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
            "student": _jsonable(module.student_config),
            "teacher": _jsonable(module.teacher_config),
            "distill": _jsonable(module.distill_config),
            "optimizer": _jsonable(module.optimizer_config),
            "layout": _jsonable(strategy.layout),
            "precision": strategy.precision_name,
            "data": {
                "paths": _jsonable(data.paths),
                "mock": data.mock,
                "seq_length": data.seq_length,
                "micro_batch_size": data.micro_batch_size,
                "global_batch_size": data.global_batch_size,
                "tokenizer": _jsonable(data.tokenizer),
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


def _checkpoint_problems(label: str, path: str | None, requested: str) -> list[str]:
    """The checkpoint at ``path`` exists and holds the requested format."""
    if path is None:
        return []
    from kd_module.checkpoint import detect_checkpoint_format, resolve_checkpoint_dir

    try:
        found = detect_checkpoint_format(resolve_checkpoint_dir(path))
    except (ValueError, FileNotFoundError) as error:
        return [f"{label}: {error}"]
    if requested not in ("auto", "torch_dist", "torch"):
        return [f"{label}: ckpt_format={requested!r} is not one of auto, torch_dist, torch"]
    if requested not in ("auto", found):
        return [
            f"{label}: ckpt_format={requested!r} was requested but {path} holds a "
            f"{found} checkpoint; use 'auto' or {found!r}"
        ]
    return []


def _launch_problems(num_nodes: Any, devices: Any) -> list[str]:
    """``num_nodes x devices`` against the ranks this process was launched with."""
    from kd_module.launch import positive_int_problems

    problems = positive_int_problems(num_nodes=num_nodes, devices=devices)
    if problems:
        return problems
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if num_nodes * devices != world_size:
        how = (
            "this process was not launched with torchrun; run the recipe with "
            f"kd_module.launch.local_executor(devices={devices})"
            if "WORLD_SIZE" not in os.environ
            else f"the launch has {world_size} ranks"
        )
        return [f"num_nodes x devices = {num_nodes * devices} ranks are expected but {how}"]
    return []


@cli_errors
def build_teacher_cache(
    data: Any,
    out_dir: str,
    teacher_checkpoint: str | None = None,
    teacher: Any = None,
    teacher_model_config: str | None = None,
    teacher_ckpt_format: str = "auto",
    k: int = 64,
    dtype: str = "bf16",
    num_samples: int | None = None,
    shard_size: int = 1024,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    accelerator: str = "gpu",
    precision: str = "bf16",
    seed: int = 1234,
    num_nodes: int = 1,
    devices: int = 1,
    teacher_init_fn: Any = None,
) -> dict[str, Any]:
    """Cache a teacher's top-k logits over a dataset's train split, for offline distillation.

    Runs on every rank of the launch (``torchrun``/nemo-run executors; one process when not
    launched): tensor and pipeline parallelism split the teacher, the remaining ranks are data
    parallel replicas caching disjoint shards. Interrupted, it resumes: run it again with the
    same arguments and only incomplete shards are computed.

    Args:
        data: the :class:`~kd_module.data.GPTDataModule` the students will train on (paths,
            split, seed, ``seq_length``, tokenizer; ``micro_batch_size`` is the teacher's).
        out_dir: the cache directory (``teacher_cache`` of :func:`distill`).
        teacher_checkpoint: the teacher's weights; ``None`` caches a randomly initialized
            teacher (tests only).
        teacher: the teacher's architecture; ``None`` reads ``teacher_model_config`` or the
            checkpoint's ``model_config.yaml``.
        teacher_model_config: NeMo-style ``model_config.yaml`` of the teacher.
        teacher_ckpt_format: ``auto``, ``torch_dist`` or ``torch``.
        k: top-k logits kept per token.
        dtype: storage of the logit values: ``bf16``, ``fp16`` or ``fp32``.
        num_samples: train samples to cache, ``0 .. num_samples-1``; ``data.num_train_samples``
            when ``None``. Students must train on at most this many samples.
        shard_size: samples per shard file (the unit of resuming).
        tensor_model_parallel_size: ranks each teacher layer is split across.
        pipeline_model_parallel_size: ranks the teacher's layers are split across.
        accelerator: ``gpu`` or ``cpu``.
        precision: the teacher's ``fp32`` or ``bf16`` (bf16 needs ``accelerator="gpu"``).
        seed: seed of torch and megatron's RNG states.
        num_nodes: machines of the launch (sizes executors, like the trainer's ``num_nodes``).
        devices: ranks per machine (like the trainer's ``devices``); the launch must match.
        teacher_init_fn: ``fn(teacher_stage)`` initializing weights when there is no checkpoint
            (tests, notebooks).

    Returns:
        The cache's manifest.

    Raises:
        ValueError: naming every problem with the inputs (or a cache in ``out_dir`` made with
            other settings), before the teacher is built.

    Examples:
        From a shell::

            nemo kd cache-teacher --factory tiny_cpu_cache out_dir=/data/tiny_cache

        From Python::

            build_teacher_cache(data, "/data/cache", teacher_checkpoint="/ckpt/8b", k=64,
                                num_samples=100_000, tensor_model_parallel_size=8)
    """
    import torch

    from kd_module.data.datamodule import check_prefixes_exist, check_seq_length
    from kd_module.data.tokenizers import padded_vocab_size
    from kd_module.models import GPTModelConfig, implementation_problems
    from kd_module.offline import (
        CACHE_DTYPES,
        TeacherCache,
        dataset_manifest,
        manifest_with_settings,
    )
    from kd_module.strategy import PRECISIONS
    from kd_module.teacher_config import load_teacher_model_config

    problems: list[str] = []
    if num_samples is None:
        num_samples = data.num_train_samples
    for label, value in (
        ("k", k),
        ("shard_size", shard_size),
        ("num_samples", num_samples),
        ("tensor_model_parallel_size", tensor_model_parallel_size),
        ("pipeline_model_parallel_size", pipeline_model_parallel_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            hint = " (or set data.num_train_samples)" if label == "num_samples" else ""
            problems.append(f"{label}={value!r} must be a positive integer{hint}")
    if dtype not in CACHE_DTYPES:
        problems.append(f"dtype={dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
    if accelerator not in ("gpu", "cpu"):
        problems.append(f"accelerator={accelerator!r} is not one of gpu, cpu")
    elif accelerator == "gpu" and not torch.cuda.is_available():
        problems.append("accelerator='gpu' but CUDA is not available; use accelerator='cpu'")
    if precision not in PRECISIONS:
        problems.append(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    elif precision == "bf16" and accelerator == "cpu":
        problems.append("precision='bf16' needs accelerator='gpu'; use precision='fp32' on CPU")
    problems += _launch_problems(num_nodes, devices)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if isinstance(model_parallel, int) and model_parallel > 0 and world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {model_parallel}"
        )
    problems += _checkpoint_problems("teacher_checkpoint", teacher_checkpoint, teacher_ckpt_format)
    teacher_tokenizer: dict[str, Any] = {}
    if teacher is None and not problems:
        resolved = load_teacher_model_config(
            teacher_model_config, GPTModelConfig(seq_length=data.seq_length), teacher_checkpoint
        )
        teacher, teacher_tokenizer = resolved.model, resolved.tokenizer or {}
    if teacher is not None:
        problems += teacher.layout_problems(
            tensor_model_parallel_size, pipeline_model_parallel_size, 1, who="teacher"
        )
        if accelerator in ("gpu", "cpu"):
            problems += implementation_problems(
                teacher,
                reset_attention_mask=data.reset_attention_mask,
                cuda=accelerator == "gpu",
                who="teacher",
            )
        try:
            check_seq_length(data.seq_length, teacher.padded_max_position_embeddings)
        except ValueError as error:
            problems.append(f"teacher: {error}")
    problems += _tokenizer_problems(data.tokenizer, teacher_tokenizer)
    if not data.mock:
        try:
            check_prefixes_exist(data.prefixes())
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("cache-teacher: " + "; ".join(problems))

    vocab = teacher.vocab_size or padded_vocab_size(
        data.tokenizer.build().vocab_size,
        teacher.make_vocab_size_divisible_by,
        tensor_model_parallel_size,
    )
    manifest = {
        "teacher": {
            "checkpoint": None
            if teacher_checkpoint is None
            else os.path.realpath(teacher_checkpoint),
            "config": _jsonable(teacher),
        },
        "tokenizer": data.tokenizer.to_dict(),
        "dataset": dataset_manifest(data, num_samples),
        "seq_length": data.seq_length,
        "vocab_size": vocab,
    }
    if (Path(out_dir) / "manifest.json").exists():  # a restart: same settings, before any work
        TeacherCache(out_dir).check_manifest(
            manifest_with_settings(manifest, k, dtype, shard_size, num_samples)
        )

    from kd_module import runtime
    from kd_module.models import ParallelLayout, build_model
    from kd_module.offline import cache_teacher

    runtime.initialize_distributed(
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        seed=seed,
        device="cuda" if accelerator == "gpu" else "cpu",
    )
    try:
        layout = ParallelLayout(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
        )
        params_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model = build_model(teacher, layout, vocab, params_dtype)
        if teacher_checkpoint is not None:
            from kd_module.checkpoint import make_teacher_loader

            make_teacher_loader(teacher_checkpoint, teacher_ckpt_format)(model)
        elif teacher_init_fn is not None:
            teacher_init_fn(model)
        else:
            logger.warning("cache-teacher: no teacher_checkpoint, caching a random teacher")
        model.requires_grad_(False)
        data.num_train_samples = num_samples
        data.setup("fit")
        start = time.perf_counter()
        final = cache_teacher(
            model,
            data.train_dataset,
            out_dir,
            k=k,
            manifest=manifest,
            num_samples=num_samples,
            micro_batch_size=data.micro_batch_size,
            dtype=dtype,
            shard_size=shard_size,
        )
        logger.info(
            "cache-teacher: %d samples cached in %s (%.1f s)",
            num_samples,
            out_dir,
            time.perf_counter() - start,
        )
    finally:
        runtime.destroy_distributed()
    return final
