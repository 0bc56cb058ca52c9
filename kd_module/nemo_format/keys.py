"""NeMo ``model_config.yaml`` keys and how each maps to megatron-core's names: the tables the
reader and the writer share (:data:`CONVERSION_TABLE`, :data:`TRAINING_ONLY_KEYS`,
:data:`PARALLELISM_KEYS`), and the README's table generated from them
(:func:`conversion_table_markdown`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from kd_module.models.gpt import GPTModelConfig

MODEL_CONFIG_FILE = "model_config.yaml"
"""Name of the teacher config at the root of a teacher checkpoint (Megatron-LM and NeMo 1)."""


NEMO2_MODEL_CONFIG_FILE = os.path.join("context", "model.yaml")
"""Where a NeMo 2 checkpoint keeps its model config."""


# NeMo 2 serializes activation functions as ``{_target_: torch.nn.functional.silu}``; the last
# dotted component names the function.
NEMO2_ACTIVATION_FUNCS = {
    "gelu": "gelu",
    "openai_gelu": "fast-gelu",
    "fast_gelu": "fast-gelu",
    "quick_gelu": None,
    "silu": "swiglu",
    "relu": "relu",
    "squared_relu": "squared-relu",
}


NORMALIZATIONS = {
    "layernorm": ("LayerNorm", False),
    "layernorm1p": ("LayerNorm", True),
    "rmsnorm": ("RMSNorm", False),
}
"""NeMo normalization name (case-insensitive) -> (megatron normalization, zero-centered gamma)."""


GATED = {"gelu": "geglu", "swiglu": "swiglu", "fast-swiglu": "fast-swiglu", "geglu": "geglu"}


UNGATED = {"geglu": "gelu", "swiglu": None, "fast-swiglu": None}


PARALLELISM_KEYS = frozenset(
    {
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size",
        "context_parallel_size",
        "sequence_parallel",
        "expert_model_parallel_size",
        "expert_tensor_parallel_size",
        "pipeline_model_parallel_split_rank",
        "encoder_tensor_model_parallel_size",
        "encoder_pipeline_model_parallel_size",
        "num_layers_in_first_pipeline_stage",
        "num_layers_in_last_pipeline_stage",
        "account_for_embedding_in_pipeline_split",
        "account_for_loss_in_pipeline_split",
        "pipeline_model_parallel_layout",
        "pipeline_model_parallel_comm_backend",
        "hierarchical_context_parallel_sizes",
        "cp_comm_type",
        "moe_extended_tp",
        "microbatch_group_size_per_vp_stage",
        "data_parallel_size",
    }
)
"""Keys of the parallel layout: the teacher always uses the student's, so these are ignored."""


