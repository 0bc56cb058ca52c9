"""Input rules shared by the entry points (``distill``, ``build_teacher_cache``): each returns
the problems it finds as messages, so that a caller reports all of them at once, before any
expensive work."""

from __future__ import annotations

import os
from typing import Any


def tokenizer_problems(data_tokenizer: Any, teacher_tokenizer: dict[str, Any]) -> list[str]:
    """The teacher's NeMo ``tokenizer:`` section against the data's tokenizer."""
    if not teacher_tokenizer:
        return []
    library = str(teacher_tokenizer.get("library") or "").lower() or None
    aliases = {"hf": "huggingface", "megatron": "huggingface", "byte-level": "byte"}
    library = aliases.get(library, library)
    if library and library != data_tokenizer.library:
        return [
            f"tokenizer: the teacher's model_config.yaml uses library={library!r} but the data "
            f"uses library={data_tokenizer.library!r}; teacher and student must share a tokenizer"
        ]
    return []


def checkpoint_problems(label: str, path: str | None, requested: str) -> list[str]:
    """The checkpoint at ``path`` exists and holds the requested format."""
    if path is None:
        return []
    from kd_module.checkpoints.model import detect_checkpoint_format, resolve_checkpoint_dir

    try:
        found = detect_checkpoint_format(resolve_checkpoint_dir(path))
    except (ValueError, FileNotFoundError) as error:
        return [f"{label}: {error}"]
    if requested not in ("auto", "torch_dist", "torch"):
        return [f"{label}: ckpt_format={requested!r} is not one of auto, torch_dist, torch"]
    if requested not in ("auto", found):
        return [
            f"{label}: ckpt_format={requested!r} was requested but {path} holds a "
            f"{found} checkpoint; use 'auto' or {found!r}"
        ]
    return []


def launch_problems(num_nodes: Any, devices: Any) -> list[str]:
    """``num_nodes x devices`` against the ranks this process was launched with."""
    from kd_module.launch import positive_int_problems

    problems = positive_int_problems(num_nodes=num_nodes, devices=devices)
    if problems:
        return problems
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if num_nodes * devices != world_size:
        how = (
            "this process was not launched with torchrun; run the recipe with "
            f"kd_module.launch.local_executor(devices={devices})"
            if "WORLD_SIZE" not in os.environ
            else f"the launch has {world_size} ranks"
        )
        return [f"num_nodes x devices = {num_nodes * devices} ranks are expected but {how}"]
    return []
