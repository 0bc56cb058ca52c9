"""Model checkpoints: save and load a megatron GPT stage, teacher loading, student export.

Two formats, both Megatron-LM's:

- ``torch_dist``: megatron-core's distributed checkpoint (``megatron.core.dist_checkpointing``,
  a ``metadata.json`` plus torch DCP shards). Tensors are stored by global key and shape, so a
  checkpoint saved at one TP/PP layout loads at any other (megatron reshards on load).
- ``torch``: the legacy per-rank files ``mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`` holding
  ``{"model": state_dict, "checkpoint_version": 3.0, "iteration": N}``. They load only at the
  layout they were saved at.

Both may sit in Megatron-LM's directory layout (``<root>/iter_0000100/...`` plus
``<root>/latest_checkpointed_iteration.txt``); :func:`resolve_checkpoint_dir` follows it. A
NeMo 2 directory (``weights/`` with the distributed checkpoint) is followed too.

Saving is atomic: everything is written into a hidden sibling directory that is renamed to the
final name only when every rank has finished, so an interrupted save never leaves a partial
checkpoint under the final name and never damages the checkpoint already there.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from kd_module.checkpoints.atomic import replace_directory, write_text_atomic
from kd_module.models.gpt import GPTModelConfig, unwrap
from kd_module.nemo_format.keys import MODEL_CONFIG_FILE
from kd_module.nemo_format.writer import to_nemo_model_config
from kd_module.parallel import collectives
from kd_module.upstream.modelopt import hidden_state_dict_prefixes

logger = logging.getLogger(__name__)

CKPT_FORMATS = ("torch_dist", "torch")
"""Checkpoint formats that can be saved."""
LOAD_FORMATS = ("auto", "torch_dist", "torch", "hf")
"""Checkpoint formats that can be loaded: ``hf`` is a Hugging Face model directory
(:mod:`kd_module.hf`), ``auto`` detects."""
TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron-LM's file naming the latest iteration (or ``release``) of a checkpoint root."""
LEGACY_FILE = "model_optim_rng.pt"
"""Megatron-LM's per-rank file of a legacy ``torch`` checkpoint."""
CHECKPOINT_VERSION = 3.0
"""Megatron-LM's ``checkpoint_version`` of the current state-dict layout."""
DIST_METADATA_FILE = "metadata.json"
"""megatron-core's marker of a distributed checkpoint (``dist_checkpointing.core.CONFIG_FNAME``)."""

_LEGACY_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_ITER_DIR = re.compile(r"^iter_\d{7}$")
_EXTRA_STATE = "_extra_state"
# Checkpoint tensors that are not model weights (Megatron-LM's optimizer state).
_NON_MODEL_PREFIXES = ("optimizer.",)
_HIDDEN_PREFIXES = hidden_state_dict_prefixes()
_SHOWN_KEYS = 5


# ---------------------------------------------------------------- finding checkpoints


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The directory that holds the checkpoint files for ``path``.

    Accepts a Megatron-LM checkpoint root (``latest_checkpointed_iteration.txt`` names an
    iteration, or ``release``), an ``iter_NNNNNNN`` directory, a NeMo 2 directory with the
    weights under ``weights/``, or a directory holding the checkpoint itself.

    Args:
        path: the checkpoint path as the user gave it.

    Returns:
        The directory to read the checkpoint from.

    Raises:
        FileNotFoundError: ``path`` does not exist, or the iteration its tracker file names does
            not.
        ValueError: ``path`` is a file, or its tracker file is unreadable.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"checkpoint {root}: no such directory; expected a checkpoint directory "
            f"(torch_dist or torch format, or a Megatron-LM root with {TRACKER_FILE})"
        )
    if not root.is_dir():
        raise ValueError(f"checkpoint {root}: is a file; expected a checkpoint directory")
    tracker = root / TRACKER_FILE
    if tracker.is_file():
        content = tracker.read_text().strip()
        if content == "release":
            directory = root / "release"
        elif content.isdigit():
            directory = root / f"iter_{int(content):07d}"
        else:
            raise ValueError(
                f"checkpoint {root}: {TRACKER_FILE} holds {content!r}; expected an iteration "
                "number or 'release'"
            )
        if not directory.is_dir():
            raise FileNotFoundError(
                f"checkpoint {root}: {TRACKER_FILE} names {directory.name}, which does not exist"
            )
        return directory
    weights = root / "weights"
    if not (root / DIST_METADATA_FILE).is_file() and (weights / DIST_METADATA_FILE).is_file():
        return weights
    return root