TRAINING_ONLY_KEYS = frozenset(
    {
        # NeMo 1 sections and bookkeeping
        "name",
        "target",
        "nemo_version",
        "trainer",
        "exp_manager",
        "optim",
        "data",
        "peft",
        "nsys_profile",
        "restore_from_path",
        "restore_from_ckpt",
        "resume_from_checkpoint",
        "kd_teacher_restore_from_path",
        "nemo_path",
        "save_nemo_on_validation_end",
        "skip_train",
        "seed",
        "inference",
        "answer_only_loss",
        "ub_tp_comm_overlap",
        "ub_tp_comm_overlap_cfg",
        # batch sizes and schedule
        "micro_batch_size",
        "global_batch_size",
        "rampup_batch_size",
        "reset_lr",
        "reset_lr_steps",
        "gc_interval",
        # initialization (the teacher's weights are loaded, not initialized)
        "use_scaled_init_method",
        "use_cpu_initialization",
        "perform_initialization",
        "init_model_with_meta_device",
        "init_method",
        "output_layer_init_method",
        "embedding_init_method",
        "embedding_init_method_std",
        # training-time regularization and loss options
        "ffn_dropout",
        "do_layer_norm_weight_decay",
        "fp16_lm_cross_entropy",
        "calculate_per_token_loss",
        "drop_layers",
        # mixed precision and optimizer machinery
        "native_amp_init_scale",
        "native_amp_growth_interval",
        "hysteresis",
        "megatron_amp_O2",
        "grad_allreduce_chunk_size_mb",
        "grad_div_ar_fusion",
        "gradient_as_bucket_view",
        "gradient_accumulation_fusion",
        "autocast_dtype",
        "enable_autocast",
        "pipeline_dtype",
        # kernels and fusions (chosen by the runtime, not the architecture)
        "mcore_customization_config",
        "transformer_engine",
        "use_flash_attention",
        "use_emha",
        "attention_backend",
        "persist_layer_norm",
        "memory_efficient_layer_norm",
        "bias_activation_fusion",
        "bias_dropout_add_fusion",
        "bias_dropout_fusion",
        "apply_rope_fusion",
        "cross_entropy_loss_fusion",
        "cross_entropy_fusion_impl",
        "get_attention_mask_from_fusion",
        "fp8",
        "fp8_e4m3",
        "fp8_hybrid",
        "fp8_margin",
        "fp8_interval",
        "fp8_amax_history_len",
        "fp8_amax_compute_algo",
        "fp8_recipe",
        "fp8_param",
        "fp8_wgrad",
        "fp8_dot_product_attention",
        "fp8_multi_head_attention",
        "reduce_amax",
        "tp_only_amax_red",
        "first_last_layers_bf16",
        "num_layers_at_start_in_bf16",
        "num_layers_at_end_in_bf16",
        "onnx_safe",
        "apex_transformer_log_level",
        "deterministic_mode",
        "enable_cuda_graph",
        "external_cuda_graph",
        "cuda_graph_impl",
        "cuda_graph_scope",
        "use_te_rng_tracker",
        "use_transformer_engine_full_layer_spec",
        "use_transformer_engine_op_fuser",
        "use_te_activation_func",
        "disable_parameter_transpose_cache",
        "clone_scatter_output_in_embedding",
        # activation recomputation and offloading
        "activations_checkpoint_granularity",
        "activations_checkpoint_method",
        "activations_checkpoint_num_layers",
        "num_micro_batches_with_partial_activation_checkpoints",
        "num_microbatches_with_partial_activation_checkpoints",
        "activations_checkpoint_layers_per_pipeline",
        "recompute_granularity",
        "recompute_method",
        "recompute_num_layers",
        "recompute_modules",
        "distribute_saved_activations",
        "cpu_offloading",
        "cpu_offloading_num_layers",
        "cpu_offloading_activations",
        "cpu_offloading_weights",
        "cpu_offloading_double_buffering",
        # communication
        "overlap_p2p_comm",
        "batch_p2p_comm",
        "batch_p2p_sync",
        "use_ring_exchange_p2p",
        "sync_batch_comm",
        "deallocate_pipeline_outputs",
        "defer_embedding_wgrad_compute",
        "wgrad_deferral_limit",
        "variable_seq_lengths",
        "async_tensor_model_parallel_allreduce",
        "tp_comm_overlap",
        "tp_comm_overlap_cfg",
        "tp_comm_bulk_wgrad",
        "tp_comm_bulk_dgrad",
        "tp_comm_overlap_ag",
        "tp_comm_overlap_rs",
        "tp_comm_overlap_rs_dgrad",
        "tp_comm_split_ag",
        "tp_comm_atomic_ag",
        "tp_comm_split_rs",
        "tp_comm_atomic_rs",
        "tp_comm_bootstrap_backend",
        "nccl_communicator_config_path",
        "sharp",
        "validation_param_sync_overlap",
        "barrier_with_L1_time",
        # checkpoint I/O
        "dist_ckpt_format",
        "dist_ckpt_load_on_device",
        "dist_ckpt_parallel_save",
        "dist_ckpt_parallel_save_within_dp",
        "dist_ckpt_parallel_load",
        "dist_ckpt_torch_dist_multiproc",
        "dist_ckpt_assume_constant_structure",
        "dist_ckpt_parallel_dist_opt",
        "dist_ckpt_load_strictness",
        "fsdp",
        "fsdp_sharding_strategy",
        "fsdp_grad_reduce_dtype",
        "fsdp_sharded_checkpoint",
        # per-stage flags set by the builder, and logging
        "pre_process",
        "post_process",
        "enable_megatron_timers",
        "megatron_timer_kwargs",
        "timers",
        "config_logger_dir",
        "test_mode",
        # NeMo 2 (fiddle) serialization and callables
        "_target_",
        "_partial_",
        "_call_",
        "transformer_layer_spec",
        "forward_step_fn",
        "data_step_fn",
        "generation_config",
        "finalize_model_grads_func",
        "grad_scale_func",
        "no_sync_func",
        "grad_sync_func",
        "param_sync_func",
        "model_transform",
    }
)
"""Keys that configure training, kernels or checkpoint I/O but not the teacher's function."""


