"""Llama 3.1 8B -> Llama 3.2 1B: logits distillation on 8 GPUs per node, bf16, sequence 8192.

The architectures follow the published model cards and their ``config.json``:
https://huggingface.co/meta-llama/Llama-3.1-8B and https://huggingface.co/meta-llama/Llama-3.2-1B.
Both share the 128256-token tokenizer; teacher and student load straight from
their Hugging Face directories, and the teacher directory's tokenizer is the data's.
"""

from __future__ import annotations

from typing import Any

import nemo_run as run

from kd_module.api import distill
from kd_module.data.tokenizers import TokenizerConfig
from kd_module.models.gpt import GPTModelConfig
from kd_module.offline.job import build_teacher_cache
from kd_module.pruning.job import prune
from recipes.distill_recipe import (
    data_config,
    gpu_pair_cache_recipe,
    gpu_pair_recipe,
    offline_config,
    run_config,
    teacher_spec,
)

NAME = "llama31_8b_to_llama32_1b"

_LLAMA3_COMMON: dict[str, Any] = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-5,
    activation="swiglu",
    add_bias_linear=False,
    position_embedding_type="rope",
    rotary_base=500_000,
    rope_scaling=True,
    vocab_size=128_256,
    max_position_embeddings=131_072,
    init_method_std=0.02,
)


def llama31_8b(seq_length: int = 8192) -> run.Config[GPTModelConfig]:
    """Llama 3.1 8B (config.json of meta-llama/Llama-3.1-8B).

    32 layers, hidden 4096, FFN 14336, 32 heads in 8 KV groups (head dim 128), RMSNorm eps 1e-5,
    SwiGLU, RoPE base 500000 with Llama 3.1 scaling (factor 8), vocabulary 128256, untied
    input and output embeddings, 131072 positions.
    """
    return run.Config(
        GPTModelConfig,
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14_336,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        seq_length=seq_length,
        share_embeddings_and_output_weights=False,
        rope_scaling_factor=8.0,
        **_LLAMA3_COMMON,
    )


def llama32_1b(seq_length: int = 8192) -> run.Config[GPTModelConfig]:
    """Llama 3.2 1B (config.json of meta-llama/Llama-3.2-1B).

    16 layers, hidden 2048, FFN 8192, 32 heads in 8 KV groups (head dim 64), RMSNorm eps 1e-5,
    SwiGLU, RoPE base 500000 with Llama 3 scaling, vocabulary 128256, tied embeddings. The
    model card's ``rope_scaling.factor`` is 32 for the 3.2 models (8 for 3.1).
    """
    return run.Config(
        GPTModelConfig,
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=64,
        seq_length=seq_length,
        share_embeddings_and_output_weights=True,
        rope_scaling_factor=32.0,
        **_LLAMA3_COMMON,
    )


