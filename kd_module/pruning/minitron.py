"""Minitron pruning of a dense megatron GPT: width (hidden size, FFN size, attention heads, query
groups) and depth (layers), ranked by activation importance over calibration batches.

The method is the one of Muralidharan et al., "Compact Language Models via Pruning and Knowledge
Distillation" (2024) and Sreenivas et al., "LLM Pruning and Distillation in Practice: The Minitron
Approach" (2024): a forward pass over a few hundred samples records, per layer, the L2 norm over
all tokens of each hidden channel after every normalization, of each attention head's output
(the input of ``linear_proj``) and of each FFN neuron (the input of ``linear_fc2``); the least
important are cut. Depth is ranked by block importance, ``1 - cos(layer input, layer output)``
averaged over tokens (Men et al., "ShortGPT", 2024): a layer that barely changes the residual
stream goes first. Heads are pruned inside their query group, so grouped-query attention keeps its
shape; whole groups go when the target has fewer of them (ranked by the sum of their heads).

Why not ModelOpt's ``mcore_minitron`` mode: ModelOpt 0.47.0's megatron NAS plugin
(``modelopt/torch/nas/plugins/megatron.py``, which ``modelopt.torch.prune``'s ``mcore_minitron``
imports) cannot be imported beside megatron-core 0.16.1. It imports ``transformer_engine``
unconditionally (``ModuleNotFoundError`` on every machine without Transformer Engine, all CPUs)
and ``megatron.core.models.hybrid.hybrid_model.HybridModel``, which 0.16.1 does not have (its
hybrid model lives in ``megatron.core.models.mamba``). Older ModelOpt releases (0.43) guard the
Transformer Engine import but are not the release whose distillation plugin this project runs.
So this module holds the method for what megatron-kd builds: dense GPT stages of the local or
Transformer Engine spec, pruned in one process (TP=1, PP=1; the pruned checkpoint is a
``torch_dist`` one and loads at any layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kd_module.models.gpt import GATED_ACTIVATIONS, GPTModelConfig, unwrap
from kd_module.rules import Problems

PRUNED_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
)
"""What pruning changes; every other architecture field of the target must be the teacher's."""

KEPT_FIELDS = (
    "normalization",
    "layernorm_zero_centered_gamma",
    "activation",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "position_embedding_type",
    "rotary_percent",
    "rotary_base",
    "rope_scaling",
    "share_embeddings_and_output_weights",
    "model_type",
)
"""Fields the pruned model inherits unchanged (a target that differs in one is refused)."""

GATED = GATED_ACTIVATIONS
"""Activations whose ``linear_fc1`` holds two halves (gate, up) of ``ffn_hidden_size`` rows."""


def ffn_size(config: GPTModelConfig) -> int:
    """The MLP's inner width (``4 * hidden_size`` when unset)."""
    return config.ffn_hidden_size or 4 * config.hidden_size


def query_groups(config: GPTModelConfig) -> int:
    """Key/value heads (one per attention head when unset)."""
    return config.num_query_groups or config.num_attention_heads


def head_dim(config: GPTModelConfig) -> int:
    """Width of one attention head."""
    return config.kv_channels or config.hidden_size // config.num_attention_heads


def parameter_count(config: GPTModelConfig, vocab_size: int) -> int:
    """Parameters of a dense megatron GPT of ``config`` with ``vocab_size`` embedding rows.

    Equal to the built model's (local or Transformer Engine spec), tested layer by layer.
    """
    hidden, ffn, heads = config.hidden_size, ffn_size(config), config.num_attention_heads
    groups, dim = query_groups(config), head_dim(config)
    norm = hidden * (2 if config.normalization == "LayerNorm" else 1)
    bias = config.add_bias_linear
    qkv_rows = (heads + 2 * groups) * dim
    fc1_rows = ffn * (2 if config.activation in GATED else 1)
    layer = (
        2 * norm
        + qkv_rows * hidden
        + (qkv_rows if bias or config.add_qkv_bias else 0)
        + hidden * heads * dim
        + (hidden if bias else 0)
        + fc1_rows * hidden
        + (fc1_rows if bias else 0)
        + hidden * ffn
        + (hidden if bias else 0)
    )
    if config.qk_layernorm:
        layer += 2 * dim * (2 if config.normalization == "LayerNorm" else 1)
    total = config.num_layers * layer + norm + vocab_size * hidden
    if config.position_embedding_type == "learned_absolute":
        total += config.padded_max_position_embeddings * hidden
    if not config.share_embeddings_and_output_weights:
        total += vocab_size * hidden
    return total


