"""The teacher's architecture from a NeMo-style ``model_config.yaml``.

As in Megatron-LM's distillation, the student's :class:`~kd_module.models.gpt.GPTModelConfig` is the
starting point and the file's values override it; the result builds the teacher. The file may be

- the model section of a NeMo checkpoint (architecture keys at the top level),
- a NeMo 1 training config, with the model section under a top-level ``model:`` key,
- a NeMo 2 ``context/model.yaml`` (``_target_`` plus a ``config:`` section), or
- a flat file of megatron names (``GPTModelConfig`` fields).

NeMo names that differ from megatron's are converted (:data:`CONVERSION_TABLE`). Precision and
the tokenizer section are returned beside the model config. Training-only keys
(:data:`TRAINING_ONLY_KEYS`) are ignored and listed in one log line; parallelism keys
(:data:`PARALLELISM_KEYS`) are ignored with one warning, because the teacher always runs in the
student's parallel layout. Any other key is an error, so a typo cannot silently leave the
teacher with the student's value.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

import yaml

from kd_module.models.gpt import ACTIVATIONS, POSITION_EMBEDDINGS, GPTModelConfig
from kd_module.rules import close_matches
from kd_module.training.precision import ALIASES, dtype_name_of, lightning_precision
from kd_module.yaml_files import parse_yaml, read_yaml

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.yaml"
"""Name of the teacher config at the root of a teacher checkpoint (Megatron-LM and NeMo 1)."""
NEMO2_MODEL_CONFIG_FILE = os.path.join("context", "model.yaml")
"""Where a NeMo 2 checkpoint keeps its model config."""

NORMALIZATIONS = {
    "layernorm": ("LayerNorm", False),
    "layernorm1p": ("LayerNorm", True),
    "rmsnorm": ("RMSNorm", False),
}
"""NeMo normalization name (case-insensitive) -> (megatron normalization, zero-centered gamma)."""


# NeMo 2 serializes activation functions as ``{_target_: torch.nn.functional.silu}``; the last
# dotted component names the function.
_NEMO2_ACTIVATION_FUNCS = {
    "gelu": "gelu",
    "openai_gelu": "fast-gelu",
    "fast_gelu": "fast-gelu",
    "quick_gelu": None,
    "silu": "swiglu",
    "relu": "relu",
    "squared_relu": "squared-relu",
}
_GATED = {"gelu": "geglu", "swiglu": "swiglu", "fast-swiglu": "fast-swiglu", "geglu": "geglu"}
_UNGATED = {"geglu": "gelu", "swiglu": None, "fast-swiglu": None}

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
_FIXED_KEYS: dict[str, tuple[Any, str]] = {
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
_EXTRA_KEYS = ("rotary_interleaved", "fp32_residual_connection", "attention_softmax_in_fp32")

# RoPE scaling (Llama 3.1): a GPTModel argument that GPTModelConfig does not carry yet.
_ROPE_SCALING_KEYS = ("scale_positional_embedding", "use_rope_scaling", "rope_scaling")
_ROPE_SCALING_PARAMETERS = (
    "scale_factor",
    "low_freq_factor",
    "high_freq_factor",
    "old_context_len",
)

_PRECISION_KEYS = ("precision", "bf16", "fp16", "params_dtype")
_ACTIVATION_KEYS = ("activation", "openai_gelu", "activation_func", "gated_linear_unit")
_NORMALIZATION_KEYS = ("normalization",)

# NeMo name -> GPTModelConfig field, for keys whose value needs no conversion beyond the type.
_RENAMES = {
    "encoder_seq_length": "seq_length",
    "bias": "add_bias_linear",
    "qkv_bias": "add_qkv_bias",
    "rotary_percentage": "rotary_percent",
}

_INT_FIELDS = {
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "seq_length",
    "make_vocab_size_divisible_by",
    "rotary_base",
}
_OPTIONAL_INT_FIELDS = {
    "ffn_hidden_size",
    "num_query_groups",
    "kv_channels",
    "max_position_embeddings",
    "vocab_size",
}
_FLOAT_FIELDS = {
    "layernorm_epsilon",
    "rotary_percent",
    "init_method_std",
    "hidden_dropout",
    "attention_dropout",
}
_BOOL_FIELDS = {
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "share_embeddings_and_output_weights",
    "apply_query_key_layer_scaling",
    "masked_softmax_fusion",
    "layernorm_zero_centered_gamma",
}

_GPT_FIELDS = tuple(f.name for f in dataclasses.fields(GPTModelConfig))

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


@dataclass
class TeacherModelConfig:
    """The teacher's architecture and what the config file says beside it."""

    model: GPTModelConfig
    """Architecture that builds the teacher (the student's, overridden by the file)."""
    precision: str | None = None
    """torch dtype name of the teacher's weights (``bfloat16``, ``float16``, ``float32``), or
    ``None`` when the file does not say."""
    tokenizer: dict[str, Any] = field(default_factory=dict)
    """The file's ``tokenizer`` section (``library``, ``type``, ``model``, ``vocab_file`` ...)."""
    source: str | None = None
    """The file read, or ``None`` when the student's architecture was reused."""
    ignored_keys: list[str] = field(default_factory=list)
    """Training-only and parallelism keys of the file that were ignored, in file order."""