@run.cli.factory(target=distill, name=NAME)
def llama31_8b_to_llama32_1b(
    teacher_path: str = "checkpoints/Llama-3.1-8B",
    tokenizer_path: str | None = None,
    student_path: str | None = None,
    distill_config: str | dict | None = None,
    data_paths: str | list[Any] | dict[str, Any] | None = None,
    dir: str | None = None,
    name: str = "default",
    num_nodes: int = 1,
    num_gpus_per_node: int = 8,
    seq_length: int = 8192,
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
    prune_kind: str = "width",
) -> run.Partial:
    """Distill Llama 3.1 8B into Llama 3.2 1B.

    Args:
        teacher_path: the Llama 3.1 8B Hugging Face directory (``config.json``, safetensors,
            tokenizer), or a megatron checkpoint (torch_dist or torch).
        tokenizer_path: local directory of the Llama 3 HuggingFace tokenizer (default: the
            teacher directory's).
        student_path: start the student from this checkpoint: the Llama 3.2 1B Hugging Face
            directory, or a megatron checkpoint (e.g. a pruned teacher); from scratch when
            ``None``.
        distill_config: distillation YAML or dict; logits only when ``None``.
        data_paths: prepared dataset prefixes or blend; synthetic tokens when ``None``.
        dir: root of run directories.
        name: run name.
        num_nodes: machines.
        num_gpus_per_node: GPUs per machine.
        seq_length: tokens per sample (at most 131072).
        tensor_model_parallel_size: ranks each layer is split across (divides 8 KV groups).
        pipeline_model_parallel_size: ranks the layers are split across (divides 16).
        global_batch_size: samples per optimizer step.
        micro_batch_size: samples per micro-batch per data-parallel rank.
        max_steps: optimizer steps.
        checkpoint_every_n_steps: steps between run checkpoints (``None``: none).
        resume: continue from the run's latest checkpoint when the job is restarted.
        teacher_cache: distill offline from this teacher cache (``nemo kd cache-teacher
            --factory NAME`` over the same data) instead of running the teacher.
        export_hf: also write the distilled student as a Hugging Face directory here.
        student_from: ``"init"`` (Llama 3.2 1B from scratch or ``student_path``) or
            ``"prune"``: the student is Llama 3.1 8B pruned to a Minitron 4B shape (Llama 3.2
            1B's 64-channel heads cannot be cut from the 8B's 128-channel ones).
        prune_kind: with ``student_from="prune"``, ``width`` or ``depth`` (:data:`MINITRON_4B`).

    Returns:
        ``run.Partial(kd_module.api.distill, ...)``.

    Examples:
        CLI::

            nemo kd distill --factory "llama31_8b_to_llama32_1b(\\
                teacher_path='/models/Llama-3.1-8B', student_path='/models/Llama-3.2-1B')" \\
                data.paths='[/data/web_text_document]' --dryrun

        Python::

            recipe = llama31_8b_to_llama32_1b("/models/Llama-3.1-8B")
    """
    return gpu_pair_recipe(
        teacher_spec(teacher_path, llama31_8b(seq_length)),
        llama31_minitron_4b(prune_kind, seq_length)
        if student_from == "prune"
        else llama32_1b(seq_length),
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
def llama31_8b_to_llama32_1b_cache(
    out_dir: str = "runs/llama31_8b_to_llama32_1b_cache",
    num_samples: int = 10_000 * 128,
    teacher_path: str = "checkpoints/Llama-3.1-8B",
    tokenizer_path: str | None = None,
    data_paths: str | list[Any] | dict[str, Any] | None = None,
    num_nodes: int = 1,
    num_gpus_per_node: int = 8,
    seq_length: int = 8192,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    micro_batch_size: int = 1,
    k: int = 64,
) -> run.Partial:
    """Cache the teacher's top-k logits for offline runs of :func:`llama31_8b_to_llama32_1b`.

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

            nemo kd cache-teacher --factory llama31_8b_to_llama32_1b \\
                out_dir=/data/cache num_samples=1280000
    """
    return gpu_pair_cache_recipe(
        teacher_spec(teacher_path, llama31_8b(seq_length)),
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


MINITRON_4B = {
    "width": {"hidden_size": 3072, "ffn_hidden_size": 9216},
    "depth": {"num_layers": 16},
}
"""NVIDIA's published prunings of Llama 3.1 8B: Llama-3.1-Minitron-4B-Width (hidden 4096 ->
3072, FFN 14336 -> 9216; heads, groups and 32 layers kept) and -Depth (32 -> 16 layers), both
about 4.5 B parameters."""


def llama31_minitron_4b(kind: str = "width", seq_length: int = 8192) -> run.Config[GPTModelConfig]:
    """Llama 3.1 8B pruned to a Minitron 4B shape (``kind``: ``width`` or ``depth``)."""
    if kind not in MINITRON_4B:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(MINITRON_4B)}")
    teacher = llama31_8b(seq_length)
    for key, value in MINITRON_4B[kind].items():
        setattr(teacher, key, value)
    return teacher


@run.cli.factory(target=prune, name=NAME)
def llama31_8b_to_llama32_1b_prune(
    output: str = "checkpoints/Llama-3.1-Minitron-4B-Width",
    kind: str = "width",
    teacher_path: str = "checkpoints/Llama-3.1-8B",
    tokenizer_path: str | None = None,
    data_paths: str | list[Any] | dict[str, Any] | None = None,
    seq_length: int = 8192,
    calibration_samples: int = 1024,
    accelerator: str = "gpu",
    export_hf: str | None = None,
) -> run.Partial:
    """Prune Llama 3.1 8B to a published Minitron 4B shape, as a student to distill.

    Llama 3.2 1B cannot be pruned from Llama 3.1 8B (its heads are 64 channels wide, the 8B's
    128), so this factory cuts the shapes NVIDIA published for this teacher; distill the result
    with ``student_checkpoint=OUTPUT`` and the matching ``student`` architecture.

    Args:
        output: the pruned checkpoint's directory.
        kind: ``width`` (hidden 3072, FFN 9216) or ``depth`` (16 layers).
        teacher_path: the teacher's Hugging Face directory or megatron checkpoint.
        tokenizer_path: the HuggingFace tokenizer (default: the teacher directory's).
        data_paths: prepared dataset prefixes or blend to calibrate on; synthetic tokens when
            ``None`` (a test only: importance needs real text).
        seq_length: tokens per calibration sample.
        calibration_samples: samples the importance is measured over (the Minitron paper
            uses 1024).
        accelerator: ``gpu`` (one GPU; the teacher is built whole) or ``cpu``.
        export_hf: also write the pruned model as a Hugging Face directory here.

    Returns:
        ``run.Partial(kd_module.pruning.job.prune, ...)``.

    Examples:
        CLI::

            nemo kd prune --factory "llama31_8b_to_llama32_1b(kind='depth', \\
                teacher_path='/models/Llama-3.1-8B', data_paths=['/data/web_text_document'])"
    """
    tokenizer = run.Config(
        TokenizerConfig,
        library="huggingface",
        path=teacher_path if tokenizer_path is None else tokenizer_path,
    )
    return run.Partial(
        prune,
        data=data_config(data_paths, seq_length, 1, 1, tokenizer=tokenizer),
        output=output,
        teacher=teacher_spec(teacher_path, llama31_8b(seq_length)),
        target=llama31_minitron_4b(kind, seq_length),
        calibration_samples=calibration_samples,
        accelerator=accelerator,
        export_hf=export_hf,
    )
