"""A tiny teacher -> student pair on the embedded corpus, on CPU: the recipe that runs anywhere.

The data is the standard library's own source (:func:`kd_module.data.corpus.embedded_corpus`),
tokenized with the byte tokenizer; the teacher is the one ``python -m examples.demo`` trains and
caches. A recipe does no I/O, so both are referenced lazily: :func:`embedded_corpus_paths` and
:func:`demo_teacher_checkpoint` are ``run.Config`` values that nemo-run calls when it builds the
task on its rank, not when the recipe is made, dry-run or exported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nemo_run as run

from kd_module.api import distill
from kd_module.data.corpus import CACHE_ENV
from kd_module.distillation.config import DistillConfig
from kd_module.models.gpt import GPTModelConfig
from kd_module.offline.job import build_teacher_cache
from kd_module.pruning.job import prune
from recipes.distill_recipe import (
    cache_teacher_recipe,
    data_config,
    distill_recipe,
    offline_config,
    run_config,
    teacher_spec,
)

NAME = "tiny_cpu"

SEQ_LENGTH = 128
"""Tokens (bytes) per sample; the demo's."""
DEFAULT_CACHE_ROOT = os.path.join("~", ".cache", "megatron-kd")
"""Where the demo caches its teacher when ``$KD_CACHE_DIR`` is not set."""
TEACHER_DIR_PATTERN = "teacher-*"
"""Directories of cached demo teachers under the cache root (one per demo setting)."""


def embedded_corpus_paths(cache_dir: str | None = None, max_bytes: int = 4_000_000) -> dict:
    """Per-split dataset prefixes of the embedded corpus, tokenized on the first call.

    Args:
        cache_dir: the corpus cache (``$KD_CACHE_DIR`` or ``~/.cache/megatron-kd/corpus``).
        max_bytes: bytes of standard-library source to take.

    Returns:
        ``{"train": prefix, "validation": prefix}`` for :class:`~kd_module.data.GPTDataModule`.
    """
    from kd_module.data.corpus import embedded_corpus

    corpus = embedded_corpus(cache_dir=cache_dir, max_bytes=max_bytes)
    return {"train": corpus["train_prefix"], "validation": corpus["validation_prefix"]}


