"""A megatron student checkpoint back to a Hugging Face model directory.

ModelOpt 0.47.0 has an exporter (``export_mcore_gpt_to_hf``), but it cannot run beside
megatron-core 0.16.1: its module imports ``megatron.core.models.hybrid.hybrid_model``, which
that release does not have, so ``GPTModel`` and the parallel-state functions it uses are never
defined and the first call fails with ``NameError: name 'HybridModel' is not defined``. It also
takes the HF config from an existing HF checkpoint, which a student trained from scratch or
pruned does not have. So this module writes the mapping itself, the inverse of the importer's
for the four dense architectures of :mod:`kd_module.hf.config`, and nothing more.

The student is read from its saved checkpoint at TP=1, PP=1 in one process: a ``torch_dist``
checkpoint reshards on load, so a student trained at any TP/PP layout exports the same way
(a legacy ``torch`` checkpoint must have been saved at TP=1, PP=1). Peak memory is about the
student's size twice (the model, then one output shard at a time).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kd_module.hf.config import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    architecture_for,
    export_problems,
    hf_config_from_gpt,
    hf_tokenizer_dir,
)
from kd_module.models.gpt import GPTModelConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
"""Files of an HF tokenizer directory copied into an export."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _qkv_split(
    weight: torch.Tensor, config: GPTModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused ``linear_qkv`` rows (per query group: its heads' queries, one key, one
    value) as HF's separate q, k and v."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    head_dim = config.kv_channels or config.hidden_size // heads
    per_group = heads // groups
    grouped = weight.reshape(groups, per_group + 2, head_dim, *weight.shape[1:])
    q = grouped[:, :per_group].reshape(heads * head_dim, *weight.shape[1:])
    k = grouped[:, per_group].reshape(groups * head_dim, *weight.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *weight.shape[1:])
    return q, k, v


def hf_state_dict(
    state: dict[str, torch.Tensor], config: GPTModelConfig, architecture: str | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors from a whole (TP=1, PP=1) megatron GPT state dict.

    Works for the local spec and Transformer Engine's (whose norms sit inside ``linear_qkv`` and
    ``linear_fc1`` as ``layer_norm_weight``).

    Raises:
        ValueError: when the model is not exportable as ``architecture``, or a tensor is missing.
    """
    architecture = architecture or architecture_for(config)
    export_problems(config, architecture).raise_if_any("HF export")

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"HF export: the student's state dict has no {name}")
        return state[name]

    def first(*names: str) -> torch.Tensor:
        for name in names:
            if name in state:
                return state[name]
        raise ValueError(f"HF export: the student's state dict has none of {', '.join(names)}")

    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")}
    for i in range(config.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = m + "self_attention."
        out[h + "input_layernorm.weight"] = first(
            m + "input_layernorm.weight", attn + "linear_qkv.layer_norm_weight"
        )
        q, k, v = _qkv_split(take(attn + "linear_qkv.weight"), config)
        out[h + "self_attn.q_proj.weight"] = q
        out[h + "self_attn.k_proj.weight"] = k
        out[h + "self_attn.v_proj.weight"] = v
        if config.add_qkv_bias:
            qb, kb, vb = _qkv_split(take(attn + "linear_qkv.bias"), config)
            out[h + "self_attn.q_proj.bias"] = qb
            out[h + "self_attn.k_proj.bias"] = kb
            out[h + "self_attn.v_proj.bias"] = vb
        if config.qk_layernorm:
            out[h + "self_attn.q_norm.weight"] = take(attn + "q_layernorm.weight")
            out[h + "self_attn.k_norm.weight"] = take(attn + "k_layernorm.weight")
        out[h + "self_attn.o_proj.weight"] = take(attn + "linear_proj.weight")
        out[h + "post_attention_layernorm.weight"] = first(
            m + "pre_mlp_layernorm.weight", m + "mlp.linear_fc1.layer_norm_weight"
        )
        gate, up = take(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"] = gate
        out[h + "mlp.up_proj.weight"] = up
        out[h + "mlp.down_proj.weight"] = take(m + "mlp.linear_fc2.weight")
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = take("output_layer.weight")
    return out


def _shards(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_hf_directory(
    tensors: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    directory: Path,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Write safetensors shards (with an index when more than one), ``config.json``,
    ``generation_config.json`` and the tokenizer files into ``directory`` (which exists)."""
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_bytes)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        )
        save_file(
            {k: v.detach().contiguous() for k, v in shard.items()},
            str(directory / name),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation: dict[str, Any] = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            generation[key] = hf_config[key]
    if tokenizer_dir is not None:
        source = Path(tokenizer_dir) / GENERATION_CONFIG_FILE
        if source.is_file():
            generation = json.loads(source.read_text())
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, directory / name)
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")


