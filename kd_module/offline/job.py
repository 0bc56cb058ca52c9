"""``build_teacher_cache``: the job that runs a teacher over a dataset and writes its top-k cache
(``nemo kd cache-teacher``)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from kd_module.cli.errors import cli_errors
from kd_module.rules import Problems, checkpoint_problems, launch_problems, tokenizer_problems
from kd_module.specs import TeacherSpec, fold_flat_keywords, group_problems
from kd_module.versions import jsonable

logger = logging.getLogger(__name__)


@cli_errors
def build_teacher_cache(
    data: Any,
    out_dir: str,
    teacher: TeacherSpec | None = None,
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
    exclude_padded_vocab: bool = False,
    **deprecated: Any,
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
        teacher: the teacher (:class:`~kd_module.specs.TeacherSpec`), as for :func:`distill`;
            no ``checkpoint`` caches a randomly initialized teacher (tests only), no ``config``
            reads ``model_config`` or the checkpoint's ``model_config.yaml``.
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
        exclude_padded_vocab: cache the distribution over the tokenizer's vocabulary only
            (``shared_vocab_size`` = the data tokenizer's size: no padding row of the teacher's
            embedding table is ever a top-k entry or in the log-sum-exp), for students whose
            tables are padded differently. ``False``: the teacher's whole padded vocabulary.
        **deprecated: the flat keywords of the release before (``teacher_checkpoint``,
            ``teacher_model_config``, ``teacher_ckpt_format``; ``teacher=GPTModelConfig``),
            mapped onto ``teacher`` with a ``DeprecationWarning``.

    Returns:
        The cache's manifest.

    Raises:
        ValueError: naming every problem with the inputs (or a cache in ``out_dir`` made with
            other settings), before the teacher is built.

    Examples:
        From a shell::

            nemo kd cache-teacher --factory tiny_cpu_cache out_dir=/data/tiny_cache

        From Python::

            build_teacher_cache(data, "/data/cache", TeacherSpec(checkpoint="/ckpt/8b"), k=64,
                                num_samples=100_000, tensor_model_parallel_size=8)
    """
    import torch

    from kd_module.data.datamodule import check_prefixes_exist, check_seq_length
    from kd_module.data.tokenizers import padded_vocab_size
    from kd_module.models.gpt import GPTModelConfig, ParallelLayout, implementation_problems
    from kd_module.nemo_format.discovery import load_teacher_model_config
    from kd_module.offline.format import CACHE_DTYPES, dataset_manifest, manifest_with_settings
    from kd_module.offline.reader import TeacherCache
    from kd_module.training.precision import PRECISIONS, precision_problems

    teacher = fold_flat_keywords("build_teacher_cache", {"teacher": teacher}, deprecated)["teacher"]
    Problems(group_problems({"teacher": teacher})).raise_if_any("cache-teacher")
    teacher = teacher or TeacherSpec()
    teacher_checkpoint, architecture = teacher.checkpoint, teacher.config
    problems = Problems()
    if num_samples is None:
        num_samples = data.num_train_samples
    problems.positive_int("k", k)
    problems.positive_int("shard_size", shard_size)
    problems.positive_int("num_samples", num_samples, hint=" (or set data.num_train_samples)")
    layout = ParallelLayout(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    problems.extend(layout.size_problems())
    problems.one_of("dtype", dtype, CACHE_DTYPES)
    known_accelerator = problems.one_of("accelerator", accelerator, ("gpu", "cpu"))
    if known_accelerator and accelerator == "gpu" and not torch.cuda.is_available():
        problems.add("accelerator='gpu' but CUDA is not available; use accelerator='cpu'")
    problems.extend(precision_problems(precision, cuda=accelerator != "cpu"))
    problems.extend(launch_problems(num_nodes, devices))
    if not layout.size_problems():
        problems.extend(layout.problems(int(os.environ.get("WORLD_SIZE", "1"))))
    problems.extend(
        checkpoint_problems("teacher_checkpoint", teacher_checkpoint, teacher.ckpt_format)
    )
    teacher_tokenizer: dict[str, Any] = {}
    if architecture is None and not problems:
        resolved = load_teacher_model_config(
            teacher.model_config, GPTModelConfig(seq_length=data.seq_length), teacher_checkpoint
        )
        architecture, teacher_tokenizer = resolved.model, resolved.tokenizer or {}
    if architecture is not None:
        problems.extend(
            architecture.layout_problems(
                tensor_model_parallel_size, pipeline_model_parallel_size, 1, who="teacher"
            )
        )
        if accelerator in ("gpu", "cpu"):
            problems.extend(
                implementation_problems(
                    architecture,
                    reset_attention_mask=data.reset_attention_mask,
                    cuda=accelerator == "gpu",
                    who="teacher",
                )
            )
        try:
            check_seq_length(data.seq_length, architecture.padded_max_position_embeddings)
        except ValueError as error:
            problems.add(f"teacher: {error}")
    tokenizer_size = data.tokenizer.build().vocab_size
    problems.extend(tokenizer_problems(data.tokenizer, teacher_tokenizer, tokenizer_size))
    shared_vocab_size = tokenizer_size if exclude_padded_vocab else None
    if architecture is not None and architecture.vocab_size:
        if architecture.vocab_size < tokenizer_size:
            problems.add(
                f"vocabulary: the teacher's padded vocab_size {architecture.vocab_size} is "
                f"smaller than the tokenizer's {tokenizer_size} tokens"
            )
    if shared_vocab_size is not None and isinstance(k, int) and k > shared_vocab_size:
        problems.add(f"k={k} is larger than the tokenizer's {shared_vocab_size} tokens")
    if not data.mock:
        try:
            check_prefixes_exist(data.prefixes())
        except ValueError as error:
            problems.add(str(error))
    problems.raise_if_any("cache-teacher")

    vocab = architecture.vocab_size or padded_vocab_size(
        data.tokenizer.build().vocab_size,
        architecture.make_vocab_size_divisible_by,
        tensor_model_parallel_size,
    )
    manifest = {
        "teacher": {
            "checkpoint": None
            if teacher_checkpoint is None
            else os.path.realpath(teacher_checkpoint),
            "config": jsonable(architecture),
        },
        "tokenizer": data.tokenizer.to_dict(),
        "dataset": dataset_manifest(data, num_samples),
        "seq_length": data.seq_length,
        "vocab_size": vocab,
    }
    if shared_vocab_size is not None:
        manifest["shared_vocab_size"] = shared_vocab_size
    if (Path(out_dir) / "manifest.json").exists():  # a restart: same settings, before any work
        TeacherCache(out_dir).check_manifest(
            manifest_with_settings(manifest, k, dtype, shard_size, num_samples)
        )

    from kd_module.models.gpt import build_model
    from kd_module.offline.writer import cache_teacher
    from kd_module.parallel import runtime

    runtime.initialize_distributed(
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        seed=seed,
        device="cuda" if accelerator == "gpu" else "cpu",
    )
    try:
        model = build_model(architecture, layout, vocab, PRECISIONS[precision].dtype)
        if teacher_checkpoint is not None:
            from kd_module.checkpoints.model import make_teacher_loader

            make_teacher_loader(teacher_checkpoint, teacher.ckpt_format)(model)
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
            shared_vocab_size=shared_vocab_size,
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
