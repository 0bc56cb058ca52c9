"""Reading a NeMo-style ``model_config.yaml`` into a :class:`~kd_module.models.gpt.GPTModelConfig`.

As in Megatron-LM's distillation, the student's config is the starting point and the file's values
override it; the result builds the teacher. The file may be

- the model section of a NeMo checkpoint (architecture keys at the top level),
- a NeMo 1 training config, with the model section under a top-level ``model:`` key,
- a NeMo 2 ``context/model.yaml`` (``_target_`` plus a ``config:`` section), or
- a flat file of megatron names (``GPTModelConfig`` fields).

NeMo names that differ from megatron's are converted (:data:`~.keys.CONVERSION_TABLE`). Precision
and the tokenizer section are returned beside the model config. Training-only keys are ignored
and listed in one log line; parallelism keys are ignored with one warning, because the teacher
always runs in the student's parallel layout. Any other key is an error, so a typo cannot silently
leave the teacher with the student's value.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from kd_module.models.gpt import ACTIVATIONS, POSITION_EMBEDDINGS, GPTModelConfig
from kd_module.nemo_format.keys import (
    ACTIVATION_KEYS,
    BOOL_FIELDS,
    EXTRA_KEYS,
    FIXED_KEYS,
    FLOAT_FIELDS,
    GATED,
    GPT_FIELDS,
    INT_FIELDS,
    NEMO2_ACTIVATION_FUNCS,
    NORMALIZATION_KEYS,
    NORMALIZATIONS,
    OPTIONAL_INT_FIELDS,
    PARALLELISM_KEYS,
    PRECISION_KEYS,
    RENAMES,
    ROPE_SCALING_KEYS,
    ROPE_SCALING_PARAMETERS,
    TRAINING_ONLY_KEYS,
    UNGATED,
    known_keys,
)
from kd_module.nemo_format.writer import yaml_repr
from kd_module.rules import close_matches
from kd_module.training.precision import ALIASES, dtype_name_of

logger = logging.getLogger("kd_module.nemo_format")  # one logger for the format's modules


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
        elif key in PRECISION_KEYS:
            precision_keys[key] = value
        elif key in ACTIVATION_KEYS:
            activation_keys[key] = value
        elif key in NORMALIZATION_KEYS:
            _convert_normalization(value, changes, problems)
        elif key in FIXED_KEYS:
            allowed, reason = FIXED_KEYS[key]
            if value != allowed:
                problems.append(
                    f"{key}={value!r} is not supported ({reason}); allowed: {yaml_repr(allowed)}"
                )
        elif key in ROPE_SCALING_KEYS or key in ROPE_SCALING_PARAMETERS:
            rope_scaling[key] = value
        elif key in EXTRA_KEYS:
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
        elif key in RENAMES or key in GPT_FIELDS:
            target = RENAMES.get(key, key)
            converted, problem = _convert_value(key, target, value)
            if problem:
                problems.append(problem)
            else:
                changes[target] = converted
        else:
            problems.append(f"unknown key {key!r}" + close_matches(key, known_keys(), n=1))

    if activation_keys:
        activation, problem = _convert_activation(activation_keys, student.activation)
        if problem:
            problems.append(problem)
        else:
            changes["activation"] = activation
    if trainer_precision is not None and not any(
        precision_keys.get(key) is not None for key in PRECISION_KEYS
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
    if target in INT_FIELDS or (target in OPTIONAL_INT_FIELDS and value is not None):
        number = _coerce_number(value, int)
        if number is None or number <= 0:
            nullable = " or null" if target in OPTIONAL_INT_FIELDS else ""
            return None, f"{shown}={value!r} must be a positive integer{nullable}"
        return number, ""
    if target in FLOAT_FIELDS:
        number = _coerce_number(value, float)
        if number is None or number < 0:
            return None, f"{shown}={value!r} must be a non-negative number"
        return number, ""
    if target in BOOL_FIELDS:
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
        activation = NEMO2_ACTIVATION_FUNCS.get(func)
        if activation is None:
            supported = [k for k, v in NEMO2_ACTIVATION_FUNCS.items() if v]
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
        if activation not in GATED:
            return None, (
                f"gated_linear_unit=true with activation {activation!r}: no gated form; "
                "allowed gated activations: swiglu, fast-swiglu, geglu"
            )
        activation = GATED[activation]
    if not gated and activation.endswith("glu"):
        ungated = UNGATED.get(activation)
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
    enabled = any(keys.get(key) for key in ROPE_SCALING_KEYS) or any(
        keys.get(key) is not None for key in ROPE_SCALING_PARAMETERS
    )
    for key in ROPE_SCALING_KEYS:
        if key in keys and not isinstance(keys[key], bool):
            return [f"{key}={keys[key]!r} must be true or false"]
    if not enabled:
        return []
    if "rope_scaling" in GPT_FIELDS:
        changes["rope_scaling"] = True
        factor = keys.get("scale_factor")
        if factor is not None and "rope_scaling_factor" in GPT_FIELDS:
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
