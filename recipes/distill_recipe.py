"""The generic distillation recipe: a ``run.Partial(distill, ...)`` made of ``run.Config`` pieces.

Pair recipes (``recipes/llama31_8b_to_llama32_1b.py``, ...) call :func:`distill_recipe` with
their architectures. A recipe only describes the run: it opens no file, touches no device and
builds nothing, so ``nemo kd distill --factory NAME --dryrun`` and ``--to-yaml`` work anywhere.
Every object is built by nemo-run (``fdl.build``) when the task starts on its ranks.
"""

from __future__ import annotations

from typing import Any

import nemo_run as run

from kd_module.api import STUDENT_FROM, distill
from kd_module.data.tokenizers import TokenizerConfig
from kd_module.lightning_factories import gpt_data_module, lightning_trainer, megatron_strategy
from kd_module.models.gpt import GPTModelConfig, ParallelLayout
from kd_module.rules import Problems
from kd_module.specs import CKPT_FORMATS, OfflineConfig, RunConfig, TeacherSpec
from kd_module.training.optim import OptimizerConfig
from kd_module.training.precision import precision_problems

ACCELERATORS = ("gpu", "cpu")
"""Values of ``accelerator``."""


def _as_config(value: Any, cls: type, label: str, problems: Problems) -> Any:
    """``value`` as a ``run.Config`` of ``cls`` (a built dataclass is turned back into one)."""
    if isinstance(value, run.Config):
        if value.__fn_or_cls__ is not cls:
            problems.add(
                f"{label} is a run.Config of {value.__fn_or_cls__.__name__}; "
                f"expected a run.Config of {cls.__name__}"
            )
        return value
    if isinstance(value, cls):
        fields = {name: getattr(value, name) for name in value.__dataclass_fields__}
        return run.Config(cls, **fields)
    problems.add(f"{label}={value!r} must be a {cls.__name__} or a run.Config of one")
    return value


def _check_layout(
    problems: Problems,
    layout: ParallelLayout,
    num_nodes: Any,
    num_gpus_per_node: Any,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
) -> None:
    """The layout's sizes, then, when no argument is wrong, its split of the recipe's ranks."""
    problems.extend(layout.size_problems())
    if not problems:
        world_size = num_nodes * num_gpus_per_node
        world = f"num_nodes x num_gpus_per_node = {world_size}"
        problems.extend(
            layout.problems(world_size, global_batch_size, micro_batch_size, world=world)
        )


def trainer_config(
    num_nodes: int = 1,
    num_gpus_per_node: int = 8,
    accelerator: str = "gpu",
    max_steps: int = 1000,
    val_check_interval: int | None = 100,
    limit_val_batches: int = 32,
    log_every_n_steps: int = 10,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    precision: str = "bf16",
    seed: int = 1234,
    callbacks: list[run.Config] | None = None,
    default_root_dir: str | None = None,
) -> run.Config:
    """A Lightning ``Trainer`` with :class:`~kd_module.training.strategy.MegatronStrategy`, as
    config (of :func:`~kd_module.lightning_factories.lightning_trainer`, which builds them).

    ``logger=False`` because :func:`~kd_module.api.distill` attaches a CSV logger at
    ``<log_dir>/<name>``; Lightning's ``ModelCheckpoint`` is off because distill saves run
    checkpoints of the megatron model itself (``checkpoint_every_n_steps``) and exports the
    final student.

    Args:
        num_nodes: machines.
        num_gpus_per_node: ranks per machine (the trainer's ``devices``).
        accelerator: ``gpu`` or ``cpu``.
        max_steps: optimizer steps.
        val_check_interval: steps between validations; ``None`` validates once per "epoch".
        limit_val_batches: validation batches per validation (0 turns validation off).
        log_every_n_steps: steps between logged rows.
        tensor_model_parallel_size: see :class:`~kd_module.training.strategy.MegatronStrategy`.
        pipeline_model_parallel_size: see :class:`~kd_module.training.strategy.MegatronStrategy`.
        context_parallel_size: see :class:`~kd_module.training.strategy.MegatronStrategy`.
        sequence_parallel: see :class:`~kd_module.training.strategy.MegatronStrategy`.
        precision: ``fp32`` or ``bf16`` (the strategy's; bf16 needs CUDA).
        seed: the strategy's seed of torch and megatron's RNG states.
        callbacks: ``run.Config`` of Lightning callbacks.
        default_root_dir: Lightning's root directory.

    Returns:
        ``run.Config(lightning_trainer, ...)``.
    """
    strategy = run.Config(
        megatron_strategy,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        precision=precision,
        seed=seed,
    )
    return run.Config(
        lightning_trainer,
        accelerator=accelerator,
        devices=num_gpus_per_node,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        limit_val_batches=limit_val_batches,
        log_every_n_steps=log_every_n_steps,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        callbacks=list(callbacks or []),
        default_root_dir=default_root_dir,
    )