# ---------------------------------------------------------------- the target


def target_problems(
    teacher: GPTModelConfig, target: GPTModelConfig, vocab_size: int | None = None
) -> Problems:
    """Why ``target`` cannot be pruned from ``teacher`` (empty when it can)."""
    problems = Problems()
    if teacher.model_type != "gpt" or teacher.hybrid_override_pattern:
        problems.add(f"only dense GPT models are pruned (the teacher is {teacher.model_type!r})")
        return problems
    for key in KEPT_FIELDS:
        if getattr(target, key) != getattr(teacher, key):
            problems.add(
                f"target {key}={getattr(target, key)!r} differs from the teacher's "
                f"{getattr(teacher, key)!r}; pruning changes only {', '.join(PRUNED_FIELDS)}"
            )
    if target.kv_channels is not None and target.kv_channels != head_dim(teacher):
        problems.add(
            f"target kv_channels={target.kv_channels} differs from the teacher's head size "
            f"{head_dim(teacher)}; heads are pruned whole (leave kv_channels unset)"
        )
    if target.vocab_size and teacher.vocab_size and target.vocab_size != teacher.vocab_size:
        problems.add(
            f"target vocab_size={target.vocab_size} differs from the teacher's "
            f"{teacher.vocab_size}; the vocabulary is not pruned"
        )
    sizes = {
        "num_layers": (target.num_layers, teacher.num_layers),
        "hidden_size": (target.hidden_size, teacher.hidden_size),
        "ffn_hidden_size": (ffn_size(target), ffn_size(teacher)),
        "num_attention_heads": (target.num_attention_heads, teacher.num_attention_heads),
        "num_query_groups": (query_groups(target), query_groups(teacher)),
    }
    for key, (value, limit) in sizes.items():
        if value > limit:
            problems.add(f"target {key}={value} is larger than the teacher's {limit}")
    if all(value == limit for value, limit in sizes.values()):
        problems.add("the target is the teacher's own architecture; nothing would be pruned")
    groups, heads = query_groups(target), target.num_attention_heads
    if heads % groups:
        problems.add(
            f"target num_attention_heads={heads} is not divisible by num_query_groups={groups}"
        )
    elif heads // groups > teacher.num_attention_heads // query_groups(teacher):
        problems.add(
            f"target has {heads // groups} heads per query group, more than the teacher's "
            f"{teacher.num_attention_heads // query_groups(teacher)} (heads are pruned inside "
            "their group)"
        )
    return problems