def detect_checkpoint_format(path: str | os.PathLike[str]) -> str:
    """``"torch_dist"``, ``"torch"`` or ``"hf"``: the format of the checkpoint at ``path``.

    ``path`` is first resolved with :func:`resolve_checkpoint_dir`.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: the directory is empty, or holds no known format.
    """
    from kd_module.hf.weights import is_hf_checkpoint

    directory = resolve_checkpoint_dir(path)
    if (directory / DIST_METADATA_FILE).is_file():
        return "torch_dist"
    if _legacy_rank_dirs(directory):
        return "torch"
    if is_hf_checkpoint(directory):
        return "hf"
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        raise ValueError(
            f"checkpoint {directory}: empty directory; expected a torch_dist checkpoint "
            f"({DIST_METADATA_FILE}), a torch checkpoint (mp_rank_* directories) or a Hugging "
            "Face model directory (config.json and safetensors)"
        )
    raise ValueError(
        f"checkpoint {directory}: no known format; expected {DIST_METADATA_FILE} (torch_dist), "
        f"mp_rank_* directories (torch) or config.json with safetensors (hf), found {_few(names)}"
    )


def _legacy_rank_dirs(directory: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp rank) -> directory for every ``mp_rank_*`` directory."""
    found = {}
    for child in directory.iterdir():
        match = _LEGACY_DIR.match(child.name)
        if match and child.is_dir():
            found[(int(match.group(1)), int(match.group(2) or 0))] = child
    return found


def _legacy_rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _few(names: Any) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_SHOWN_KEYS])
    more = f" and {len(names) - _SHOWN_KEYS} more" if len(names) > _SHOWN_KEYS else ""
    return f"{len(names)}: {shown}{more}" if len(names) > 1 else shown


# ---------------------------------------------------------------- distributed helpers


def _gather_unique(items: list[str]) -> list[str]:
    """The union of every rank's ``items``, in rank order, without repeats."""
    merged: list[str] = []
    for rank_items in collectives.all_gather_object(items):
        merged.extend(item for item in rank_items if item not in merged)
    return merged


def _raise_if_any(problems: list[str]) -> None:
    """Raise one ValueError on every rank when any rank reported a problem."""
    merged = _gather_unique(problems)
    if merged:
        raise ValueError("; ".join(merged))


def _raise_on_shape_mismatch(where: Any, mismatches: list[str]) -> None:
    """One error on every rank listing a few ``key: checkpoint (..), model (..)`` entries."""
    merged = sorted(_gather_unique(mismatches))
    if merged:
        more = f" and {len(merged) - _SHOWN_KEYS} more" if len(merged) > _SHOWN_KEYS else ""
        raise ValueError(
            f"checkpoint {where}: shape mismatch for {len(merged)} tensors (the model config "
            f"does not match the checkpoint's architecture): "
            + "; ".join(merged[:_SHOWN_KEYS])
            + more
        )