def demo_teacher_checkpoint(cache_root: str | None = None) -> str:
    """The newest teacher checkpoint cached by ``python -m examples.demo``.

    Args:
        cache_root: ``$KD_CACHE_DIR`` or ``~/.cache/megatron-kd`` when ``None``.

    Returns:
        The checkpoint directory (``<cache_root>/teacher-<key>/checkpoint``).

    Raises:
        FileNotFoundError: when the demo has not cached a teacher there yet.
    """
    root = Path(cache_root or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()
    records = sorted(
        root.glob(os.path.join(TEACHER_DIR_PATTERN, "teacher.json")),
        key=lambda path: path.stat().st_mtime,
    )
    if not records:
        raise FileNotFoundError(
            f"tiny_cpu: no cached demo teacher under {root} ({TEACHER_DIR_PATTERN}/teacher.json); "
            "run `python -m examples.demo` once, or give teacher_path=<checkpoint>"
        )
    return str(records[-1].parent / "checkpoint")


def tiny_student(seq_length: int = SEQ_LENGTH) -> run.Config[GPTModelConfig]:
    """A 1-layer student: width 64, 4 heads, byte vocabulary padded to 64 (the pinned golden
    curve is this pair's; `make demo`'s student is a prunable 2-layer one)."""
    return run.Config(
        GPTModelConfig,
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=seq_length,
        make_vocab_size_divisible_by=64,
    )


@run.cli.factory(target=distill, name=NAME)
def tiny_cpu(
    teacher_path: str | None = None,
    teacher_config: run.Config[GPTModelConfig] | None = None,
    data_paths: Any = None,
    mock_data: bool = False,
    dir: str | None = None,
    name: str = "tiny_cpu",
    num_nodes: int = 1,
    num_gpus_per_node: int = 1,
    max_steps: int = 100,
    val_check_interval: int | None = None,
    limit_val_batches: int = 4,
    micro_batch_size: int = 8,
    global_batch_size: int = 16,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    teacher_cache: str | None = None,
    offline_loss_mode: str = "tail",
) -> run.Partial:
    """Distill the demo's tiny teacher into a 1-layer student on CPU.

    Args:
        teacher_path: the teacher checkpoint; the demo's cached teacher when ``None`` (found
            when the task is built).
        teacher_config: the teacher's architecture; read from the checkpoint's
            ``model_config.yaml`` when ``None``.
        data_paths: dataset prefixes; the embedded corpus when ``None`` (tokenized when the task
            is built).
        mock_data: synthetic tokens instead of any corpus.
        dir: root of run directories.
        name: run name.
        num_nodes: machines (one torchrun agent each).
        num_gpus_per_node: CPU processes (ranks) per machine.
        max_steps: optimizer steps.
        val_check_interval: steps between validations; once, after the last step, when ``None``.
        limit_val_batches: validation batches per validation.
        micro_batch_size: samples per micro-batch per data-parallel rank.
        global_batch_size: samples per optimizer step.
        tensor_model_parallel_size: ranks each layer is split across.
        pipeline_model_parallel_size: ranks the layers are split across.
        teacher_cache: distill offline from the cache ``nemo kd cache-teacher --factory
            tiny_cpu`` wrote (same data); no teacher is loaded.
        offline_loss_mode: with ``teacher_cache``, ``"tail"`` or ``"renormalized"``.

    Returns:
        ``run.Partial(kd_module.api.distill, ...)``.

    Raises:
        ValueError: for ``mock_data=True`` with ``data_paths``, and any bad argument of
            :func:`~recipes.distill_recipe.distill_recipe`.

    Examples:
        CLI::

            nemo kd distill --factory tiny_cpu -y trainer.max_steps=50 job.name=short

        Python::

            import nemo_run as run
            run.run(tiny_cpu(max_steps=50), direct=True)
    """
    if mock_data and data_paths is not None:
        raise ValueError(
            f"tiny_cpu: data_paths={data_paths!r} is not used with mock_data=True; leave it None"
        )
    if data_paths is None and not mock_data:
        data_paths = run.Config(embedded_corpus_paths)
    if teacher_path is None and teacher_cache is None:
        teacher_path = run.Config(demo_teacher_checkpoint)
    return distill_recipe(
        teacher_spec(teacher_path, teacher_config),
        tiny_student(),
        job=run_config("runs" if dir is None else dir, name),
        offline=offline_config(teacher_cache, offline_loss_mode),
        distill_config=run.Config(
            DistillConfig, skip_lm_loss=False, kd_loss_scale=1.0, logit_kl_temperature=1.0
        ),
        num_nodes=num_nodes,
        num_gpus_per_node=num_gpus_per_node,
        data_paths=data_paths,
        seq_length=SEQ_LENGTH,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        accelerator="cpu",
        precision="fp32",
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        limit_val_batches=limit_val_batches,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=10,
        loss_chunk_size=1024,
    )


@run.cli.factory(target=build_teacher_cache, name=NAME)
def tiny_cpu_cache(
    out_dir: str = os.path.join("runs", "tiny_cpu_cache"),
    teacher_path: str | None = None,
    data_paths: Any = None,
    mock_data: bool = False,
    num_samples: int = 100 * 16,
    k: int = 32,
    dtype: str = "fp16",
    num_gpus_per_node: int = 1,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
) -> run.Partial:
    """Cache the demo teacher's top-k logits over :func:`tiny_cpu`'s data, on CPU.

    ``nemo kd cache-teacher --factory tiny_cpu`` then ``nemo kd distill --factory
    "tiny_cpu(teacher_cache='runs/tiny_cpu_cache')"`` distills without the teacher. (fp16
    rather than bf16 values: CPUs convert fp16 faster, and the tiny teacher's logits are small.)

    Args:
        out_dir: the cache directory.
        teacher_path: the teacher checkpoint; the demo's cached teacher when ``None``.
        data_paths: dataset prefixes; the embedded corpus when ``None``.
        mock_data: synthetic tokens instead of any corpus.
        num_samples: train samples to cache (``tiny_cpu``'s 100 steps x 16).
        k: top-k logits per token.
        dtype: storage of the logit values.
        num_gpus_per_node: CPU processes (ranks); the ones beyond TP x PP are data parallel.
        tensor_model_parallel_size: ranks each teacher layer is split across.
        pipeline_model_parallel_size: ranks the teacher's layers are split across.

    Returns:
        ``run.Partial(kd_module.offline.job.build_teacher_cache, ...)``.
    """
    if mock_data and data_paths is not None:
        raise ValueError(
            f"tiny_cpu: data_paths={data_paths!r} is not used with mock_data=True; leave it None"
        )
    if data_paths is None and not mock_data:
        data_paths = run.Config(embedded_corpus_paths)
    return cache_teacher_recipe(
        teacher_spec(
            teacher_path if teacher_path is not None else run.Config(demo_teacher_checkpoint)
        ),
        out_dir,
        num_samples,
        data_paths=data_paths,
        seq_length=SEQ_LENGTH,
        micro_batch_size=8,
        k=k,
        dtype=dtype,
        shard_size=256,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        accelerator="cpu",
        precision="fp32",
        num_gpus_per_node=num_gpus_per_node,
    )


def tiny_pruned_target(seq_length: int = SEQ_LENGTH) -> run.Config[GPTModelConfig]:
    """The demo teacher (4 layers, width 128, 4 heads of 32 channels, FFN 512) pruned to half its
    depth, width and heads: 2 layers, width 64, 2 heads of 32 channels, FFN 256."""
    return run.Config(
        GPTModelConfig,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        ffn_hidden_size=256,
        seq_length=seq_length,
        make_vocab_size_divisible_by=64,
    )


@run.cli.factory(target=prune, name=NAME)
def tiny_cpu_prune(
    output: str = os.path.join("runs", "tiny_cpu_pruned"),
    teacher_path: str | None = None,
    data_paths: Any = None,
    mock_data: bool = False,
    calibration_samples: int = 256,
) -> run.Partial:
    """Prune the demo teacher to :func:`tiny_pruned_target` on CPU (Minitron), calibrated on
    :func:`tiny_cpu`'s data; the result is a ``student_checkpoint`` for distillation.

    Args:
        output: the pruned checkpoint's directory.
        teacher_path: the teacher checkpoint; the demo's cached teacher when ``None``.
        data_paths: dataset prefixes; the embedded corpus when ``None``.
        mock_data: synthetic tokens instead of any corpus.
        calibration_samples: train samples the importance is measured over.

    Returns:
        ``run.Partial(kd_module.pruning.job.prune, ...)``.

    Examples:
        ``nemo kd prune --factory tiny_cpu output=runs/pruned``
    """
    if mock_data and data_paths is not None:
        raise ValueError(
            f"tiny_cpu: data_paths={data_paths!r} is not used with mock_data=True; leave it None"
        )
    if data_paths is None and not mock_data:
        data_paths = run.Config(embedded_corpus_paths)
    return run.Partial(
        prune,
        data=data_config(data_paths, SEQ_LENGTH, 8, 8),
        output=output,
        teacher=teacher_spec(
            teacher_path if teacher_path is not None else run.Config(demo_teacher_checkpoint)
        ),
        target=tiny_pruned_target(),
        calibration_samples=calibration_samples,
    )
