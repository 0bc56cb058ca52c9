"""The distillation YAML: which outputs of student and teacher are compared, and how.

The file format is Megatron-LM's ``--export-kd-distill-cfg`` (``logit_layers``,
``intermediate_layer_pairs``, ``skip_lm_loss``, ``kd_loss_scale``, ``logit_kl_temperature``)
plus four keys of our own (``logit_kl_topk``, ``logit_loss``, ``jsd_beta``, ``logit_loss_impl``)::

    logit_layers: ["output_layer", "output_layer"]
    intermediate_layer_pairs:
      - ["decoder.final_layernorm", "decoder.final_layernorm", "cosine"]
    skip_lm_loss: false
    kd_loss_scale: 10.0
    logit_kl_temperature: 1.0

Without a file, distillation is logits-only with scale and temperature 1.0.

This module imports only the standard library and PyYAML, so configs can be checked without
megatron-core; :func:`check_module_names` takes an already built ``torch.nn.Module``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kd_module.rules import Problems, close_matches
from kd_module.yaml_files import read_yaml

if TYPE_CHECKING:
    import torch

INTERMEDIATE_LOSSES = ("cosine", "mse")
"""Loss names allowed as the third item of an intermediate layer pair (ModelOpt's names)."""
LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd")
"""Allowed values of ``logit_loss``."""
LOGIT_LOSS_IMPLS = ("auto", "fused", "chunked", "modelopt")
"""Allowed values of ``logit_loss_impl`` (see :attr:`DistillConfig.logit_loss_impl`)."""
OUTPUT_LAYERS = ["output_layer", "output_layer"]
"""``logit_layers`` naming both models' output layers: what the fused logits loss needs."""

# A transformer layer inside a megatron model: ``decoder.layers.<index>`` (the index is global in
# this file; megatron numbers layers locally on each pipeline stage).
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?=\.|$)")