# Architecture switches megatron-core's GPTModel implements at one value only: any other value
# would load weights into the wrong computation, so it is refused.
FIXED_KEYS: dict[str, tuple[Any, str]] = {
    "mcore_gpt": (True, "only megatron-core models can be teachers"),
    "headscale": (False, "head scaling is not in megatron-core's GPT"),
    "transformer_block_type": ("pre_ln", "megatron-core's GPT is pre-LayerNorm"),
    "normalize_attention_scores": (True, "megatron-core always scales by 1/sqrt(head dim)"),
    "attention_type": ("multihead", "megatron-core's GPT is decoder self-attention"),
    "multi_latent_attention": (False, "multi-latent attention teachers are not supported"),
    "num_moe_experts": (None, "mixture-of-experts teachers are not supported"),
    "seq_len_interpolation_factor": (None, "RoPE interpolation is not supported"),
    "apply_residual_connection_post_layernorm": (False, "megatron-core's GPT is pre-LayerNorm"),
}


# megatron TransformerConfig fields outside GPTModelConfig that change the computation; they
# go to ``GPTModelConfig.extra``.
EXTRA_KEYS = ("rotary_interleaved", "fp32_residual_connection", "attention_softmax_in_fp32")


# RoPE scaling (Llama 3.1): a GPTModel argument that GPTModelConfig does not carry yet.
ROPE_SCALING_KEYS = ("scale_positional_embedding", "use_rope_scaling", "rope_scaling")


ROPE_SCALING_PARAMETERS = (
    "scale_factor",
    "low_freq_factor",
    "high_freq_factor",
    "old_context_len",
)


PRECISION_KEYS = ("precision", "bf16", "fp16", "params_dtype")


ACTIVATION_KEYS = ("activation", "openai_gelu", "activation_func", "gated_linear_unit")


NORMALIZATION_KEYS = ("normalization",)


# NeMo name -> GPTModelConfig field, for keys whose value needs no conversion beyond the type.
RENAMES = {
    "encoder_seq_length": "seq_length",
    "bias": "add_bias_linear",
    "qkv_bias": "add_qkv_bias",
    "rotary_percentage": "rotary_percent",
}


INT_FIELDS = {
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "seq_length",
    "make_vocab_size_divisible_by",
    "rotary_base",
}


OPTIONAL_INT_FIELDS = {
    "ffn_hidden_size",
    "num_query_groups",
    "kv_channels",
    "max_position_embeddings",
    "vocab_size",
}


FLOAT_FIELDS = {
    "layernorm_epsilon",
    "rotary_percent",
    "init_method_std",
    "hidden_dropout",
    "attention_dropout",
}


BOOL_FIELDS = {
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "share_embeddings_and_output_weights",
    "apply_query_key_layer_scaling",
    "masked_softmax_fusion",
    "layernorm_zero_centered_gamma",
}


GPT_FIELDS = tuple(f.name for f in dataclasses.fields(GPTModelConfig))


