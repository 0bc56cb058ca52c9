"""The weight files of an HF model directory, their tensor names and shapes (headers only).

A directory is an HF checkpoint when it has ``config.json`` and weights in one of the layouts
``save_pretrained`` writes: ``model.safetensors``, ``model.safetensors.index.json`` plus its
shards, or ``pytorch_model.bin`` / ``pytorch_model.bin.index.json`` plus shards. Everything
here reads file headers (safetensors) or maps files lazily (``torch.load(mmap=True)``), never
the whole model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_module.hf.config import CONFIG_FILE, architecture_of
from kd_module.models.gpt import GPTModelConfig

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def is_hf_checkpoint(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is a local HF model directory (``config.json`` plus weights)."""
    if path is None:
        return False
    directory = Path(path)
    if not (directory / CONFIG_FILE).is_file():
        return False
    return any(
        (directory / name).is_file() for name in (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)
    ) or any(directory.glob("*.safetensors"))


@dataclass
class WeightFiles:
    """Where each tensor of an HF checkpoint lies."""

    directory: Path
    kind: str
    """``"safetensors"`` or ``"bin"``."""
    tensor_file: dict[str, str] = field(default_factory=dict)
    """Tensor name -> file name (relative to the directory)."""

    @property
    def files(self) -> list[str]:
        return sorted(set(self.tensor_file.values()))


def _index(directory: Path, name: str) -> dict[str, str]:
    path = directory / name
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"HF checkpoint {path}: not an index with a weight_map ({error})"
        ) from None
    missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if missing:
        raise FileNotFoundError(
            f"HF checkpoint {directory}: {name} names {len(missing)} missing shard(s): "
            + ", ".join(missing[:5])
        )
    return dict(weight_map)


def weight_files(directory: str | os.PathLike[str]) -> WeightFiles:
    """The tensor -> file map of an HF checkpoint (safetensors preferred over ``.bin``).

    Raises:
        FileNotFoundError: no weights, or a shard the index names is missing.
        ValueError: an index that does not parse.
    """
    from safetensors import safe_open

    root = Path(directory)
    if (root / SAFETENSORS_INDEX).is_file():
        return WeightFiles(root, "safetensors", _index(root, SAFETENSORS_INDEX))
    singles = [root / SAFETENSORS] if (root / SAFETENSORS).is_file() else []
    singles = singles or sorted(root.glob("*.safetensors"))
    if singles:
        mapping = {}
        for path in singles:
            with safe_open(str(path), framework="pt") as handle:
                mapping.update(dict.fromkeys(handle.keys(), path.name))
        return WeightFiles(root, "safetensors", mapping)
    if (root / BIN_INDEX).is_file():
        return WeightFiles(root, "bin", _index(root, BIN_INDEX))
    if (root / BIN).is_file():
        import torch

        state = torch.load(root / BIN, map_location="cpu", mmap=True, weights_only=True)
        return WeightFiles(root, "bin", dict.fromkeys(state, BIN))
    raise FileNotFoundError(
        f"HF checkpoint {root}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or "
        f"{BIN_INDEX})"
    )


def tensor_shapes(files: WeightFiles) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from safetensors headers or memory-mapped ``.bin`` files."""
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in files.tensor_file.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        path = files.directory / file
        if files.kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                present = set(handle.keys())
                for name in names:
                    if name in present:
                        shapes[name] = tuple(handle.get_slice(name).get_shape())
        else:
            import torch

            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            for name in names:
                if name in state:
                    shapes[name] = tuple(state[name].shape)
    return shapes


def expected_shapes(config: GPTModelConfig, architecture: str) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a model of ``config`` written as ``architecture``."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    head_dim = config.kv_channels or hidden // heads
    ffn = config.ffn_hidden_size or 4 * hidden
    vocab = config.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        out[p + "self_attn.k_proj.weight"] = (groups * head_dim, hidden)
        out[p + "self_attn.v_proj.weight"] = (groups * head_dim, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if architecture == "Qwen2ForCausalLM":
            out[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
            out[p + "self_attn.k_proj.bias"] = (groups * head_dim,)
            out[p + "self_attn.v_proj.bias"] = (groups * head_dim,)
        if architecture == "Qwen3ForCausalLM":
            out[p + "self_attn.q_norm.weight"] = (head_dim,)
            out[p + "self_attn.k_norm.weight"] = (head_dim,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
        out[p + "mlp.gate_proj.weight"] = (ffn, hidden)
        out[p + "mlp.up_proj.weight"] = (ffn, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, ffn)
    out["model.norm.weight"] = (hidden,)
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = (vocab, hidden)
    return out


def weight_problems(
    files: WeightFiles, config: GPTModelConfig, hf: dict[str, Any], tensor_model_parallel_size: int
) -> list[str]:
    """Missing tensors, shapes that disagree with ``config.json``, and sizes the TP split needs.

    Tensors the file has beyond the expected ones (``rotary_emb.inv_freq`` of old exports, a
    ``lm_head`` next to tied embeddings) are ignored.
    """
    problems: list[str] = []
    expected = expected_shapes(config, architecture_of(hf) or "")
    found = tensor_shapes(files)
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.append(
            f"{len(missing)} tensor(s) missing from the weights: {', '.join(missing[:5])}{more}"
        )
    wrong = [
        f"{name}: weights {found[name]}, config.json implies {shape}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != shape
    ]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        problems.append("shape mismatch: " + "; ".join(wrong[:3]) + more)
    tp = tensor_model_parallel_size
    if config.vocab_size % tp:
        problems.append(
            f"vocab_size={config.vocab_size} is not divisible by tensor_model_parallel_size={tp} "
            "(the embedding rows are split evenly across TP ranks)"
        )
    problems += config.layout_problems(tp, who="model")
    return problems