@dataclass
class DistillConfig:
    """Megatron-LM's distillation config, validated.

    Examples:
        In YAML (``--distill-config distill.yaml``)::

            logit_layers: ["output_layer", "output_layer"]
            intermediate_layer_pairs:
              - ["decoder.layers.1", "decoder.layers.3"]  # layer outputs: same on every spec
            skip_lm_loss: true
            logit_kl_temperature: 2.0

        In Python::

            config = DistillConfig(logit_kl_temperature=2.0, logit_loss="jsd", jsd_beta=0.5)
    """

    logit_layers: list[str] = field(default_factory=lambda: ["output_layer", "output_layer"])
    """Names of the student and the teacher submodule, in that order, whose outputs are logits."""
    intermediate_layer_pairs: list[list[str]] = field(default_factory=list)
    """Extra losses between intermediate outputs: each entry is ``[student_module,
    teacher_module]`` or ``[student_module, teacher_module, loss]`` with ``loss`` one of
    ``cosine`` (the default) or ``mse``. Layer indices (``decoder.layers.N``) are global; the
    modules must be on the last pipeline stage."""
    skip_lm_loss: bool = True
    """Train on the KD loss alone; when false the student's LM loss is added to it."""
    kd_loss_scale: float = 1.0
    """Factor on the KD loss before it is added to the LM loss (used when ``skip_lm_loss`` is
    false)."""
    logit_kl_temperature: float = 1.0
    """Both models' logits are divided by this before the softmax."""
    logit_kl_topk: int | None = None
    """When set, the logit loss is computed over the teacher's top-k tokens only (ModelOpt's
    ``TopKLogitsKLLoss``); ``None`` uses the whole vocabulary."""
    logit_loss: str = "forward_kl"
    """Divergence between the distributions: ``forward_kl`` (KL(teacher || student), Megatron-LM's
    loss), ``reverse_kl`` (KL(student || teacher)) or ``jsd`` (generalized Jensen-Shannon)."""
    jsd_beta: float = 0.5
    """Mixing weight of the generalized JSD, strictly between 0 and 1 (used when ``logit_loss``
    is ``jsd``)."""

    logit_loss_impl: str = "auto"
    """How the logits loss is computed: ``fused`` runs both models' output projections inside the
    chunked loss, so neither model's full logits exist, and takes the logged (or trained) LM
    loss from the same pass; ``chunked`` computes the output layers' logits and our chunked loss
    over them; ``modelopt`` uses ModelOpt's ``LogitsKLLoss`` / ``TopKLogitsKLLoss`` (forward KL
    only); ``auto`` picks ``fused`` where it applies (``logit_layers`` are the output layers and
    both models pad the vocabulary alike) at a vocabulary of 32768 entries or more, and
    ``chunked`` otherwise (see ``kd_module.distillation.model.resolve_logit_loss_impl``)."""

    def __post_init__(self) -> None:
        problems = _field_problems(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        )
        if problems:
            raise ValueError("distill config: " + "; ".join(problems))
        # Normalize what YAML and Python callers may spell differently (tuples, ints).
        self.logit_layers = list(self.logit_layers)
        self.intermediate_layer_pairs = [list(pair) for pair in self.intermediate_layer_pairs]
        self.kd_loss_scale = float(self.kd_loss_scale)
        self.logit_kl_temperature = float(self.logit_kl_temperature)
        self.jsd_beta = float(self.jsd_beta)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> DistillConfig:
        """Build from a parsed YAML mapping, rejecting unknown keys.

        Args:
            data: the mapping (keys are field names).
            source: where ``data`` came from, named in error messages (a file path).

        Returns:
            The validated config.

        Raises:
            ValueError: listing every unknown key (with a did-you-mean) and every bad value.
        """
        prefix = f"distill config {source}: "
        if not isinstance(data, dict):
            raise ValueError(
                prefix + f"the top level must be a mapping of keys to values, got "
                f"{type(data).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        problems = [
            f"unknown key {key!r}" + close_matches(key, names, n=1)
            for key in data
            if key not in names
        ]
        known = {key: value for key, value in data.items() if key in names}
        defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        problems += _field_problems({**defaults, **known})
        if problems:
            raise ValueError(prefix + "; ".join(problems))
        return cls(**known)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> DistillConfig:
        """Read and validate a distillation YAML file.

        Args:
            path: the file.

        Returns:
            The validated config; an empty file gives the defaults.

        Raises:
            FileNotFoundError: when the file does not exist.
            ValueError: when the YAML does not parse (with the line), the top level is not a
                mapping, or a key or value is wrong.

        Examples:
            >>> DistillConfig.from_yaml("distill.yaml")  # doctest: +SKIP
        """
        path = os.fspath(path)
        data = read_yaml(path, "distill config")
        if data is None:
            data = {}
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (lists, numbers, strings) that :meth:`from_dict` reads back."""
        return {
            "logit_layers": list(self.logit_layers),
            "intermediate_layer_pairs": [list(pair) for pair in self.intermediate_layer_pairs],
            "skip_lm_loss": self.skip_lm_loss,
            "kd_loss_scale": self.kd_loss_scale,
            "logit_kl_temperature": self.logit_kl_temperature,
            "logit_kl_topk": self.logit_kl_topk,
            "logit_loss": self.logit_loss,
            "jsd_beta": self.jsd_beta,
            "logit_loss_impl": self.logit_loss_impl,
        }

    @property
    def student_intermediate_layers(self) -> list[str]:
        """Student module names of the intermediate pairs, in order."""
        return [pair[0] for pair in self.intermediate_layer_pairs]

    @property
    def teacher_intermediate_layers(self) -> list[str]:
        """Teacher module names of the intermediate pairs, in order."""
        return [pair[1] for pair in self.intermediate_layer_pairs]

    def intermediate_loss_names(self) -> list[str]:
        """The loss of each intermediate pair, ``cosine`` where the pair names none."""
        return [pair[2] if len(pair) == 3 else "cosine" for pair in self.intermediate_layer_pairs]


def load_distill_config(
    config: str | os.PathLike[str] | dict[str, Any] | DistillConfig | None,
) -> DistillConfig:
    """The distillation config from a path, a mapping, a config, or nothing.

    Args:
        config: a YAML path, a mapping of fields, a :class:`DistillConfig` (returned as is), or
            ``None`` for Megatron-LM's default: logits-only KD with scale and temperature 1.0.

    Returns:
        The validated config.

    Raises:
        TypeError: for any other kind of argument.
        FileNotFoundError, ValueError: as :meth:`DistillConfig.from_yaml`.

    Examples:
        >>> load_distill_config(None).logit_kl_temperature
        1.0
    """
    if config is None:
        return DistillConfig()
    if isinstance(config, DistillConfig):
        return config
    if isinstance(config, dict):
        return DistillConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return DistillConfig.from_yaml(config)
    raise TypeError(
        "distill config: expected a YAML path, a mapping, a DistillConfig or None, got "
        f"{type(config).__name__}"
    )


def check_module_names(model: torch.nn.Module, names: list[str], who: str) -> list[str]:
    """Problems for ``names`` that are not submodules of ``model``.

    Args:
        model: the built model (one pipeline stage of it).
        names: dotted submodule names, as ``model.named_modules()`` spells them.
        who: ``student`` or ``teacher``, to start each message.

    Returns:
        One message per missing name with up to three close matches, e.g.
        ``student has no submodule 'decoder.layer.0.input_layernorm' (did you mean
        'decoder.layers.0.input_layernorm'?)``, and one per name whose module is an identity
        (see :func:`identity_module_problem`); empty when all exist and compute something.
    """
    modules = dict(model.named_modules())
    problems = []
    for name in names:
        if name not in modules:
            problems.append(f"{who} has no submodule {name!r}" + close_matches(name, modules))
        elif _is_identity(modules[name]):
            problems.append(identity_module_problem(name, modules[name], who))
    return problems


IDENTITY_MODULES = ("IdentityOp", "IdentityFuncOp", "Identity")
"""Class names of modules that return their input (megatron's spec placeholders, torch's)."""


def _is_identity(module: Any) -> bool:
    return type(module).__name__ in IDENTITY_MODULES


def identity_module_problem(name: str, module: Any, who: str) -> str:
    """Why distilling the output of an identity module is refused, and what to name instead.

    megatron's Transformer Engine layer spec fuses the input and pre-MLP layernorms into
    ``linear_qkv`` / ``linear_fc1`` and leaves ``input_layernorm`` / ``pre_mlp_layernorm`` as
    ``IdentityOp``: hooking them would capture the raw residual stream on a GPU while the local
    spec (CPU) captures the normalized one. Other identity placeholders (``q_layernorm``
    without ``qk_layernorm``) capture nothing of their own either.
    """
    index = layer_index(name)
    layer = f"'decoder.layers.{index}'" if index is not None else "a 'decoder.layers.N'"
    return (
        f"{who} submodule {name!r} is an identity ({type(module).__name__}) in this model's "
        "layer spec: its output is its input, e.g. the un-normalized residual stream where "
        "Transformer Engine fuses the input / pre-MLP layernorm into linear_qkv / linear_fc1; "
        f"name a module that computes something: the layer output {layer} or "
        "'decoder.final_layernorm'"
    )


def layer_index(name: str) -> int | None:
    """The transformer layer index in a module name (``decoder.layers.3.mlp`` -> 3), or None."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def check_pipeline_placement(
    names: list[str], num_layers: int, pipeline_model_parallel_size: int, who: str
) -> list[str]:
    """Problems for intermediate layers that are not on the last pipeline stage.

    ModelOpt computes distillation losses on the last pipeline stage only, so every
    intermediate module must live there. Layers are split evenly: the last stage holds global
    layer indices ``>= num_layers - num_layers // pipeline_model_parallel_size``. Names without
    a layer index (``decoder.final_layernorm``, ``output_layer``) are on the last stage.

    Args:
        names: module names with global layer indices.
        num_layers: the model's number of transformer layers.
        pipeline_model_parallel_size: number of pipeline stages.
        who: ``student`` or ``teacher``, to start each message.

    Returns:
        One message per misplaced name, naming its stage and the allowed index range.

    Raises:
        ValueError: when ``num_layers`` is not a positive multiple of the stage count.
    """
    _check_split(num_layers, pipeline_model_parallel_size)
    per_stage = num_layers // pipeline_model_parallel_size
    first_last = num_layers - per_stage
    problems = []
    for name in names:
        index = layer_index(name)
        if index is None:
            continue
        if index >= num_layers:
            problems.append(
                f"{who} intermediate layer {name!r}: layer {index} does not exist "
                f"(num_layers={num_layers}, indices 0 to {num_layers - 1})"
            )
        elif index < first_last:
            problems.append(
                f"{who} intermediate layer {name!r} is on pipeline stage {index // per_stage} of "
                f"{pipeline_model_parallel_size}; distillation losses are computed on the last "
                f"stage only, which holds layers {first_last} to {num_layers - 1}"
            )
    return problems