def _layout() -> tuple[int, int, int, int, bool]:
    """(tp size, tp rank, pp size, pp rank, writes legacy files) of this rank."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0, 1, 0, True
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0,
    )


# ---------------------------------------------------------------- saving


def save_model_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    ckpt_format: str = "torch_dist",
    model_config: GPTModelConfig | None = None,
    tokenizer: dict[str, Any] | None = None,
    iteration: int | None = None,
) -> Path:
    """Save this rank's megatron GPTModel stage; all ranks call it together.

    Args:
        model: the local pipeline stage (a megatron ``GPTModel``, possibly DDP-wrapped).
        path: checkpoint directory (or, with ``iteration``, Megatron-LM's checkpoint root).
        ckpt_format: ``torch_dist`` (resharding on load) or ``torch`` (legacy per-rank files).
        model_config: the architecture; written as NeMo-style ``model_config.yaml`` at the root
            of ``path`` so that the checkpoint can serve as a teacher.
        tokenizer: tokenizer section written into ``model_config.yaml``.
        iteration: when given, save into ``<path>/iter_{iteration:07d}`` and point
            ``<path>/latest_checkpointed_iteration.txt`` at it (Megatron-LM's layout).

    Returns:
        The directory holding the checkpoint files. A checkpoint already at that directory is
        replaced only once the new one is complete.

    Raises:
        ValueError: for an unknown format or a negative iteration.
        RuntimeError: on the other ranks when saving failed on one (that rank raises its own
            error); the previous checkpoint is then left as it was.

    Examples:
        ``save_model_checkpoint(model, "/ckpt/student", model_config=student_config)``
    """
    model = unwrap(model)
    return _save(
        model.sharded_state_dict if ckpt_format == "torch_dist" else model.state_dict,
        model,
        path,
        ckpt_format,
        model_config,
        tokenizer,
        iteration,
    )


def _save(
    state_fn: Callable[[], dict[str, Any]],
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    ckpt_format: str,
    model_config: GPTModelConfig | None,
    tokenizer: dict[str, Any] | None,
    iteration: int | None,
) -> Path:
    problems = []
    if ckpt_format not in CKPT_FORMATS:
        problems.append(f"ckpt_format={ckpt_format!r} is not one of {', '.join(CKPT_FORMATS)}")
    if iteration is not None and (not isinstance(iteration, int) or iteration < 0):
        problems.append(f"iteration={iteration!r} must be a non-negative integer or None")
    if problems:
        raise ValueError("save checkpoint: " + "; ".join(problems))

    root = Path(path)
    final = root / f"iter_{iteration:07d}" if iteration is not None else root
    staging = final.parent / f".{final.name}.incomplete"
    rank = collectives.rank()

    def prepare() -> None:
        if rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()

    def write() -> None:
        if ckpt_format == "torch_dist":
            _save_torch_dist(state_fn(), staging, iteration)
        else:
            _save_legacy(state_fn(), staging, iteration)
        if rank == 0 and model_config is not None and iteration is None:
            _write_model_config(staging, model_config, model, tokenizer)

    def publish() -> None:
        if rank == 0:
            replace_directory(staging, final)
            if iteration is not None:
                if model_config is not None:
                    _write_model_config(root, model_config, model, tokenizer)
                write_text_atomic(root / TRACKER_FILE, f"{iteration}\n")

    def discard() -> None:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)

    for step in (prepare, write, publish):
        _on_every_rank(step, final, discard)
    return final


def _on_every_rank(step: Callable[[], None], final: Path, cleanup: Callable[[], None]) -> None:
    """Run ``step`` on every rank; if it fails anywhere, clean up and raise on every rank.

    Ranks exchange their outcome instead of meeting at a barrier, so a failure on one rank
    cannot leave the others waiting; the failing rank re-raises its own exception.
    """
    failure: Exception | None = None
    try:
        step()
    except Exception as exc:
        failure = exc
    outcome = (
        None
        if failure is None
        else f"rank {collectives.rank()}: {type(failure).__name__}: {failure}"
    )
    errors = [error for error in collectives.all_gather_object(outcome) if error is not None]
    if not errors:
        return
    cleanup()
    collectives.barrier()
    if failure is not None:
        raise failure
    raise RuntimeError(f"save checkpoint {final}: failed on another rank: {'; '.join(errors)}")


def _save_torch_dist(sharded: dict[str, Any], directory: Path, iteration: int | None) -> None:
    from megatron.core import dist_checkpointing

    # Megatron-LM's nesting: the model under "model", the version and iteration in common.pt.
    state = {"model": sharded, "checkpoint_version": CHECKPOINT_VERSION}
    state["iteration"] = iteration if iteration is not None else 0
    dist_checkpointing.save(state, str(directory))


def _save_legacy(state_dict: dict[str, Any], directory: Path, iteration: int | None) -> None:
    tp_size, tp_rank, pp_size, pp_rank, writes = _layout()
    if not writes:
        return
    rank_dir = directory / _legacy_rank_dir_name(tp_rank, pp_rank, pp_size)
    rank_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": state_dict,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration if iteration is not None else 0,
        },
        rank_dir / LEGACY_FILE,
    )


def _write_model_config(
    directory: Path,
    model_config: GPTModelConfig,
    model: torch.nn.Module,
    tokenizer: dict[str, Any] | None,
) -> None:
    parameter = next(iter(model.parameters()), None)
    precision = str(parameter.dtype).removeprefix("torch.") if parameter is not None else None
    data = to_nemo_model_config(model_config, precision=precision, tokenizer=tokenizer)
    write_text_atomic(directory / MODEL_CONFIG_FILE, yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------- loading


def load_model_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    ckpt_format: str = "auto",
    strict: bool = True,
) -> None:
    """Load weights into an already built model stage at the current parallel layout.

    ``torch_dist`` checkpoints load at any TP/PP layout; legacy ``torch`` checkpoints only at the
    layout they were saved at. Megatron-LM's optimizer tensors in a checkpoint are ignored, and
    so are megatron ``_extra_state`` entries the model or the checkpoint lacks. The checkpoint
    is only read.

    Args:
        model: the local pipeline stage (a megatron ``GPTModel``), built for the checkpoint's
            architecture.
        path: checkpoint directory (see :func:`resolve_checkpoint_dir`).
        ckpt_format: ``auto`` (detect), ``torch_dist`` or ``torch``.
        strict: when ``True``, tensors the model has and the checkpoint lacks ("missing") or the
            checkpoint has and the model lacks ("unexpected") are an error; when ``False`` they
            are logged and skipped. Shape mismatches are always an error.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: on every rank, for a format problem, a corrupt file, missing or unexpected
            keys, a shape mismatch, or a legacy checkpoint at another layout.

    Examples:
        ``load_model_checkpoint(teacher, "/ckpt/llama31_8b")`` (any layout for torch_dist).
    """
    if ckpt_format not in LOAD_FORMATS:
        raise ValueError(
            f"load checkpoint: ckpt_format={ckpt_format!r} is not one of {', '.join(LOAD_FORMATS)}"
        )
    directory = resolve_checkpoint_dir(path)
    detected = detect_checkpoint_format(directory)
    if ckpt_format != "auto" and ckpt_format != detected:
        raise ValueError(
            f"checkpoint {directory}: ckpt_format={ckpt_format!r} was requested but the "
            f"directory holds a {detected} checkpoint; pass ckpt_format='{detected}' or 'auto'"
        )
    if detected == "hf":
        from kd_module.hf.importer import load_hf_weights

        load_hf_weights(model, directory)
    elif detected == "torch_dist":
        _load_torch_dist(model, directory, strict)
    else:
        _load_legacy(model, directory, strict)


def make_teacher_loader(
    path: str | os.PathLike[str], ckpt_format: str = "auto"
) -> Callable[[torch.nn.Module], None]:
    """``fn(teacher_stage)`` loading ``path`` strictly, for ``build_distillation_model``.

    Examples:
        ``build_distillation_model(..., teacher_loader=make_teacher_loader("/ckpt/8b"))``
    """
    return functools.partial(
        load_model_checkpoint, path=os.fspath(path), ckpt_format=ckpt_format, strict=True
    )


def make_student_init(
    path: str | os.PathLike[str] | None, ckpt_format: str = "auto"
) -> Callable[[torch.nn.Module], None] | None:
    """``fn(student_stage)`` loading ``path``, or ``None`` (train the student from scratch).

    Examples:
        ``build_distillation_model(..., student_init=make_student_init("/ckpt/pruned_4b"))``
    """
    if path is None:
        return None
    return make_teacher_loader(path, ckpt_format)


def _sharded_tensors(sharded: Any) -> list[Any]:
    """Every ``ShardedTensor`` in a sharded state dict (factories built)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out: list[Any] = []
    stack = [sharded]
    while stack:
        value = stack.pop()
        if isinstance(value, ShardedTensor):
            out.append(value)
        elif isinstance(value, ShardedTensorFactory):
            stack.append(value.build())
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return out


def _key_problems(missing: set[str], unexpected: set[str], directory: Path, strict: bool) -> str:
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint (the model has them) {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected in the checkpoint (the model lacks them) {_few(unexpected)}")
    if not parts:
        return ""
    message = (
        f"checkpoint {directory}: tensors do not match the model: " + "; ".join(parts) + "; "
        "does the model config match the checkpoint's architecture?"
    )
    if not strict:
        logger.warning("%s (strict=False: skipped)", message)
        return ""
    return message


def _load_torch_dist(model: torch.nn.Module, directory: Path, strict: bool) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint import CheckpointException

    sharded = model.sharded_state_dict()
    tensors = _sharded_tensors(sharded)
    problems: list[str] = []
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as exc:
        problems.append(
            f"checkpoint {directory}: cannot read the torch_dist metadata (truncated or corrupt "
            f"file?): {type(exc).__name__}: {exc}"
        )
        metadata = {}
    _raise_if_any(problems)

    saved = {
        key: tuple(value.global_shape)
        for key, value in metadata.items()
        if not key.startswith(_NON_MODEL_PREFIXES)
    }
    _raise_on_shape_mismatch(
        directory,
        sorted(
            f"{t.key}: checkpoint {saved[t.key]}, model {tuple(t.global_shape)}"
            for t in tensors
            if t.key in saved and saved[t.key] != tuple(t.global_shape)
        ),
    )
    requested = set().union(*collectives.all_gather_object({t.key for t in tensors}))
    message = _key_problems(requested - set(saved), set(saved) - requested, directory, strict)
    if message:
        problems.append(message)
    _raise_if_any(problems)

    try:
        loaded, _, _ = dist_checkpointing.load(
            {"model": sharded}, str(directory), strict=StrictHandling.RETURN_ALL
        )
    # torch DCP's CheckpointException derives from BaseException.
    except (Exception, CheckpointException) as exc:
        problems.append(
            f"checkpoint {directory}: loading failed (truncated or corrupt file?): "
            f"{type(exc).__name__}: {exc}"
        )
    _raise_if_any(problems)
    _assign(model, loaded["model"], directory, strict)


def _assign(model: torch.nn.Module, state_dict: dict[str, Any], directory: Path, strict: bool):
    """``model.load_state_dict`` ignoring ``_extra_state`` that only one side has."""
    own = model.state_dict()
    state_dict = {
        key: value
        for key, value in state_dict.items()
        if key in own or not key.endswith(_EXTRA_STATE)
    }
    result = model.load_state_dict(state_dict, strict=False)
    missing = {k for k in result.missing_keys if not k.endswith(_EXTRA_STATE)}
    unexpected = set(result.unexpected_keys)
    _raise_if_any([m for m in [_key_problems(missing, unexpected, directory, strict)] if m])


def _load_legacy(model: torch.nn.Module, directory: Path, strict: bool) -> None:
    tp_size, tp_rank, pp_size, pp_rank, _ = _layout()
    rank_dirs = _legacy_rank_dirs(directory)
    saved_tp = max(tp for tp, _ in rank_dirs) + 1
    saved_pp = max(pp for _, pp in rank_dirs) + 1
    if (saved_tp, saved_pp) != (tp_size, pp_size):
        raise ValueError(
            f"checkpoint {directory}: a legacy torch checkpoint saved at TP={saved_tp}, "
            f"PP={saved_pp} cannot be loaded at TP={tp_size}, PP={pp_size}: legacy checkpoints "
            "cannot be resharded; load it at the layout it was saved at and save it with "
            "ckpt_format='torch_dist', which loads at any layout"
        )
    problems: list[str] = []
    file = directory / _legacy_rank_dir_name(tp_rank, pp_rank, pp_size) / LEGACY_FILE
    state_dict: dict[str, Any] = {}
    if not file.is_file():
        problems.append(
            f"checkpoint {file}: no such file (expected for TP rank {tp_rank}, PP rank {pp_rank})"
        )
    else:
        try:
            # Megatron-LM's files hold an argparse Namespace too: full unpickling, trusted files.
            content = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:
            problems.append(
                f"checkpoint {file}: cannot be read (truncated or corrupt file?): "
                f"{type(exc).__name__}: {exc}"
            )
        else:
            if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
                found = sorted(content) if isinstance(content, dict) else type(content).__name__
                problems.append(
                    f"checkpoint {file}: expected a dict with the model state dict under "
                    f"'model' (Megatron-LM's layout), found {found}"
                )
            else:
                state_dict = content["model"]
    _raise_if_any(problems)

    own = model.state_dict()
    _raise_on_shape_mismatch(
        file,
        sorted(
            f"{key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
            for key, value in state_dict.items()
            if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape
        ),
    )
    _assign(model, state_dict, directory, strict)


# ---------------------------------------------------------------- exporting the student


def export_student(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    model_config: GPTModelConfig,
    ckpt_format: str = "torch_dist",
    tokenizer: dict[str, Any] | None = None,
) -> Path:
    """Save the student as a plain megatron-core GPT checkpoint; all ranks call it together.

    The result holds the student's weights only (no teacher, no distillation loss modules such
    as the projection, no ModelOpt state) under the plain ``GPTModel`` keys, plus a NeMo-style
    ``model_config.yaml``: it loads into a plain ``GPTModel`` with :func:`load_model_checkpoint`
    and can be the teacher of the next distillation round.

    Args:
        model: a ModelOpt ``DistillationModel`` (possibly wrapped by DDP / Float16Module), or a
            plain student stage.
        path: the export directory.
        model_config: the student's architecture.
        ckpt_format: ``torch_dist`` or ``torch``.
        tokenizer: tokenizer section for ``model_config.yaml``.

    Returns:
        The export directory.

    Examples:
        ``export_student(parts.model, "/ckpt/llama32_1b_distilled", student_config)``
    """
    core = unwrap(model)

    def student_state() -> dict[str, Any]:
        if not hasattr(core, "hide_teacher_model"):
            state = core.sharded_state_dict() if ckpt_format == "torch_dist" else core.state_dict()
        else:
            with core.hide_teacher_model(), core.hide_loss_modules():
                if ckpt_format == "torch_dist":
                    state = core.sharded_state_dict()
                else:
                    state = core.state_dict()
        leaked = [key for key in state if key.startswith(_HIDDEN_PREFIXES)]
        if leaked:
            raise RuntimeError(f"export student: teacher or loss tensors left: {_few(leaked)}")
        return state

    return _save(student_state, core, path, ckpt_format, model_config, tokenizer, None)