def teacher_spec(
    checkpoint: str | None = None,
    config: run.Config[GPTModelConfig] | GPTModelConfig | None = None,
    model_config: str | None = None,
    ckpt_format: str = "auto",
) -> run.Config[TeacherSpec]:
    """The teacher as config: ``teacher`` of :func:`~kd_module.api.distill` and
    :func:`~kd_module.offline.job.build_teacher_cache`.

    Args:
        checkpoint: the teacher's checkpoint (Megatron-LM's ``--export-kd-teacher-load``);
            ``None`` distills from a randomly initialized teacher (tests only).
        config: the teacher's architecture; ``None`` reads ``model_config`` or the
            checkpoint's ``model_config.yaml`` (``--export-kd-teacher-model-config``).
        model_config: NeMo-style ``model_config.yaml`` of the teacher.
        ckpt_format: ``auto``, ``torch_dist`` or ``torch`` (``--export-kd-teacher-ckpt-format``).

    Returns:
        ``run.Config(TeacherSpec, ...)``; override its fields as ``teacher.checkpoint=PATH``.
    """
    problems = Problems()
    if config is not None:
        config = _as_config(config, GPTModelConfig, "teacher config", problems)
    problems.one_of("ckpt_format", ckpt_format, CKPT_FORMATS)
    problems.raise_if_any("teacher spec")
    return run.Config(
        TeacherSpec,
        checkpoint=checkpoint,
        config=config,
        model_config=model_config,
        ckpt_format=ckpt_format,
    )


def run_config(
    log_dir: str = "runs",
    name: str = "default",
    checkpoint_every_n_steps: int | None = None,
    keep_last: int = 2,
    resume: bool = False,
    export: bool = True,
    export_hf: str | None = None,
) -> run.Config[RunConfig]:
    """Where the run writes and what it keeps, as config: ``job`` of
    :func:`~kd_module.api.distill`.

    Args:
        log_dir: root of run directories.
        name: run name; logs and ``summary.json`` go to ``<log_dir>/<name>``.
        checkpoint_every_n_steps: save a run checkpoint every N steps and at the end under
            ``<log_dir>/<name>/checkpoints`` (Megatron-LM's ``--save-interval``); ``None``
            saves none.
        keep_last: how many run checkpoints to keep.
        resume: continue from the run's latest complete checkpoint, if any.
        export: write the final student to ``<log_dir>/<name>/student``.
        export_hf: also write it as a Hugging Face model directory here.

    Returns:
        ``run.Config(RunConfig, ...)``: ``job`` of :func:`~kd_module.api.distill`; override its
        fields as ``job.name=exp1``.
    """
    problems = Problems()
    if not isinstance(name, str) or not name or "/" in name:
        problems.add(f"name={name!r} must be a non-empty string without '/'")
    problems.positive_int("checkpoint_every_n_steps", checkpoint_every_n_steps, or_none="None")
    problems.positive_int("keep_last", keep_last)
    problems.raise_if_any("run config")
    return run.Config(
        RunConfig,
        log_dir=log_dir,
        name=name,
        checkpoint_every_n_steps=checkpoint_every_n_steps,
        keep_last=keep_last,
        resume=resume,
        export=export,
        export_hf=export_hf,
    )


def offline_config(
    teacher_cache: str | None, loss_mode: str = "tail"
) -> run.Config[OfflineConfig] | None:
    """Offline distillation from a teacher cache, as config: ``offline`` of
    :func:`~kd_module.api.distill`.

    Args:
        teacher_cache: the cache :func:`cache_teacher_recipe` (``nemo kd cache-teacher``) wrote
            over the same data; ``None``: distill online (returns ``None``).
        loss_mode: ``"tail"`` or ``"renormalized"``.

    Returns:
        ``run.Config(OfflineConfig, ...)``, or ``None`` without a cache.
    """
    if teacher_cache is None:
        return None
    return run.Config(OfflineConfig, teacher_cache=teacher_cache, loss_mode=loss_mode)


