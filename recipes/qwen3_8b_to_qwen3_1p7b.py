"""Qwen3-8B -> Qwen3-1.7B: logits distillation on 8 GPUs per node, bf16, sequence 4096.

The architectures follow the published model cards and their ``config.json``:
https://huggingface.co/Qwen/Qwen3-8B and https://huggingface.co/Qwen/Qwen3-1.7B.
Both share the 151936-token tokenizer; teacher and student load straight from
their Hugging Face directories, and the teacher directory's tokenizer is the data's.
"""

from __future__ import annotations

from typing import Any

import nemo_run as run

from kd_module.api import distill
from kd_module.models.gpt import GPTModelConfig
from kd_module.offline.job import build_teacher_cache
from recipes.distill_recipe import (
    gpu_pair_cache_recipe,
    gpu_pair_recipe,
    offline_config,
    run_config,
    teacher_spec,
)

NAME = "qwen3_8b_to_qwen3_1p7b"

_QWEN3_COMMON: dict[str, Any] = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    activation="swiglu",
    add_bias_linear=False,
    add_qkv_bias=False,
    qk_layernorm=True,
    position_embedding_type="rope",
    rotary_base=1_000_000,
    vocab_size=151_936,
    max_position_embeddings=40_960,
    kv_channels=128,
    num_query_groups=8,
    init_method_std=0.02,
)


def qwen3_8b(seq_length: int = 4096) -> run.Config[GPTModelConfig]:
    """Qwen3-8B (config.json of Qwen/Qwen3-8B).

    36 layers, hidden 4096, FFN 12288, 32 heads in 8 KV groups, head dim 128, QK layernorm,
    RMSNorm eps 1e-6, SwiGLU, RoPE base 1e6, vocabulary 151936, untied embeddings,
    40960 positions.
    """
    return run.Config(
        GPTModelConfig,
        num_layers=36,
        hidden_size=4096,
        ffn_hidden_size=12_288,
        num_attention_heads=32,
        seq_length=seq_length,
        share_embeddings_and_output_weights=False,
        **_QWEN3_COMMON,
    )


def qwen3_1p7b(seq_length: int = 4096) -> run.Config[GPTModelConfig]:
    """Qwen3-1.7B (config.json of Qwen/Qwen3-1.7B).

    28 layers, hidden 2048, FFN 6144, 16 heads in 8 KV groups, head dim 128 (so the attention
    width 16 x 128 = 2048 is set by ``kv_channels``), QK layernorm, RMSNorm eps 1e-6, SwiGLU,
    RoPE base 1e6, vocabulary 151936, tied embeddings.
    """
    return run.Config(
        GPTModelConfig,
        num_layers=28,
        hidden_size=2048,
        ffn_hidden_size=6144,
        num_attention_heads=16,
        seq_length=seq_length,
        share_embeddings_and_output_weights=True,
        **_QWEN3_COMMON,
    )


def qwen3_8b_pruned_6b(seq_length: int = 4096) -> run.Config[GPTModelConfig]:
    """Qwen3-8B width-pruned to at most 6 B parameters (the size of ModelOpt's Qwen3-8B -> 6B
    pruning example, not its exact shape): hidden 4096 -> 3328 and FFN 12288 -> 9984 together
    (``kd_module.pruning.minitron.budget_target(qwen3_8b, 6e9)``), heads, groups and 36 layers
    kept: 5.83 B parameters."""
    config = qwen3_8b(seq_length)
    config.hidden_size, config.ffn_hidden_size = 3328, 9984
    return config