def convert_nemo_model_config(
    data: dict[str, Any], student: GPTModelConfig, source: str = "<dict>"
) -> TeacherModelConfig:
    """Override the student's architecture with a NeMo-style model config.

    Args:
        data: the parsed YAML: a model section, or one wrapped under ``model:`` (NeMo 1
            training config) or ``config:`` (NeMo 2).
        student: the student's architecture; keys the file does not set keep its values, except
            ``kv_channels`` which is recomputed for the teacher unless the file sets it.
        source: where ``data`` came from, named in messages.

    Returns:
        The teacher's architecture, precision and tokenizer section.

    Raises:
        ValueError: listing every unknown key (with a did-you-mean) and every bad value, with
            the file, the key, the value and what is allowed.

    Examples:
        >>> student = GPTModelConfig(num_layers=2)
        >>> convert_nemo_model_config({"num_layers": 4, "bias": False}, student).model.num_layers
        4
    """
    prefix = f"teacher model config {source}: "
    if not isinstance(data, dict):
        raise ValueError(
            prefix + f"the top level must be a mapping of keys to values, got {type(data).__name__}"
        )
    section, tokenizer, trainer_precision = _model_section(data)

    changes: dict[str, Any] = {}
    extra = dict(student.extra)
    problems: list[str] = []
    training_keys: list[str] = []
    parallel_keys: list[str] = []
    activation_keys: dict[str, Any] = {}
    precision_keys: dict[str, Any] = {}
    rope_scaling: dict[str, Any] = {}

    for key, raw in section.items():
        value, problem = _resolve_interpolation(key, raw, section)
        if problem:
            problems.append(problem)
            continue
        if key in PARALLELISM_KEYS:
            parallel_keys.append(key)
        elif key in TRAINING_ONLY_KEYS:
            training_keys.append(key)
        elif key == "tokenizer":
            if value is not None and not isinstance(value, dict):
                problems.append(f"tokenizer={value!r} must be a mapping")
            else:
                tokenizer = dict(value or {})
        elif key in _PRECISION_KEYS:
            precision_keys[key] = value
        elif key in _ACTIVATION_KEYS:
            activation_keys[key] = value
        elif key in _NORMALIZATION_KEYS:
            _convert_normalization(value, changes, problems)
        elif key in _FIXED_KEYS:
            allowed, reason = _FIXED_KEYS[key]
            if value != allowed:
                problems.append(
                    f"{key}={value!r} is not supported ({reason}); allowed: {_yaml_repr(allowed)}"
                )
        elif key in _ROPE_SCALING_KEYS or key in _ROPE_SCALING_PARAMETERS:
            rope_scaling[key] = value
        elif key in _EXTRA_KEYS:
            if not isinstance(value, bool):
                problems.append(f"{key}={value!r} must be true or false")
            else:
                extra[key] = value
        elif key == "position_embedding_type":
            if value not in POSITION_EMBEDDINGS:
                problems.append(
                    f"position_embedding_type={value!r} is not one of "
                    f"{', '.join(POSITION_EMBEDDINGS)}" + close_matches(value, POSITION_EMBEDDINGS)
                )
            else:
                changes["position_embedding_type"] = value
        elif key == "extra":
            if not isinstance(value, dict):
                problems.append(f"extra={value!r} must be a mapping of TransformerConfig fields")
            else:
                extra.update(value)
        elif key in _RENAMES or key in _GPT_FIELDS:
            target = _RENAMES.get(key, key)
            converted, problem = _convert_value(key, target, value)
            if problem:
                problems.append(problem)
            else:
                changes[target] = converted
        else:
            problems.append(f"unknown key {key!r}" + close_matches(key, _known_keys(), n=1))

    if activation_keys:
        activation, problem = _convert_activation(activation_keys, student.activation)
        if problem:
            problems.append(problem)
        else:
            changes["activation"] = activation
    if trainer_precision is not None and not any(
        precision_keys.get(key) is not None for key in _PRECISION_KEYS
    ):
        precision_keys["precision"] = trainer_precision
    precision, problem = _convert_precision(precision_keys)
    if problem:
        problems.append(problem)
    problems += _apply_rope_scaling(rope_scaling, changes, source)
    if problems:
        raise ValueError(prefix + "; ".join(problems))

    # Megatron-LM drops the student's kv_channels whenever a teacher config is given: a head
    # width copied from a different architecture is almost never right.
    changes.setdefault("kv_channels", None)
    changes["extra"] = extra
    try:
        model = student.replace(**changes)
    except ValueError as error:
        raise ValueError(prefix + f"the teacher architecture is invalid: {error}") from None

    if training_keys:
        logger.info(
            "%signored %d training-only keys: %s",
            prefix,
            len(training_keys),
            ", ".join(training_keys),
        )
    if parallel_keys:
        logger.warning(
            "%signored parallelism keys %s; the teacher uses the student's parallel layout",
            prefix,
            ", ".join(f"{key}={section[key]!r}" for key in parallel_keys),
        )
    return TeacherModelConfig(
        model=model,
        precision=precision,
        tokenizer=tokenizer,
        source=source,
        ignored_keys=[key for key in section if key in training_keys or key in parallel_keys],
    )