def distill_recipe(
    teacher: run.Config[TeacherSpec] | TeacherSpec | None,
    student_config: run.Config[GPTModelConfig] | GPTModelConfig | None = None,
    *,
    job: run.Config[RunConfig] | RunConfig | None = None,
    offline: run.Config[OfflineConfig] | OfflineConfig | None = None,
    student_path: str | None = None,
    student_ckpt_format: str = "auto",
    student_from: str = "init",
    distill_config: str | dict | None = None,
    num_nodes: int = 1,
    num_gpus_per_node: int = 8,
    data_paths: str | list[Any] | dict[str, Any] | None = None,
    tokenizer: run.Config[TokenizerConfig] | TokenizerConfig | None = None,
    seq_length: int | None = None,
    micro_batch_size: int = 1,
    global_batch_size: int = 8,
    split: str = "969,30,1",
    accelerator: str = "gpu",
    max_steps: int = 1000,
    val_check_interval: int | None = 100,
    limit_val_batches: int = 32,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    precision: str = "bf16",
    lr: float = 1e-4,
    min_lr: float = 1e-5,
    warmup_steps: int = 50,
    callbacks: list[run.Config] | None = None,
    loss_chunk_size: int = 1024,
    seed: int = 1234,
) -> run.Partial:
    """Distill ``teacher`` into ``student_config``: the whole run as config.

    The teacher, the run's outputs and the offline cache are sub-configs made by
    :func:`teacher_spec`, :func:`run_config` and :func:`offline_config`, so the command line
    overrides their fields by dotted paths (``teacher.checkpoint=``, ``job.name=``).

    Args:
        teacher: the teacher (:func:`teacher_spec`); ``None`` is ``teacher_spec()``, a randomly
            initialized teacher (tests only). Not used with ``offline``.
        student_config: the student's architecture (required).
        job: logs, checkpoints, resume, export (:func:`run_config`); ``None`` is
            ``run_config()``. Its ``log_dir`` is also the trainer's ``default_root_dir``.
        offline: distill from a teacher cache (:func:`offline_config`) made by
            :func:`cache_teacher_recipe` over the same data; the teacher is neither built nor
            run.
        student_path: initialize the student from this checkpoint; ``None`` starts from scratch.
        student_ckpt_format: ``auto``, ``torch_dist`` or ``torch``.
        student_from: ``"init"`` (from scratch or ``student_path``) or ``"prune"``: prune the
            teacher to ``student_config`` first and start from it (Minitron).
        distill_config: distillation YAML path or dict (``--export-kd-distill-cfg``); ``None``
            distills the logits only.
        num_nodes: machines.
        num_gpus_per_node: ranks per machine (the trainer's ``devices``; CPU processes with
            ``accelerator="cpu"``).
        data_paths: dataset prefixes, a weighted blend or a per-split dict (see
            :class:`~kd_module.data.GPTDataModule`); ``None`` uses synthetic (mock) tokens.
        tokenizer: the tokenizer the data was prepared with; the byte tokenizer when ``None``.
        seq_length: tokens per sample; the student's ``seq_length`` when ``None``.
        micro_batch_size: samples per micro-batch on one data-parallel rank.
        global_batch_size: samples per optimizer step over all data-parallel ranks.
        split: train/validation/test document weights of each prefix.
        accelerator: ``gpu`` or ``cpu``.
        max_steps: optimizer steps.
        val_check_interval: steps between validations.
        limit_val_batches: validation batches per validation.
        tensor_model_parallel_size: ranks each layer is split across.
        pipeline_model_parallel_size: ranks the layers are split across.
        context_parallel_size: ranks the sequence is split across.
        sequence_parallel: split activations along the sequence outside TP regions.
        precision: ``fp32`` or ``bf16`` (bf16 needs ``accelerator="gpu"``).
        lr: peak learning rate.
        min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warmup steps.
        callbacks: ``run.Config`` of Lightning callbacks.
        loss_chunk_size: tokens per chunk of the logits KD loss.
        seed: seed of the strategy (weights) and of the data shuffling.

    Returns:
        ``run.Partial(kd_module.api.distill, ...)``.

    Raises:
        ValueError: naming every bad argument, before anything is built.

    Examples:
        CLI (through a pair recipe built on this one)::

            nemo kd distill --factory llama31_8b_to_llama32_1b trainer.max_steps=2000

        Python::

            recipe = distill_recipe(
                teacher_spec("/ckpt/teacher"),
                run.Config(GPTModelConfig),
                job=run_config("/results", "exp1"),
            )
            run.run(recipe, executor=local_executor(devices=8))
    """
    problems = Problems()
    if student_config is None:
        problems.add("student_config is required (a GPTModelConfig or a run.Config of one)")
    else:
        student_config = _as_config(student_config, GPTModelConfig, "student_config", problems)
    teacher = _as_config(
        teacher if teacher is not None else run.Config(TeacherSpec),
        TeacherSpec,
        "teacher",
        problems,
    )
    job = _as_config(
        job if job is not None else run.Config(RunConfig),
        RunConfig,
        "job",
        problems,
    )
    if offline is not None:
        offline = _as_config(offline, OfflineConfig, "offline", problems)
    if tokenizer is not None:
        tokenizer = _as_config(tokenizer, TokenizerConfig, "tokenizer", problems)
    for label, value in (
        ("num_nodes", num_nodes),
        ("num_gpus_per_node", num_gpus_per_node),
        ("micro_batch_size", micro_batch_size),
        ("global_batch_size", global_batch_size),
        ("max_steps", max_steps),
        ("loss_chunk_size", loss_chunk_size),
    ):
        problems.positive_int(label, value)
    problems.positive_int("seq_length", seq_length, or_none="None")
    problems.one_of("accelerator", accelerator, ACCELERATORS)
    problems.one_of("student_from", student_from, STUDENT_FROM)
    if student_from == "prune" and student_path is not None:
        problems.add("student_from='prune' starts from the pruned teacher; leave student_path None")
    problems.extend(precision_problems(precision, cuda=accelerator != "cpu"))
    layout = ParallelLayout(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    _check_layout(
        problems, layout, num_nodes, num_gpus_per_node, global_batch_size, micro_batch_size
    )
    problems.raise_if_any("distill recipe")

    data = data_config(
        data_paths,
        seq_length if seq_length is not None else student_config.seq_length,
        micro_batch_size,
        global_batch_size,
        tokenizer,
        split,
        seed,
    )
    trainer = trainer_config(
        num_nodes=num_nodes,
        num_gpus_per_node=num_gpus_per_node,
        accelerator=accelerator,
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        limit_val_batches=limit_val_batches,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        precision=precision,
        seed=seed,
        callbacks=callbacks,
        default_root_dir=job.log_dir,
    )
    optimizer = run.Config(
        OptimizerConfig, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, lr_decay_style="cosine"
    )
    return run.Partial(
        distill,
        student=student_config,
        data=data,
        trainer=trainer,
        teacher=None if offline is not None else teacher,  # offline: the cache replaces it
        job=job,
        offline=offline,
        student_checkpoint=student_path,
        student_ckpt_format=student_ckpt_format,
        student_from=student_from,
        distill_config=distill_config,
        optimizer=optimizer,
        loss_chunk_size=loss_chunk_size,
    )


def data_config(
    data_paths: Any,
    seq_length: int,
    micro_batch_size: int,
    global_batch_size: int,
    tokenizer: Any = None,
    split: str = "969,30,1",
    seed: int = 1234,
    num_train_samples: int | None = None,
) -> run.Config:
    """``run.Config`` of the :class:`~kd_module.data.GPTDataModule` (mock tokens without paths),
    through :func:`~kd_module.lightning_factories.gpt_data_module`."""
    return run.Config(
        gpt_data_module,
        paths=data_paths,
        mock=data_paths is None,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        tokenizer=tokenizer,
        split=split,
        seed=seed,
        num_train_samples=num_train_samples,
    )


def cache_teacher_recipe(
    teacher: run.Config[TeacherSpec] | TeacherSpec | None,
    out_dir: str,
    num_samples: int,
    *,
    data_paths: str | list[Any] | dict[str, Any] | None = None,
    tokenizer: run.Config[TokenizerConfig] | TokenizerConfig | None = None,
    seq_length: int = 2048,
    micro_batch_size: int = 1,
    split: str = "969,30,1",
    seed: int = 1234,
    k: int = 64,
    dtype: str = "bf16",
    shard_size: int = 1024,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    accelerator: str = "gpu",
    precision: str = "bf16",
    num_nodes: int = 1,
    num_gpus_per_node: int = 8,
) -> run.Partial:
    """Cache the teacher's top-k logits over the data students will train on, as config.

    The data arguments must be the ones the students' :func:`distill_recipe` gets (paths,
    tokenizer, ``seq_length``, split, seed); the students then run with
    ``offline=offline_config(out_dir)``. ``num_samples`` is what the students may consume at
    most (``max_steps x global_batch_size``).

    Args:
        teacher: the teacher (:func:`teacher_spec`); ``None`` is ``teacher_spec()``, a random
            teacher (tests only).
        out_dir: the cache directory.
        num_samples: train samples to cache.
        data_paths: dataset prefixes (see :func:`distill_recipe`); ``None``: mock tokens.
        tokenizer: the tokenizer the data was prepared with; bytes when ``None``.
        seq_length: tokens per sample.
        micro_batch_size: samples per teacher forward.
        split: train/validation/test document weights.
        seed: seed of the data shuffling (the students' ``seed``).
        k: top-k logits kept per token.
        dtype: ``bf16``, ``fp16`` or ``fp32`` storage of the logit values.
        shard_size: samples per shard (the unit of resuming).
        tensor_model_parallel_size: ranks each teacher layer is split across.
        pipeline_model_parallel_size: ranks the teacher's layers are split across.
        accelerator: ``gpu`` or ``cpu``.
        precision: ``bf16`` (GPU) or ``fp32``.
        num_nodes: machines.
        num_gpus_per_node: ranks per machine (CPU processes with ``accelerator="cpu"``); the
            ranks beyond TP x PP are data-parallel replicas caching disjoint shards.

    Returns:
        ``run.Partial(kd_module.offline.job.build_teacher_cache, ...)``; size its executor with
        :func:`kd_module.launch.recipe_devices`.

    Examples:
        ``nemo kd cache-teacher --factory tiny_cpu out_dir=/data/tiny_cache``
    """
    from kd_module.offline.job import build_teacher_cache

    problems = Problems()
    teacher = _as_config(
        teacher if teacher is not None else run.Config(TeacherSpec),
        TeacherSpec,
        "teacher",
        problems,
    )
    if tokenizer is not None:
        tokenizer = _as_config(tokenizer, TokenizerConfig, "tokenizer", problems)
    for label, value in (
        ("num_samples", num_samples),
        ("seq_length", seq_length),
        ("micro_batch_size", micro_batch_size),
        ("k", k),
        ("shard_size", shard_size),
        ("num_nodes", num_nodes),
        ("num_gpus_per_node", num_gpus_per_node),
    ):
        problems.positive_int(label, value)
    layout = ParallelLayout(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    _check_layout(problems, layout, num_nodes, num_gpus_per_node)
    problems.raise_if_any("cache-teacher recipe")
    return run.Partial(
        build_teacher_cache,
        data=data_config(
            data_paths,
            seq_length,
            micro_batch_size,
            micro_batch_size,
            tokenizer,
            split,
            seed,
            num_train_samples=num_samples,
        ),
        out_dir=out_dir,
        teacher=teacher,
        k=k,
        dtype=dtype,
        num_samples=num_samples,
        shard_size=shard_size,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        accelerator=accelerator,
        precision=precision,
        seed=seed,
        num_nodes=num_nodes,
        devices=num_gpus_per_node,
    )


def gpu_pair_recipe(
    teacher: run.Config[TeacherSpec],
    student_config: run.Config[GPTModelConfig],
    tokenizer_path: str,
    **kwargs: Any,
) -> run.Partial:
    """:func:`distill_recipe` with the defaults of the published GPU pairs.

    A HuggingFace tokenizer from ``tokenizer_path``, GPUs in bf16, Adam at 1e-4 decaying to 1e-5
    after 100 warmup steps; ``kwargs`` go to :func:`distill_recipe` unchanged.
    """
    return distill_recipe(
        teacher,
        student_config,
        tokenizer=run.Config(TokenizerConfig, library="huggingface", path=tokenizer_path),
        accelerator="gpu",
        precision="bf16",
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=100,
        **kwargs,
    )


def gpu_pair_cache_recipe(
    teacher: run.Config[TeacherSpec],
    tokenizer_path: str,
    **kwargs: Any,
) -> run.Partial:
    """:func:`cache_teacher_recipe` with the defaults of the published GPU pairs.

    The same HuggingFace tokenizer and bf16 GPUs as :func:`gpu_pair_recipe`; ``kwargs`` go to
    :func:`cache_teacher_recipe` unchanged.
    """
    return cache_teacher_recipe(
        teacher,
        tokenizer=run.Config(TokenizerConfig, library="huggingface", path=tokenizer_path),
        accelerator="gpu",
        precision="bf16",
        **kwargs,
    )
