"""HF weights into a megatron GPT stage, at any TP/PP layout.

The work is ModelOpt's (``modelopt.torch.export``'s ``GPTModelImporter``, reached through
:func:`kd_module.upstream.modelopt.import_hf_weights`): it fits megatron-core's local spec
and Transformer Engine spec alike, merges q/k/v into megatron's grouped ``linear_qkv`` layout
and gate/up into ``linear_fc1``, and reads each rank's slices straight from the safetensors
files. What this module adds is what comes before any weight is read: the architecture and
every tensor name and shape are checked against ``config.json`` and the parallel layout (one
message on every rank), and ``pytorch_model*.bin`` checkpoints are rewritten as safetensors in
a temporary directory (ModelOpt reads safetensors only). The HF directory is only read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kd_module.hf.config import (
    architecture_of,
    gpt_config_from_hf,
    read_hf_config,
    tokenizer_section,
)
from kd_module.hf.weights import WeightFiles, weight_files, weight_problems
from kd_module.models.gpt import GPTModelConfig, unwrap
from kd_module.parallel import collectives

logger = logging.getLogger(__name__)


def hf_model_config(
    directory: str | os.PathLike[str], seq_length: int | None = None
) -> GPTModelConfig:
    """The megatron architecture of the HF checkpoint in ``directory`` (from ``config.json``)."""
    return gpt_config_from_hf(
        read_hf_config(directory), seq_length, source=str(Path(directory) / "config.json")
    )


def _tensor_parallel_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


COMPARED_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "vocab_size",
    "add_qkv_bias",
    "qk_layernorm",
    "share_embeddings_and_output_weights",
)
"""The architecture fields an HF checkpoint fixes, compared with the model it is loaded into."""


def architecture_differences(model: Any, from_file: GPTModelConfig) -> list[str]:
    """``key: model X, config.json Y`` for each of :data:`COMPARED_FIELDS` that differs.

    ``model`` is a :class:`GPTModelConfig` or a mapping of those fields; a field it leaves
    ``None`` (a vocabulary padded from the tokenizer later) is not compared.
    """
    values = model if isinstance(model, dict) else {k: getattr(model, k) for k in COMPARED_FIELDS}
    return [
        f"{key}: model {values[key]!r}, config.json {getattr(from_file, key)!r}"
        for key in COMPARED_FIELDS
        if values.get(key) is not None and values[key] != getattr(from_file, key)
    ]


def check_hf_checkpoint(
    directory: str | os.PathLike[str],
    config: GPTModelConfig | dict[str, Any],
    tensor_model_parallel_size: int,
) -> WeightFiles:
    """The checkpoint's weight files, after every check that needs no weights.

    Args:
        directory: the HF model directory.
        config: the architecture of the model the weights go into (a :class:`GPTModelConfig`,
            or a mapping of :data:`COMPARED_FIELDS`).
        tensor_model_parallel_size: the TP size the weights are split across.

    Raises:
        ValueError / FileNotFoundError: one message naming the directory and each problem
            (unsupported architecture, missing shard or tensor, shapes that disagree with
            ``config.json`` or with ``config``, sizes the TP split cannot divide).
    """
    hf = read_hf_config(directory)
    seq_length = config.get("seq_length") if isinstance(config, dict) else config.seq_length
    from_file = gpt_config_from_hf(hf, seq_length, source=str(directory))
    files = weight_files(directory)
    problems = weight_problems(files, from_file, hf, tensor_model_parallel_size)
    differs = architecture_differences(config, from_file)
    if differs:
        problems.append("the model being loaded is not this checkpoint's: " + "; ".join(differs))
    if problems:
        raise ValueError(f"HF checkpoint {directory}: " + "; ".join(problems))
    return files


def _built_architecture(core: torch.nn.Module) -> dict[str, Any]:
    """:data:`COMPARED_FIELDS` of a built megatron ``GPTModel`` stage."""
    config = core.config
    values = {key: getattr(config, key, None) for key in COMPARED_FIELDS}
    values["vocab_size"] = getattr(core, "vocab_size", None)
    values["share_embeddings_and_output_weights"] = getattr(
        core, "share_embeddings_and_output_weights", None
    )
    values["seq_length"] = getattr(core, "max_sequence_length", None)
    return values


def _bin_as_safetensors(files: WeightFiles, target: Path) -> None:
    """Rewrite ``pytorch_model*.bin`` shards as safetensors under ``target`` (one shard at a
    time, memory-mapped), with the ``config.json`` beside them."""
    import json

    from safetensors.torch import save_file

    weight_map = {}
    for index, name in enumerate(files.files):
        state = torch.load(files.directory / name, map_location="cpu", mmap=True, weights_only=True)
        out = f"model-{index:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / out))
        weight_map.update(dict.fromkeys(state, out))
        del state
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(files.directory / "config.json", target / "config.json")


def load_hf_weights(
    model: torch.nn.Module, directory: str | os.PathLike[str], config: GPTModelConfig | None = None
) -> None:
    """Load the HF checkpoint in ``directory`` into this rank's megatron stage, in place.

    All ranks call it together (PP > 1 with tied embeddings synchronizes the two copies).

    Args:
        model: the local stage (a megatron ``GPTModel``, possibly wrapped), built for the
            checkpoint's architecture at the current parallel layout.
        directory: local HF model directory.
        config: the architecture ``model`` was built from (checked against ``config.json``);
            ``None`` checks the built model's own sizes.

    Raises:
        ValueError / FileNotFoundError: before any weight is read, for the problems
            :func:`check_hf_checkpoint` finds.
    """
    directory = Path(directory)
    core = unwrap(model)
    files = check_hf_checkpoint(
        directory, config or _built_architecture(core), _tensor_parallel_size()
    )
    dtype = next(core.parameters()).dtype
    architecture = architecture_of(read_hf_config(directory))
    logger.info("importing %s (%s) into the megatron model", directory, architecture)
    from kd_module.upstream.modelopt import import_hf_weights

    if files.kind == "safetensors":
        import_hf_weights(core, str(directory), dtype)
        return
    # pytorch_model*.bin: rank 0 rewrites it as safetensors in a temporary directory that every
    # rank of this machine reads (run `nemo kd import-hf` once for multi-node jobs).
    staging = None
    if collectives.rank() == 0:
        staging = tempfile.mkdtemp(prefix="kd_hf_bin_")
        _bin_as_safetensors(files, Path(staging))
    staging = collectives.all_gather_object(staging)[0]
    try:
        import_hf_weights(core, staging, dtype)
    finally:
        collectives.barrier()
        if collectives.rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)


def make_hf_loader(directory: str | os.PathLike[str]) -> Any:
    """``fn(stage)`` loading the HF checkpoint, for ``build_distillation_model``."""

    def load(model: torch.nn.Module) -> None:
        load_hf_weights(model, directory)

    return load


def import_hf(
    directory: str | os.PathLike[str],
    output: str | os.PathLike[str],
    seq_length: int | None = None,
    dtype: str | None = None,
) -> Path:
    """Convert the HF checkpoint in ``directory`` once into a megatron ``torch_dist`` checkpoint.

    ``output`` gets the weights, a ``model_config.yaml`` (architecture, precision, tokenizer)
    and a copy of the HF tokenizer files under ``output/tokenizer``; it loads at any TP/PP
    layout (``torch_dist`` reshards) and serves as a teacher or a student checkpoint. Runs in one
    process (it starts a single CPU rank when none is running); peak memory is about the model
    once plus one safetensors file.

    Args:
        directory: local HF model directory (only read).
        output: the checkpoint directory to write; an existing one is replaced only once the
            new one is complete.
        seq_length: the sequence length recorded in ``model_config.yaml`` (default: the model's
            ``max_position_embeddings``, capped at 4096).
        dtype: ``float32``, ``bfloat16`` or ``float16`` of the saved weights (default:
            ``config.json``'s ``torch_dtype``, else ``float32``).

    Returns:
        The checkpoint directory.

    Raises:
        ValueError / FileNotFoundError: before any weight is read, for an unsupported
            architecture, missing or misshapen tensors, or an unknown ``dtype``.
    """
    from kd_module.checkpoints.model import save_model_checkpoint
    from kd_module.hf.exporter import DTYPES, TOKENIZER_FILES
    from kd_module.models.gpt import ParallelLayout, build_model
    from kd_module.parallel import runtime

    hf = read_hf_config(directory)
    config = hf_model_config(directory, seq_length)
    dtype = dtype or hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if str(dtype) not in DTYPES:
        raise ValueError(f"HF import: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    check_hf_checkpoint(directory, config, 1)
    runtime.initialize_distributed(device="cpu")
    model = build_model(config, ParallelLayout(), params_dtype=DTYPES[str(dtype)])
    load_hf_weights(model, directory, config)
    output = Path(output)
    section = tokenizer_section(directory)
    if section:
        section = {**section, "type": str(output.resolve() / "tokenizer")}
    saved = save_model_checkpoint(model, output, "torch_dist", config, tokenizer=section)
    if section:
        (saved / "tokenizer").mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            if (Path(directory) / name).is_file():
                shutil.copy(Path(directory) / name, saved / "tokenizer" / name)
    logger.info("imported %s into %s", directory, saved)
    return saved