def _token_ids(tokenizer_dir: str | None) -> dict[str, Any]:
    """bos/eos/pad ids of the HF tokenizer (or its model's ``config.json``) for ``config.json``."""
    if tokenizer_dir is None:
        return {}
    config = Path(tokenizer_dir) / CONFIG_FILE
    if config.is_file():
        data = json.loads(config.read_text())
        return {k: data.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception:  # noqa: BLE001 - ids are a courtesy; the export stands without them
        return {}
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def export_hf(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    architecture: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write the megatron GPT checkpoint ``checkpoint`` as an HF model directory ``output``.

    Run in one process (it initializes a single CPU rank when none is running). The output is
    written into a hidden sibling and renamed into place when complete; an existing ``output``
    is replaced only then.

    Args:
        checkpoint: a student (or any megatron-kd) checkpoint with its ``model_config.yaml``.
        output: the HF directory to write.
        architecture: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``Qwen3ForCausalLM`` (default: Qwen3 when the model has q/k norms, Qwen2 with q/k/v
            bias, else Llama).
        dtype: ``float32``, ``bfloat16`` or ``float16`` of the written tensors (default: the
            checkpoint's recorded precision, else the weights' own dtype).
        tokenizer_dir: the HF tokenizer to copy in (default: the one the checkpoint's
            ``model_config.yaml`` names, if it is a local HF tokenizer directory).
        max_shard_bytes: largest safetensors file.

    Returns:
        The output directory.

    Raises:
        ValueError: before anything is read, for an architecture the model cannot be written
            as, or an unknown dtype.
    """
    from kd_module.checkpoints.atomic import replace_directory
    from kd_module.checkpoints.model import load_model_checkpoint
    from kd_module.models.gpt import ParallelLayout, build_model
    from kd_module.nemo_format.discovery import load_teacher_model_config
    from kd_module.parallel import runtime

    resolved = load_teacher_model_config(None, GPTModelConfig(), checkpoint)
    if resolved.source is None:
        raise ValueError(
            f"HF export: {checkpoint} has no model_config.yaml; the architecture of the weights "
            "is unknown"
        )
    config = resolved.model
    architecture = architecture or architecture_for(config)
    export_problems(config, architecture).raise_if_any(f"HF export of {checkpoint}")
    dtype = dtype or resolved.precision
    if dtype is not None and str(dtype) not in DTYPES:
        raise ValueError(f"HF export: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    tokenizer = (
        os.fspath(tokenizer_dir)
        if tokenizer_dir is not None
        else hf_tokenizer_dir(resolved.tokenizer)
    )

    runtime.initialize_distributed(device="cpu")
    model = build_model(config, ParallelLayout())
    load_model_checkpoint(model, checkpoint)
    state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    tensors = hf_state_dict(state, config, architecture)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[str(dtype)]) for k, v in tensors.items()}
    hf_config = hf_config_from_gpt(
        config,
        config.vocab_size or state["embedding.word_embeddings.weight"].shape[0],
        architecture,
        base=_token_ids(tokenizer),
    )
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")

    final = Path(output)
    staging = final.parent / f".{final.name}.incomplete"
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_hf_directory(tensors, hf_config, staging, tokenizer, max_shard_bytes)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, final)
    logger.info("exported %s as %s to %s", checkpoint, architecture, final)
    return final