def load_teacher_model_config(
    path: str | os.PathLike[str] | None,
    student: GPTModelConfig,
    teacher_checkpoint: str | os.PathLike[str] | None = None,
) -> TeacherModelConfig:
    """Find, read and convert the teacher's model config.

    The file is ``path`` when given; otherwise ``model_config.yaml`` at the root of the teacher
    checkpoint (a directory, or a NeMo 1 ``.nemo`` archive), or a NeMo 2 checkpoint's
    ``context/model.yaml``; otherwise the teacher reuses the student's architecture, which is
    logged (right for self-distillation and quantization-aware distillation).

    Args:
        path: explicit config file (Megatron-LM's ``--export-kd-teacher-model-config``).
        student: the student's architecture, overridden by the file.
        teacher_checkpoint: the teacher checkpoint directory or ``.nemo`` file.

    Returns:
        The teacher's architecture, precision and tokenizer section.

    Raises:
        FileNotFoundError: when ``path`` is given and does not exist.
        ValueError: when the file does not parse or a key or value is wrong.

    Examples:
        In YAML (recipe): ``teacher_model_config: /ckpt/llama31_8b/model_config.yaml``.

        In Python::

            teacher = load_teacher_model_config(None, student, teacher_checkpoint="/ckpt/8b")
            model = build_model(teacher.model, layout)
    """
    if path is not None:
        path = os.fspath(path)
        return convert_nemo_model_config(_read_yaml(path), student, source=path)
    if teacher_checkpoint is not None:
        checkpoint = os.fspath(teacher_checkpoint)
        if os.path.isfile(checkpoint) and tarfile.is_tarfile(checkpoint):
            data = _read_from_nemo_archive(checkpoint)
            if data is not None:
                source = f"{checkpoint}:{MODEL_CONFIG_FILE}"
                return convert_nemo_model_config(data, student, source=source)
        for name in (MODEL_CONFIG_FILE, NEMO2_MODEL_CONFIG_FILE):
            candidate = os.path.join(checkpoint, name)
            if os.path.isfile(candidate):
                return convert_nemo_model_config(_read_yaml(candidate), student, source=candidate)
    where = (
        f" and none found in {os.fspath(teacher_checkpoint)}"
        if teacher_checkpoint is not None
        else ""
    )
    logger.warning(
        "teacher model config: no file given%s; the teacher reuses the student's architecture",
        where,
    )
    return TeacherModelConfig(model=student)


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


def conversion_table_markdown() -> str:
    """:data:`CONVERSION_TABLE` as a markdown table (for the README)."""
    lines = ["| NeMo key | megatron `GPTModelConfig` field | Notes |", "|---|---|---|"]
    for nemo_key, megatron_key, note in CONVERSION_TABLE:
        lines.append(f"| `{nemo_key}` | `{megatron_key}` | {note} |")
    return "\n".join(lines)