def local_module_name(name: str, num_layers: int, pipeline_model_parallel_size: int) -> str:
    """``name`` with its global layer index made local to the last pipeline stage.

    megatron numbers the layers of each pipeline stage from 0, so with 4 layers on 2 stages the
    global ``decoder.layers.3.mlp`` is ``decoder.layers.1.mlp`` in the last stage's module.

    Args:
        name: module name with a global layer index (or none).
        num_layers: the model's number of transformer layers.
        pipeline_model_parallel_size: number of pipeline stages.

    Returns:
        The name as the last stage's ``named_modules()`` spells it.

    Raises:
        ValueError: when the layer is not on the last stage.
    """
    problems = check_pipeline_placement([name], num_layers, pipeline_model_parallel_size, "model")
    if problems:
        raise ValueError(problems[0])
    match = _LAYER_INDEX.search(name)
    if match is None:
        return name
    local = int(match.group(1)) - (num_layers - num_layers // pipeline_model_parallel_size)
    return name[: match.start(1)] + str(local) + name[match.end(1) :]


def _check_split(num_layers: int, pipeline_model_parallel_size: int) -> None:
    if (
        not isinstance(num_layers, int)
        or not isinstance(pipeline_model_parallel_size, int)
        or num_layers <= 0
        or pipeline_model_parallel_size <= 0
        or num_layers % pipeline_model_parallel_size
    ):
        raise ValueError(
            f"pipeline placement: num_layers={num_layers!r} must be a positive multiple of "
            f"pipeline_model_parallel_size={pipeline_model_parallel_size!r}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_problems(values: dict[str, Any]) -> list[str]:
    """Every problem with a full set of field values (messages name key, value, what is allowed)."""
    out = Problems()
    layers = values["logit_layers"]
    if (
        not isinstance(layers, (list, tuple))
        or len(layers) != 2
        or not all(isinstance(name, str) and name for name in layers)
    ):
        out.append(
            f"logit_layers={layers!r} must be a list of exactly 2 non-empty strings "
            "[student_module, teacher_module]"
        )

    pairs = values["intermediate_layer_pairs"]
    if not isinstance(pairs, (list, tuple)):
        out.append(
            f"intermediate_layer_pairs={pairs!r} must be a list of "
            "[student_module, teacher_module] or [student_module, teacher_module, loss] lists"
        )
    else:
        for i, pair in enumerate(pairs):
            key = f"intermediate_layer_pairs[{i}]"
            if not isinstance(pair, (list, tuple)) or len(pair) not in (2, 3):
                out.append(
                    f"{key}={pair!r} must be [student_module, teacher_module] or "
                    f"[student_module, teacher_module, loss] with loss one of "
                    f"{', '.join(INTERMEDIATE_LOSSES)}"
                )
                continue
            if not all(isinstance(name, str) and name for name in pair[:2]):
                out.append(f"{key}={list(pair)!r}: module names must be non-empty strings")
            if len(pair) == 3 and pair[2] not in INTERMEDIATE_LOSSES:
                out.append(
                    f"{key}: loss {pair[2]!r} is not one of {', '.join(INTERMEDIATE_LOSSES)}"
                    + close_matches(pair[2], INTERMEDIATE_LOSSES)
                )

    if not isinstance(values["skip_lm_loss"], bool):
        out.append(f"skip_lm_loss={values['skip_lm_loss']!r} must be true or false")
    for key in ("kd_loss_scale", "logit_kl_temperature"):
        out.positive_number(key, values[key])
    out.positive_int("logit_kl_topk", values["logit_kl_topk"], or_none="null")
    out.one_of("logit_loss", values["logit_loss"], LOGIT_LOSSES)
    beta = values["jsd_beta"]
    if not _is_number(beta) or not 0 < beta < 1:
        out.append(f"jsd_beta={beta!r} must be a number strictly between 0 and 1")
    impl = values["logit_loss_impl"]
    if out.one_of("logit_loss_impl", impl, LOGIT_LOSS_IMPLS):
        if impl == "modelopt" and values["logit_loss"] != "forward_kl":
            out.append(
                f"logit_loss_impl='modelopt' computes forward_kl only, not "
                f"logit_loss={values['logit_loss']!r}; use logit_loss_impl auto, fused or chunked"
            )
        if impl == "fused" and isinstance(layers, (list, tuple)) and list(layers) != OUTPUT_LAYERS:
            out.append(
                f"logit_loss_impl='fused' needs logit_layers={OUTPUT_LAYERS!r} (it replaces the "
                f"output projections), got {list(layers)!r}; use logit_loss_impl auto or chunked"
            )
    return out