@run.cli.factory(target=distill, name=NAME)
def qwen3_8b_to_qwen3_1p7b(
    teacher_path: str = "checkpoints/Qwen3-8B",
    tokenizer_path: str | None = None,
    student_path: str | None = None,
    distill_config: str | dict | None = None,
    data_paths: str | list[Any] | dict[str, Any] | None = None,
    dir: str | None = None,
    name: str = "default",
    num_nodes: int = 1,
    num_gpus_per_node: int = 8,
    seq_length: int = 4096,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    global_batch_size: int = 128,
    micro_batch_size: int = 1,
    max_steps: int = 10_000,
    checkpoint_every_n_steps: int | None = 500,
    resume: bool = True,
    teacher_cache: str | None = None,
    export_hf: str | None = None,
    student_from: str = "init",
) -> run.Partial:
    """Distill Qwen3-8B into Qwen3-1.7B.

    Args:
        teacher_path: the Qwen3-8B Hugging Face directory (``config.json``, safetensors,
            tokenizer), or a megatron checkpoint (torch_dist or torch).
        tokenizer_path: local directory of the Qwen3 HuggingFace tokenizer (default: the
            teacher directory's).
        student_path: start the student from this checkpoint: the Qwen3-1.7B Hugging Face
            directory, or a megatron checkpoint; from scratch when ``None``.
        distill_config: distillation YAML or dict; logits only when ``None``.
        data_paths: prepared dataset prefixes or blend; synthetic tokens when ``None``.
        dir: root of run directories.
        name: run name.
        num_nodes: machines.
        num_gpus_per_node: GPUs per machine.
        seq_length: tokens per sample (at most 40960).
        tensor_model_parallel_size: ranks each layer is split across (divides 8 KV groups).
        pipeline_model_parallel_size: ranks the layers are split across (divides 28 and 36).
        global_batch_size: samples per optimizer step.
        micro_batch_size: samples per micro-batch per data-parallel rank.
        max_steps: optimizer steps.
        checkpoint_every_n_steps: steps between run checkpoints (``None``: none).
        resume: continue from the run's latest checkpoint when the job is restarted.
        teacher_cache: distill offline from this teacher cache (``nemo kd cache-teacher
            --factory NAME`` over the same data) instead of running the teacher.
        export_hf: also write the distilled student as a Hugging Face directory here.
        student_from: ``"init"`` (Qwen3-1.7B from scratch or ``student_path``) or ``"prune"``:
            the student is Qwen3-8B width-pruned to 6 B parameters (:func:`qwen3_8b_pruned_6b`;
            Qwen3-1.7B ties its embeddings, the 8B does not, so it cannot be cut from it).

    Returns:
        ``run.Partial(kd_module.api.distill, ...)``.

    Examples:
        CLI::

            nemo kd distill --factory "qwen3_8b_to_qwen3_1p7b(teacher_path='/models/Qwen3-8B', \\
                student_path='/models/Qwen3-1.7B', export_hf='/models/Qwen3-1.7B-kd')"

        Python::

            recipe = qwen3_8b_to_qwen3_1p7b("/models/Qwen3-8B", student_path="/models/Qwen3-1.7B")
    """
    return gpu_pair_recipe(
        teacher_spec(teacher_path, qwen3_8b(seq_length)),
        qwen3_8b_pruned_6b(seq_length) if student_from == "prune" else qwen3_1p7b(seq_length),
        teacher_path if tokenizer_path is None else tokenizer_path,
        job=run_config(
            "runs" if dir is None else dir,
            name,
            checkpoint_every_n_steps=checkpoint_every_n_steps,
            resume=resume,
            export_hf=export_hf,
        ),
        offline=offline_config(teacher_cache),
        student_path=student_path,
        student_from=student_from,
        distill_config=distill_config,
        num_nodes=num_nodes,
        num_gpus_per_node=num_gpus_per_node,
        data_paths=data_paths,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        max_steps=max_steps,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )


@run.cli.factory(target=build_teacher_cache, name=NAME)
def qwen3_8b_to_qwen3_1p7b_cache(
    out_dir: str = "runs/qwen3_8b_to_qwen3_1p7b_cache",
    num_samples: int = 10_000 * 128,
    teacher_path: str = "checkpoints/Qwen3-8B",
    tokenizer_path: str | None = None,
    data_paths: str | list[Any] | dict[str, Any] | None = None,
    num_nodes: int = 1,
    num_gpus_per_node: int = 8,
    seq_length: int = 4096,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    micro_batch_size: int = 1,
    k: int = 64,
) -> run.Partial:
    """Cache the teacher's top-k logits for offline runs of :func:`qwen3_8b_to_qwen3_1p7b`.

    Pass the students' data arguments unchanged (``data_paths``, ``seq_length``); ``num_samples``
    is at least their ``max_steps x global_batch_size``.

    Args:
        out_dir: the cache directory.
        num_samples: train samples to cache (the distill recipe's 10000 steps x 128).
        teacher_path: the teacher's Hugging Face directory or megatron checkpoint.
        tokenizer_path: local directory of the HuggingFace tokenizer (default: the teacher
            directory's).
        data_paths: prepared dataset prefixes or blend; synthetic tokens when ``None``.
        num_nodes: machines.
        num_gpus_per_node: GPUs per machine (replicas beyond TP x PP cache disjoint shards).
        seq_length: tokens per sample.
        tensor_model_parallel_size: ranks each teacher layer is split across.
        pipeline_model_parallel_size: ranks the teacher's layers are split across.
        micro_batch_size: samples per teacher forward.
        k: top-k logits kept per token (bf16 values).

    Returns:
        ``run.Partial(kd_module.offline.job.build_teacher_cache, ...)``.

    Examples:
        CLI::

            nemo kd cache-teacher --factory qwen3_8b_to_qwen3_1p7b \\
                out_dir=/data/cache num_samples=1280000
    """
    return gpu_pair_cache_recipe(
        teacher_spec(teacher_path, qwen3_8b(seq_length)),
        teacher_path if tokenizer_path is None else tokenizer_path,
        out_dir=out_dir,
        num_samples=num_samples,
        data_paths=data_paths,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        k=k,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        num_nodes=num_nodes,
        num_gpus_per_node=num_gpus_per_node,
    )