CONVERSION_TABLE: list[tuple[str, str, str]] = [
    ("encoder_seq_length", "seq_length", "NeMo 1 name; `seq_length` (NeMo 2) is read as is"),
    ("max_position_embeddings", "max_position_embeddings", ""),
    ("num_layers", "num_layers", ""),
    ("hidden_size", "hidden_size", ""),
    ("ffn_hidden_size", "ffn_hidden_size", "`null`: 4 x hidden_size"),
    ("num_attention_heads", "num_attention_heads", ""),
    ("num_query_groups", "num_query_groups", "`null`: one group per head (no GQA)"),
    (
        "kv_channels",
        "kv_channels",
        "`null`: hidden_size / num_attention_heads; never inherited from the student",
    ),
    ("bias", "add_bias_linear", "`add_bias_linear` (NeMo 2) is read as is"),
    ("qkv_bias", "add_qkv_bias", ""),
    (
        "activation",
        "activation",
        "gelu, fast-gelu, swiglu, fast-swiglu, geglu, squared-relu, relu",
    ),
    ("openai_gelu", "activation", "`true` with `activation: gelu` gives fast-gelu"),
    (
        "activation_func + gated_linear_unit",
        "activation",
        "NeMo 2: silu + gated -> swiglu, gelu + gated -> geglu, squared_relu -> squared-relu",
    ),
    (
        "normalization",
        "normalization, layernorm_zero_centered_gamma",
        "layernorm -> LayerNorm; layernorm1p -> LayerNorm with zero-centered gamma; "
        "rmsnorm -> RMSNorm (case-insensitive)",
    ),
    ("layernorm_epsilon", "layernorm_epsilon", "`1e-5` written without a dot is accepted"),
    ("position_embedding_type", "position_embedding_type", "learned_absolute, rope, none"),
    ("rotary_percentage", "rotary_percent", "`rotary_percent` (NeMo 2) is read as is"),
    ("rotary_base", "rotary_base", ""),
    ("share_embeddings_and_output_weights", "share_embeddings_and_output_weights", ""),
    ("init_method_std", "init_method_std", ""),
    ("hidden_dropout", "hidden_dropout", ""),
    ("attention_dropout", "attention_dropout", ""),
    ("apply_query_key_layer_scaling", "apply_query_key_layer_scaling", ""),
    ("masked_softmax_fusion", "masked_softmax_fusion", "used on CUDA only"),
    ("make_vocab_size_divisible_by", "make_vocab_size_divisible_by", ""),
    ("qk_layernorm", "qk_layernorm", ""),
    (
        "rotary_interleaved, fp32_residual_connection, attention_softmax_in_fp32",
        "extra",
        "megatron TransformerConfig fields",
    ),
    (
        "scale_positional_embedding, scale_factor (Llama 3.1 RoPE scaling)",
        "rope_scaling, rope_scaling_factor",
        "megatron GPTModel's rope_scaling",
    ),
    (
        "precision",
        "(precision)",
        "16 / 16-mixed / fp16 -> float16; bf16 / bf16-mixed -> bfloat16; 32 / fp32 -> float32; "
        "NeMo 2 `bf16`, `fp16`, `params_dtype` too",
    ),
    ("tokenizer.*", "(tokenizer)", "returned as a dict (library, type, model, vocab_file, ...)"),
    (
        "mcore_gpt, headscale, transformer_block_type, normalize_attention_scores, "
        "attention_type, multi_latent_attention, num_moe_experts, seq_len_interpolation_factor",
        "-",
        "accepted only at megatron-core GPT's value (true, false, pre_ln, true, multihead, "
        "false, null, null)",
    ),
    ("any other GPTModelConfig field", "same name", "passed through"),
    ("parallelism keys", "-", "ignored with one warning: the teacher uses the student's layout"),
    ("training-only keys", "-", "ignored, listed in one log line"),
]
"""(NeMo key, GPTModelConfig field, note) for every key the conversion understands."""


def conversion_table_markdown() -> str:
    """:data:`CONVERSION_TABLE` as a markdown table (for the README)."""
    lines = ["| NeMo key | megatron `GPTModelConfig` field | Notes |", "|---|---|---|"]
    for nemo_key, megatron_key, note in CONVERSION_TABLE:
        lines.append(f"| `{nemo_key}` | `{megatron_key}` | {note} |")
    return "\n".join(lines)


def known_keys() -> list[str]:
    return sorted(
        set(GPT_FIELDS)
        | set(RENAMES)
        | set(FIXED_KEYS)
        | set(EXTRA_KEYS)
        | set(PRECISION_KEYS)
        | set(ACTIVATION_KEYS)
        | set(ROPE_SCALING_KEYS)
        | {"tokenizer", "position_embedding_type"}
        | PARALLELISM_KEYS
        | TRAINING_ONLY_KEYS
    )
