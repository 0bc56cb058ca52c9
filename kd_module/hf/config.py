"""Hugging Face ``config.json`` <-> :class:`~kd_module.models.gpt.GPTModelConfig`.

The supported architectures are the dense decoder families that megatron's GPT model and
ModelOpt's HF importer share: Llama (incl. Llama 3.1's RoPE scaling and Llama 3.2's tied
embeddings), Qwen2 (bias on q/k/v), Qwen3 (RMSNorm on queries and keys, explicit head size) and
Mistral (Llama's tensors; its sliding window must cover the sequence). Everything the megatron
model cannot express (another activation, biases on every linear, another RoPE scaling) is
refused here, by name, before a model is built or a weight is read.

This module imports neither torch nor megatron, so the command line and ``distill``'s input
checks can use it cheaply.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from kd_module.models.gpt import GPTModelConfig
from kd_module.rules import Problems, close_matches

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
"""HF ``architectures`` megatron-kd imports and exports."""

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
"""HF ``model_type`` of each architecture (what ``AutoConfig`` dispatches on)."""

# megatron-core 0.16.1's RotaryEmbedding._apply_scaling takes only the factor; the other three
# numbers of Llama 3.1's "llama3" RoPE scaling are fixed there at these values (which every
# Llama 3.1 / 3.2 / 3.3 checkpoint uses).
LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def read_hf_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory.

    Raises:
        FileNotFoundError: the directory or its ``config.json`` does not exist.
        ValueError: the file is not a JSON object.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"HF checkpoint {directory}: no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"HF checkpoint {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"HF checkpoint {path}: the top level must be a JSON object")
    return data


def architecture_of(hf: dict[str, Any]) -> str | None:
    """The first entry of ``architectures`` (``None`` when the key is missing or empty)."""
    names = hf.get("architectures") or []
    return names[0] if names else None


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in one shape for transformers 4.x (``rope_theta`` + ``rope_scaling``) and
    5.x (``rope_parameters`` holding both)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    return params


def hf_problems(hf: dict[str, Any], seq_length: int | None = None) -> Problems:
    """What keeps this ``config.json`` from becoming a megatron GPT model, one message each."""
    problems = Problems()
    arch = architecture_of(hf)
    if arch not in ARCHITECTURES:
        problems.add(
            f"architectures={hf.get('architectures')!r} is not supported"
            f"{close_matches(arch, ARCHITECTURES)}; supported: {', '.join(ARCHITECTURES)}"
        )
        return problems
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        problems.positive_int(key, hf.get(key))
    if problems:
        return problems
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        problems.add(f"hidden_act={act!r} is not supported; {arch} needs 'silu' (SwiGLU)")
    if hf.get("mlp_bias"):
        problems.add("mlp_bias=true is not supported (megatron biases all linears or none)")
    if arch in ("LlamaForCausalLM", "MistralForCausalLM") and hf.get("attention_bias"):
        problems.add("attention_bias=true is not supported for Llama/Mistral (only Qwen2's q/k/v)")
    rope = rope_parameters(hf)
    kind = rope["rope_type"]
    if kind == "llama3":
        for key, fixed in LLAMA3_ROPE_FIXED.items():
            if key in rope and not math.isclose(float(rope[key]), fixed):
                problems.add(
                    f"rope_scaling.{key}={rope[key]!r}: megatron-core 0.16.1 fixes it at {fixed} "
                    "for rope_type 'llama3' (only factor is configurable)"
                )
    elif kind != "default":
        problems.add(f"rope_scaling rope_type={kind!r} is not supported; allowed: default, llama3")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", arch == "MistralForCausalLM")
    if window is not None and uses_window and seq_length is not None and window < seq_length:
        problems.add(
            f"sliding_window={window} is shorter than seq_length={seq_length}: megatron's "
            "attention here is full causal attention; use seq_length <= sliding_window"
        )
    return problems


def gpt_config_from_hf(
    hf: dict[str, Any], seq_length: int | None = None, source: str = "config.json"
) -> GPTModelConfig:
    """The megatron architecture of an HF ``config.json``.

    Args:
        hf: the parsed ``config.json``.
        seq_length: training sequence length (default: the model's
            ``max_position_embeddings``, capped at 4096).
        source: where ``hf`` came from, for messages.

    Returns:
        A :class:`GPTModelConfig` with ``vocab_size`` set to the checkpoint's embedding rows
        (no further padding: the weights fix the table's size).

    Raises:
        ValueError: one message listing every unsupported setting (see :func:`hf_problems`).
    """
    problems = hf_problems(hf, seq_length)
    problems.raise_if_any(f"HF checkpoint {source}")
    arch = architecture_of(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    max_positions = hf.get("max_position_embeddings") or 4096
    rope = rope_parameters(hf)
    return GPTModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        ffn_hidden_size=hf["intermediate_size"],
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        seq_length=seq_length or min(max_positions, 4096),
        max_position_embeddings=max_positions,
        vocab_size=hf["vocab_size"],
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        add_bias_linear=False,
        add_qkv_bias=arch == "Qwen2ForCausalLM",
        qk_layernorm=arch == "Qwen3ForCausalLM",
        position_embedding_type="rope",
        rotary_base=int(rope["rope_theta"]),
        rope_scaling=rope["rope_type"] == "llama3",
        rope_scaling_factor=float(rope.get("factor", 8.0)),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )


def architecture_for(config: GPTModelConfig) -> str:
    """The HF architecture a megatron model exports as: Qwen3 with q/k norms, Qwen2 with q/k/v
    bias, else Llama."""
    if config.qk_layernorm:
        return "Qwen3ForCausalLM"
    if config.add_qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def export_problems(config: GPTModelConfig, architecture: str) -> Problems:
    """What keeps a megatron model of ``config`` from being written as ``architecture``."""
    problems = Problems()
    if not problems.one_of("architecture", architecture, ARCHITECTURES):
        return problems
    wants = {
        "model_type": "gpt",
        "normalization": "RMSNorm",
        "activation": "swiglu",
        "add_bias_linear": False,
        "position_embedding_type": "rope",
        "layernorm_zero_centered_gamma": False,
        "rotary_percent": 1.0,
        "add_qkv_bias": architecture == "Qwen2ForCausalLM",
        "qk_layernorm": architecture == "Qwen3ForCausalLM",
    }
    for key, value in wants.items():
        if getattr(config, key) != value:
            problems.add(f"{key}={getattr(config, key)!r} (an {architecture} needs {value!r})")
    return problems


def hf_config_from_gpt(
    config: GPTModelConfig,
    vocab_size: int,
    architecture: str | None = None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a megatron model written as an HF model.

    Args:
        config: the megatron architecture.
        vocab_size: rows of the embedding table as saved.
        architecture: one of :data:`ARCHITECTURES` (default: :func:`architecture_for`).
        base: a ``config.json`` whose other keys (token ids, ``torch_dtype``) are kept.

    Raises:
        ValueError: when the model cannot be that architecture (see :func:`export_problems`).
    """
    architecture = architecture or architecture_for(config)
    export_problems(config, architecture).raise_if_any("HF export")
    heads = config.num_attention_heads
    head_dim = config.kv_channels or config.hidden_size // heads
    out = {
        key: value
        for key, value in (base or {}).items()
        if key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rotary_base)}
    if config.rope_scaling:
        rope = {
            "rope_type": "llama3",
            "factor": float(config.rope_scaling_factor),
            **LLAMA3_ROPE_FIXED,
            "rope_theta": float(config.rotary_base),
        }
    out.update(
        architectures=[architecture],
        model_type=MODEL_TYPES[architecture],
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size or 4 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=config.num_query_groups or heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=config.padded_max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon,
        tie_word_embeddings=config.share_embeddings_and_output_weights,
        initializer_range=config.init_method_std,
        # transformers 4.x reads these two; 5.x reads rope_parameters.
        rope_theta=float(config.rotary_base),
        rope_scaling=None if rope["rope_type"] == "default" else dict(rope),
        rope_parameters=rope,
    )
    if architecture != "Qwen2ForCausalLM":  # Qwen2's q/k/v bias is implied by its type
        out["attention_bias"] = False
    if architecture == "MistralForCausalLM":
        out["sliding_window"] = None
    if architecture == "Qwen2ForCausalLM":
        out["use_sliding_window"] = False
    return out


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""Any of these makes a directory an HF tokenizer directory."""


def tokenizer_section(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model_config.yaml`` tokenizer section naming the HF tokenizer in ``directory``
    (empty when the directory has no tokenizer files)."""
    directory = os.path.abspath(directory)
    if any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_MARKERS):
        return {"library": "huggingface", "type": directory}
    return {}


def hf_tokenizer_dir(section: dict[str, Any]) -> str | None:
    """The local HF tokenizer directory a ``model_config.yaml`` tokenizer section names
    (``library: huggingface`` with a ``path`` or ``type`` that is a directory), else ``None``."""
    library = str(section.get("library") or "").lower()
    path = section.get("path") or section.get("type")
    if library in ("huggingface", "hf") and path and os.path.isdir(str(path)):
        return str(path)
    return None