def budget_target(teacher: GPTModelConfig, params: int, vocab_size: int) -> GPTModelConfig:
    """The widest width-pruned teacher with at most ``params`` parameters.

    Hidden and FFN sizes shrink together by one factor, in steps of 1/64, rounded down to
    multiples of 8 (the Minitron 4B width recipe keeps heads and layers); heads, groups and
    depth are kept.

    Raises:
        ValueError: when even the narrowest candidate (hidden and FFN at 1/64) is over the
            budget, or the budget is not below the teacher's count.
    """
    full = parameter_count(teacher, vocab_size)
    if params >= full:
        raise ValueError(
            f"prune: params={params:,} is not below the teacher's {full:,} parameters; give a "
            "smaller budget"
        )
    dim = head_dim(teacher)
    for step in range(63, 0, -1):
        hidden = max(8, int(teacher.hidden_size * step / 64) // 8 * 8)
        ffn = max(8, int(ffn_size(teacher) * step / 64) // 8 * 8)
        candidate = teacher.replace(hidden_size=hidden, ffn_hidden_size=ffn, kv_channels=dim)
        if parameter_count(candidate, vocab_size) <= params:
            return candidate
    smallest = teacher.replace(
        hidden_size=max(8, teacher.hidden_size // 64 // 8 * 8),
        ffn_hidden_size=max(8, ffn_size(teacher) // 64 // 8 * 8),
        kv_channels=dim,
    )
    raise ValueError(
        f"prune: no width-pruned architecture has at most params={params:,} parameters (the "
        f"narrowest, hidden {smallest.hidden_size} and FFN {smallest.ffn_hidden_size}, has "
        f"{parameter_count(smallest, vocab_size):,}: the embeddings alone take "
        f"{vocab_size * smallest.hidden_size:,}); give a target architecture with fewer layers"
    )


def pruned_config(teacher: GPTModelConfig, target: GPTModelConfig) -> GPTModelConfig:
    """The teacher's config with the target's sizes (explicit FFN size, groups, head size)."""
    return teacher.replace(
        num_layers=target.num_layers,
        hidden_size=target.hidden_size,
        ffn_hidden_size=ffn_size(target),
        num_attention_heads=target.num_attention_heads,
        num_query_groups=query_groups(target),
        kv_channels=head_dim(teacher),
        seq_length=target.seq_length,
        max_position_embeddings=teacher.max_position_embeddings,
    )


# ---------------------------------------------------------------- importance


@dataclass
class Importance:
    """Activation importance of one model: L2 norms over every calibration token."""

    hidden: Tensor
    """[hidden_size]: each residual channel after every normalization, summed over the norms."""
    heads: list[Tensor]
    """Per layer, [num_attention_heads]: each head's attention output."""
    ffn: list[Tensor]
    """Per layer, [ffn_hidden_size]: each neuron after the activation."""
    layers: Tensor
    """[num_layers]: block importance, mean over tokens of ``1 - cos(input, output)``."""
    tokens: int = 0
    """Calibration tokens seen."""


def _norms(core: torch.nn.Module) -> list[torch.nn.Module]:
    """Every normalization whose output is a residual-width activation (local spec).

    Raises:
        ValueError: for a Transformer Engine stage (its norms are fused into ``linear_qkv`` and
            ``linear_fc1``); pruning builds the teacher with the local spec.
    """
    found = []
    for index, layer in enumerate(core.decoder.layers):
        if hasattr(layer.self_attention.linear_qkv, "layer_norm_weight"):
            raise ValueError(
                f"prune: layer {index} fuses its norm into linear_qkv (Transformer Engine spec); "
                "build the teacher with transformer_impl='local' to prune it"
            )
        found += [layer.input_layernorm, layer.pre_mlp_layernorm]
    return found + [core.decoder.final_layernorm]


def activation_importance(model: torch.nn.Module, batches: Any) -> Importance:
    """Run ``model`` (one whole GPT stage, TP=1) over ``batches`` and collect its importance.

    Args:
        model: a megatron ``GPTModel`` (possibly wrapped), evaluated without gradients.
        batches: dicts with ``tokens`` [b, s] and ``position_ids`` [b, s] (and optionally
            ``attention_mask``) on the model's device.

    Returns:
        The :class:`Importance` (fp64 sums, square-rooted).
    """
    core = unwrap(model)
    config = core.config
    layers = list(core.decoder.layers)
    heads, dim = config.num_attention_heads, config.kv_channels
    squares = {
        "hidden": torch.zeros(config.hidden_size, dtype=torch.float64),
        "heads": [torch.zeros(heads, dtype=torch.float64) for _ in layers],
        "ffn": [torch.zeros(config.ffn_hidden_size, dtype=torch.float64) for _ in layers],
        "layers": torch.zeros(len(layers), dtype=torch.float64),
    }
    counted = [0]

    def on_norm(module: Any, inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        squares["hidden"].add_(out.detach().double().pow(2).sum(dim=(0, 1)).cpu())

    def on_proj(index: int) -> Any:
        def hook(module: Any, inputs: Any) -> None:
            x = inputs[0].detach()
            per_head = x.reshape(*x.shape[:2], heads, dim).double().pow(2).sum(dim=(0, 1, 3))
            squares["heads"][index].add_(per_head.cpu())

        return hook

    def on_fc2(index: int) -> Any:
        def hook(module: Any, inputs: Any) -> None:
            squares["ffn"][index].add_(inputs[0].detach().double().pow(2).sum(dim=(0, 1)).cpu())

        return hook

    def on_layer(index: int) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(
                hidden_in.detach().double(), hidden_out.detach().double(), dim=-1
            )
            squares["layers"][index] += (1.0 - cosine).sum().cpu()

        return hook

    handles = []
    for module in _norms(core):
        handles.append(module.register_forward_hook(on_norm))
    for index, layer in enumerate(layers):
        handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(on_proj(index)))
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(on_fc2(index)))
        handles.append(layer.register_forward_hook(on_layer(index), with_kwargs=True))
    was_training = core.training
    core.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                core(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
                counted[0] += batch["tokens"].numel()
    finally:
        for handle in handles:
            handle.remove()
        core.train(was_training)
    tokens = max(counted[0], 1)
    return Importance(
        hidden=squares["hidden"].sqrt(),
        heads=[value.sqrt() for value in squares["heads"]],
        ffn=[value.sqrt() for value in squares["ffn"]],
        layers=squares["layers"] / tokens,
        tokens=counted[0],
    )


# ---------------------------------------------------------------- what is kept


def _top(scores: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` largest ``scores``, in their original order (ties: lower index
    first, so the choice is deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:count])


@dataclass
class PrunePlan:
    """Which channels, heads, neurons and layers of the teacher the pruned model keeps."""

    config: GPTModelConfig
    """The pruned architecture."""
    hidden: list[int]
    """Kept residual channels."""
    layers: list[int]
    """Kept layers (teacher numbering from 0)."""
    heads: dict[int, list[int]] = field(default_factory=dict)
    """Per kept layer: kept heads (teacher head numbers, group by group)."""
    groups: dict[int, list[int]] = field(default_factory=dict)
    """Per kept layer: kept query groups."""
    ffn: dict[int, list[int]] = field(default_factory=dict)
    """Per kept layer: kept FFN neurons."""

    def summary(self) -> dict[str, Any]:
        """What ``pruning.json`` records."""
        return {
            "kept_layers": self.layers,
            "kept_hidden_channels": len(self.hidden),
            "kept_query_groups": {str(k): v for k, v in self.groups.items()},
            "kept_heads": {str(k): v for k, v in self.heads.items()},
        }


def plan_pruning(
    teacher: GPTModelConfig, target: GPTModelConfig, importance: Importance
) -> PrunePlan:
    """The most important parts of ``teacher`` that fit ``target`` (see the module docstring)."""
    config = pruned_config(teacher, target)
    per_group = teacher.num_attention_heads // query_groups(teacher)
    keep_groups, keep_per_group = (
        query_groups(config),
        config.num_attention_heads // query_groups(config),
    )
    plan = PrunePlan(
        config=config,
        hidden=_top(importance.hidden, config.hidden_size),
        layers=_top(importance.layers, config.num_layers),
    )
    for layer in plan.layers:
        scores = importance.heads[layer].reshape(query_groups(teacher), per_group)
        groups = _top(scores.sum(dim=1), keep_groups)
        plan.groups[layer] = groups
        plan.heads[layer] = [
            group * per_group + head
            for group in groups
            for head in _top(scores[group], keep_per_group)
        ]
        plan.ffn[layer] = _top(importance.ffn[layer], ffn_size(config))
    return plan


# ---------------------------------------------------------------- the pruned weights


def _qkv_rows(plan: PrunePlan, teacher: GPTModelConfig, layer: int) -> Tensor:
    """Rows of the teacher's ``linear_qkv`` the pruned layer keeps.

    megatron lays ``linear_qkv`` out group by group: the group's query heads, then its key,
    then its value, each ``head_dim`` rows.
    """
    dim, per_group = head_dim(teacher), teacher.num_attention_heads // query_groups(teacher)
    rows: list[Tensor] = []
    for group in plan.groups[layer]:
        base = group * (per_group + 2) * dim
        for head in plan.heads[layer]:
            if head // per_group == group:
                rows.append(torch.arange(dim) + base + (head % per_group) * dim)
        rows.append(torch.arange(dim) + base + per_group * dim)
        rows.append(torch.arange(dim) + base + (per_group + 1) * dim)
    return torch.cat(rows)


def _proj_columns(plan: PrunePlan, teacher: GPTModelConfig, layer: int) -> Tensor:
    dim = head_dim(teacher)
    return torch.cat([torch.arange(dim) + head * dim for head in plan.heads[layer]])


def _fc1_rows(plan: PrunePlan, teacher: GPTModelConfig, layer: int) -> Tensor:
    kept = torch.tensor(plan.ffn[layer])
    if teacher.activation in GATED:  # [gate; up], each ffn_hidden_size rows
        return torch.cat([kept, kept + ffn_size(teacher)])
    return kept


def pruned_tensor(name: str, source: Tensor, plan: PrunePlan, teacher: GPTModelConfig) -> Tensor:
    """The pruned model's tensor ``name`` cut from the teacher's ``source``.

    ``name`` is in the pruned model's numbering; ``source`` is the teacher's tensor of the same
    role (its layer renumbered through ``plan.layers``).

    Raises:
        ValueError: for a tensor this module does not know how to prune (MoE, Mamba, ...).
    """
    hidden = torch.tensor(plan.hidden)
    if name.startswith(("embedding.", "output_layer.")):
        return source[:, hidden]
    if name.startswith("decoder.final_layernorm."):
        return source[hidden]
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise ValueError(f"prune: no rule for tensor {name}")
    layer, role = plan.layers[int(parts[2])], ".".join(parts[3:])
    if role.endswith(("layernorm.weight", "layernorm.bias")):
        if role.startswith(("self_attention.q_layernorm", "self_attention.k_layernorm")):
            return source  # per head width, unchanged
        return source[hidden]
    if role == "self_attention.linear_qkv.weight":
        return source[_qkv_rows(plan, teacher, layer)][:, hidden]
    if role == "self_attention.linear_qkv.bias":
        return source[_qkv_rows(plan, teacher, layer)]
    if role == "self_attention.linear_proj.weight":
        return source[hidden][:, _proj_columns(plan, teacher, layer)]
    if role in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
        return source[hidden]
    if role == "mlp.linear_fc1.weight":
        return source[_fc1_rows(plan, teacher, layer)][:, hidden]
    if role == "mlp.linear_fc1.bias":
        return source[_fc1_rows(plan, teacher, layer)]
    if role == "mlp.linear_fc2.weight":
        return source[hidden][:, torch.tensor(plan.ffn[layer])]
    raise ValueError(f"prune: no rule for tensor {name}")


def teacher_name(name: str, plan: PrunePlan) -> str:
    """The teacher's name of the pruned model's tensor ``name`` (layers renumbered)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(plan.layers[int(parts[2])])
    return ".".join(parts)


def copy_pruned_weights(
    teacher_model: torch.nn.Module,
    student_model: torch.nn.Module,
    plan: PrunePlan,
    teacher: GPTModelConfig,
) -> None:
    """Fill ``student_model`` (built for ``plan.config``) with ``teacher_model``'s kept weights
    (both local-spec stages holding the whole model)."""
    source = unwrap(teacher_model).state_dict()
    with torch.no_grad():
        for name, tensor in unwrap(student_model).state_dict().items():
            if "_extra_state" in name:
                continue
            cut = pruned_tensor(name, source[teacher_name(name, plan)], plan, teacher)
            if tuple(cut.shape) != tuple(tensor.shape):
                raise RuntimeError(
                    f"prune: {name} cut to {tuple(cut.shape)}, the pruned model has "
                    f"{tuple(tensor.shape)}"
                )
            tensor.copy_(cut)


__all__ = [
    "Importance",
    "PrunePlan",
    "activation_importance",
    "budget_target",
    "copy_pruned_weights",
    "parameter_count",
    "plan_pruning",
    "pruned_config",
    "target_problems",
]