def _known_keys() -> list[str]:
    return sorted(
        set(_GPT_FIELDS)
        | set(_RENAMES)
        | set(_FIXED_KEYS)
        | set(_EXTRA_KEYS)
        | set(_PRECISION_KEYS)
        | set(_ACTIVATION_KEYS)
        | set(_ROPE_SCALING_KEYS)
        | {"tokenizer", "position_embedding_type"}
        | PARALLELISM_KEYS
        | TRAINING_ONLY_KEYS
    )


def _model_section(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The architecture mapping of a file, a tokenizer found beside it (NeMo 2), and the
    trainer's precision of a NeMo 1 training config (used when the model section has none)."""
    if isinstance(data.get("model"), dict):
        trainer = data.get("trainer")
        precision = trainer.get("precision") if isinstance(trainer, dict) else None
        return data["model"], {}, precision
    if isinstance(data.get("config"), dict) and "_target_" in data:
        tokenizer = data.get("tokenizer")
        return data["config"], dict(tokenizer) if isinstance(tokenizer, dict) else {}, None
    return data, {}, None


_INTERPOLATION = re.compile(r"^\$\{(?:model\.|\.)?([A-Za-z_][A-Za-z0-9_]*)\}$")


def _resolve_interpolation(key: str, value: Any, section: dict[str, Any]) -> tuple[Any, str]:
    """Resolve NeMo's ``${.other_key}`` / ``${model.other_key}``; other forms are refused."""
    if not isinstance(value, str) or "${" not in value:
        return value, ""
    match = _INTERPOLATION.match(value)
    if key in TRAINING_ONLY_KEYS or key in PARALLELISM_KEYS:
        return value, ""
    if match and match.group(1) in section and match.group(1) != key:
        target = section[match.group(1)]
        if not (isinstance(target, str) and "${" in target):
            return target, ""
    return value, f"{key}={value!r}: only ${{.key}} interpolations of this section are resolved"


def _coerce_number(value: Any, kind: type) -> Any:
    """``value`` as an int or float, accepting YAML 1.1's ``1e-5`` strings; None if impossible."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) else None
    return float(value) if isinstance(value, (int, float)) else None


def _convert_value(key: str, target: str, value: Any) -> tuple[Any, str]:
    """Type-check one pass-through or renamed value; returns (value, problem)."""
    shown = key if key == target else f"{key} (-> {target})"
    if target in _INT_FIELDS or (target in _OPTIONAL_INT_FIELDS and value is not None):
        number = _coerce_number(value, int)
        if number is None or number <= 0:
            nullable = " or null" if target in _OPTIONAL_INT_FIELDS else ""
            return None, f"{shown}={value!r} must be a positive integer{nullable}"
        return number, ""
    if target in _FLOAT_FIELDS:
        number = _coerce_number(value, float)
        if number is None or number < 0:
            return None, f"{shown}={value!r} must be a non-negative number"
        return number, ""
    if target in _BOOL_FIELDS:
        if not isinstance(value, bool):
            return None, f"{shown}={value!r} must be true or false"
        return value, ""
    return value, ""


def _convert_normalization(value: Any, changes: dict[str, Any], problems: list[str]) -> None:
    name = value.lower() if isinstance(value, str) else value
    if name not in NORMALIZATIONS:
        allowed = list(NORMALIZATIONS)
        problems.append(
            f"normalization={value!r} is not one of {', '.join(allowed)}"
            + close_matches(name, allowed)
        )
        return
    changes["normalization"], changes["layernorm_zero_centered_gamma"] = NORMALIZATIONS[name]


def _nemo2_function_name(value: Any) -> Any:
    """``torch.nn.functional.silu`` or ``{_target_: torch.nn.functional.silu}`` -> ``silu``."""
    if isinstance(value, dict):
        value = value.get("_target_")
    if isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return value


def _convert_activation(keys: dict[str, Any], student_activation: str) -> tuple[str | None, str]:
    """Resolve NeMo 1 ``activation``/``openai_gelu`` and NeMo 2 ``activation_func``/``gated_*``."""
    allowed = ", ".join(ACTIVATIONS)
    activation = keys.get("activation")
    if activation is not None:
        if activation not in ACTIVATIONS:
            return None, (
                f"activation={activation!r} is not one of {allowed}"
                + close_matches(activation, ACTIVATIONS)
            )
    elif "activation_func" in keys:
        func = _nemo2_function_name(keys["activation_func"])
        activation = _NEMO2_ACTIVATION_FUNCS.get(func)
        if activation is None:
            supported = [k for k, v in _NEMO2_ACTIVATION_FUNCS.items() if v]
            return None, (
                f"activation_func={keys['activation_func']!r} is not one of "
                f"{', '.join(supported)}" + close_matches(func, supported)
            )
        if activation == "swiglu" and keys.get("gated_linear_unit") is False:
            return None, (
                "activation_func=silu with gated_linear_unit=false (plain SiLU) is not "
                f"supported; allowed activations: {allowed}"
            )
    else:
        activation = student_activation

    openai_gelu = keys.get("openai_gelu", False)
    if not isinstance(openai_gelu, bool):
        return None, f"openai_gelu={openai_gelu!r} must be true or false"
    if openai_gelu and activation == "gelu":
        activation = "fast-gelu"

    gated = keys.get("gated_linear_unit")
    if gated is None:
        return activation, ""
    if not isinstance(gated, bool):
        return None, f"gated_linear_unit={gated!r} must be true or false"
    if gated and not activation.endswith("glu"):
        if activation not in _GATED:
            return None, (
                f"gated_linear_unit=true with activation {activation!r}: no gated form; "
                "allowed gated activations: swiglu, fast-swiglu, geglu"
            )
        activation = _GATED[activation]
    if not gated and activation.endswith("glu"):
        ungated = _UNGATED.get(activation)
        if ungated is None:
            return None, (
                f"gated_linear_unit=false with activation {activation!r}: "
                f"allowed activations: {allowed}"
            )
        activation = ungated
    return activation, ""


def _convert_precision(keys: dict[str, Any]) -> tuple[str | None, str]:
    """NeMo ``precision`` (or NeMo 2 ``bf16``/``fp16``/``params_dtype``) -> torch dtype name."""
    if "precision" in keys and keys["precision"] is not None:
        value = keys["precision"]
        name = dtype_name_of(value)
        if name is None:
            return None, (
                f"precision={value!r} is not one of {', '.join(ALIASES)}"
                + close_matches(str(value), ALIASES)
            )
        return name, ""
    for key, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        value = keys.get(key)
        if value is not None and not isinstance(value, bool):
            return None, f"{key}={value!r} must be true or false"
        if value:
            return name, ""
    if keys.get("params_dtype") is not None:
        value = keys["params_dtype"]
        short = _nemo2_function_name(value)
        name = dtype_name_of(short)
        if name is None:
            return None, (
                f"params_dtype={value!r} is not one of torch.bfloat16, torch.float16, torch.float32"
            )
        return name, ""
    return None, ""


def _apply_rope_scaling(keys: dict[str, Any], changes: dict[str, Any], source: str) -> list[str]:
    """Llama 3.1 RoPE scaling: set it when GPTModelConfig can carry it, warn otherwise."""
    enabled = any(keys.get(key) for key in _ROPE_SCALING_KEYS) or any(
        keys.get(key) is not None for key in _ROPE_SCALING_PARAMETERS
    )
    for key in _ROPE_SCALING_KEYS:
        if key in keys and not isinstance(keys[key], bool):
            return [f"{key}={keys[key]!r} must be true or false"]
    if not enabled:
        return []
    if "rope_scaling" in _GPT_FIELDS:
        changes["rope_scaling"] = True
        factor = keys.get("scale_factor")
        if factor is not None and "rope_scaling_factor" in _GPT_FIELDS:
            changes["rope_scaling_factor"] = float(factor)
        return []
    logger.warning(
        "teacher model config %s: RoPE scaling (Llama 3.1 style, %s) is not applied: "
        "GPTModelConfig has no rope_scaling field, so the teacher's rotary frequencies differ "
        "from the checkpoint's training",
        source,
        ", ".join(f"{key}={value!r}" for key, value in keys.items()),
    )
    return []


def _yaml_repr(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _read_yaml(path: str) -> dict[str, Any]:
    """Parse a teacher config file; errors name the file and, for syntax errors, the line."""
    if os.path.isdir(path):
        raise FileNotFoundError(
            f"teacher model config {path}: is a directory; pass the YAML file, or the checkpoint "
            f"directory as teacher_checkpoint to read its {MODEL_CONFIG_FILE}"
        )
    data = read_yaml(path, "teacher model config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"teacher model config {path}: the top level must be a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    return data


def _read_from_nemo_archive(path: str) -> dict[str, Any] | None:
    """``model_config.yaml`` from a NeMo 1 ``.nemo`` tar archive, or None if it has none."""
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            if os.path.basename(member.name) == MODEL_CONFIG_FILE and member.isfile():
                handle = archive.extractfile(member)
                if handle is None:
                    return None
                data = parse_yaml(handle, f"teacher model config {path}:{member.name}")
                return data if data is not None else {}
    return None
