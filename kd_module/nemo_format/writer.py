"""Writing a model's ``model_config.yaml`` in NeMo's names (:func:`to_nemo_model_config`), so a
distilled student can be the next round's teacher."""

from __future__ import annotations

from typing import Any

import yaml

from kd_module.models.gpt import GPTModelConfig
from kd_module.training.precision import lightning_precision


def to_nemo_model_config(
    model: GPTModelConfig,
    precision: str | None = None,
    tokenizer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The NeMo-style model config of an architecture (to make a student the next teacher).

    :func:`convert_nemo_model_config` reads the result back to an equal ``GPTModelConfig``
    whatever the student it is applied to.

    Args:
        model: the architecture to describe.
        precision: torch dtype name (``bfloat16``, ``float16``, ``float32``) or a NeMo
            precision string; written as NeMo's ``precision`` key.
        tokenizer: the tokenizer section to write.

    Returns:
        A mapping ready for ``yaml.safe_dump`` into ``model_config.yaml``.
    """
    normalization = model.normalization.lower()
    if model.normalization == "LayerNorm" and model.layernorm_zero_centered_gamma:
        normalization = "layernorm1p"
    out: dict[str, Any] = {
        "mcore_gpt": True,
        "encoder_seq_length": model.seq_length,
        "max_position_embeddings": model.max_position_embeddings,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups,
        "kv_channels": model.kv_channels,
        "bias": model.add_bias_linear,
        "qkv_bias": model.add_qkv_bias,
        "activation": model.activation,
        "normalization": normalization,
        "layernorm_zero_centered_gamma": model.layernorm_zero_centered_gamma,
        "layernorm_epsilon": model.layernorm_epsilon,
        "qk_layernorm": model.qk_layernorm,
        "position_embedding_type": model.position_embedding_type,
        "rotary_percentage": model.rotary_percent,
        "rotary_base": model.rotary_base,
        "share_embeddings_and_output_weights": model.share_embeddings_and_output_weights,
        "init_method_std": model.init_method_std,
        "hidden_dropout": model.hidden_dropout,
        "attention_dropout": model.attention_dropout,
        "apply_query_key_layer_scaling": model.apply_query_key_layer_scaling,
        "masked_softmax_fusion": model.masked_softmax_fusion,
        "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
        "vocab_size": model.vocab_size,
        "transformer_impl": model.transformer_impl,
        "model_type": model.model_type,
        "hybrid_override_pattern": model.hybrid_override_pattern,
        "extra": dict(model.extra),
    }
    if model.rope_scaling:
        out["scale_positional_embedding"] = True
        out["scale_factor"] = model.rope_scaling_factor
    if precision is not None:
        out["precision"] = lightning_precision(precision)
    if tokenizer is not None:
        out["tokenizer"] = dict(tokenizer)
    return out


def yaml_repr(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
