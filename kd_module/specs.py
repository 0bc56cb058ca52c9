"""The grouped arguments of the entry points: the teacher, the run, the offline cache.

:func:`~kd_module.api.distill` and :func:`~kd_module.offline.job.build_teacher_cache` take these
small dataclasses instead of a dozen flat keywords, and recipes build them as ``run.Config``
pieces, so that the command line overrides their fields by dotted paths
(``teacher.checkpoint=/ckpt``, ``job.name=exp1``, ``offline.loss_mode=renormalized``).
The entry points take the :class:`RunConfig` as ``job``, not ``run``: nemo-run's command line
(0.11.1) takes every argument that starts with ``run`` for its own options (``run.name=`` names
its experiment; ``run_config.name=`` is refused), so such a group could not be overridden.

They live in one module of their own, not beside one owner, because both entry points and every
recipe share them and the command line must import them cheaply: this module imports neither
torch nor Lightning, megatron or ModelOpt (only :class:`~kd_module.models.gpt.GPTModelConfig`,
which is light too).

The flat keywords of the release before (``teacher_checkpoint=``, ``log_dir=``, ...) are mapped
onto the groups in one place, :func:`fold_flat_keywords`, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from kd_module.models.gpt import GPTModelConfig
from kd_module.rules import Problems

CKPT_FORMATS = ("auto", "torch_dist", "torch", "hf")
"""Values of :attr:`TeacherSpec.ckpt_format`."""
OFFLINE_LOSS_MODES = ("tail", "renormalized")
"""Values of :attr:`OfflineConfig.loss_mode`."""


@dataclass
class TeacherSpec:
    """Which teacher to distill from: its weights and its architecture."""

    checkpoint: str | None = None
    """The teacher's weights: a megatron checkpoint (Megatron-LM's ``--export-kd-teacher-load``)
    or a local Hugging Face model directory (its ``config.json`` gives the architecture and its
    tokenizer the data's default); ``None`` builds a randomly initialized teacher (tests only)."""
    config: GPTModelConfig | None = None
    """The teacher's architecture; ``None`` reads :attr:`model_config` or the checkpoint's
    ``model_config.yaml`` over the student's arguments."""
    model_config: str | None = None
    """A NeMo-style ``model_config.yaml`` of the teacher (``--export-kd-teacher-model-config``)."""
    ckpt_format: str = "auto"
    """``auto``, ``torch_dist``, ``torch`` (``--export-kd-teacher-ckpt-format``) or ``hf`` (a
    Hugging Face model directory: ``config.json`` and safetensors or ``pytorch_model*.bin``)."""

    def __post_init__(self) -> None:
        problems = Problems()
        problems.one_of("ckpt_format", self.ckpt_format, CKPT_FORMATS)
        problems.raise_if_any("teacher spec")


@dataclass
class RunConfig:
    """Where a run writes and what it keeps: logs, ``summary.json``, checkpoints, the export."""

    log_dir: str = "runs"
    """Root of run directories."""
    name: str = "default"
    """Run name; logs, checkpoints and ``summary.json`` go to ``<log_dir>/<name>``."""
    checkpoint_every_n_steps: int | None = None
    """Save a run checkpoint (student, optimizer, schedule, data position, RNG) to
    ``<log_dir>/<name>/checkpoints`` every N steps and at the end; ``None`` saves none."""
    keep_last: int = 2
    """How many run checkpoints to keep."""
    resume: bool = False
    """Continue from the latest complete run checkpoint of this run, if any."""
    export: bool = True
    """Write the final student to ``<log_dir>/<name>/student`` as a plain megatron GPT checkpoint
    with its ``model_config.yaml`` (the next round's teacher)."""
    export_hf: str | None = None
    """Also write the final student as a Hugging Face model directory here (``config.json``,
    safetensors, the data's HF tokenizer, ``generation_config.json``), converted from
    ``<log_dir>/<name>/student`` by global rank 0 after training; needs ``export=True``."""

    def __post_init__(self) -> None:
        problems = Problems()
        problems.positive_int("keep_last", self.keep_last)
        problems.positive_int(
            "checkpoint_every_n_steps", self.checkpoint_every_n_steps, or_none="None"
        )
        if self.export_hf is not None and not self.export:
            problems.add(
                f"export_hf={self.export_hf!r} needs export=True (the HF directory is converted "
                "from the exported student)"
            )
        problems.raise_if_any("run config")


@dataclass
class OfflineConfig:
    """Distill from a teacher cache (``nemo kd cache-teacher``) instead of running a teacher."""

    teacher_cache: str
    """The cache directory; the run's data must be the data the cache was made of (checked
    against its manifest and per sample)."""
    loss_mode: str = "tail"
    """``"tail"`` or ``"renormalized"`` (see
    :class:`~kd_module.offline.module.OfflineDistillationModule`)."""

    def __post_init__(self) -> None:
        problems = Problems()
        problems.one_of("loss_mode", self.loss_mode, OFFLINE_LOSS_MODES)
        problems.raise_if_any("offline config")


GROUPS: dict[str, type] = {
    "teacher": TeacherSpec,
    "job": RunConfig,
    "offline": OfflineConfig,
}
"""The grouped parameters of the entry points and their types."""

FLAT_KEYWORDS: dict[str, tuple[str, str]] = {
    "teacher_checkpoint": ("teacher", "checkpoint"),
    "teacher_model_config": ("teacher", "model_config"),
    "teacher_ckpt_format": ("teacher", "ckpt_format"),
    "log_dir": ("job", "log_dir"),
    "name": ("job", "name"),
    "checkpoint_every_n_steps": ("job", "checkpoint_every_n_steps"),
    "keep_last": ("job", "keep_last"),
    "resume": ("job", "resume"),
    "export": ("job", "export"),
    "teacher_cache": ("offline", "teacher_cache"),
    "offline_loss_mode": ("offline", "loss_mode"),
}
"""Deprecated flat keyword -> (group, field). ``teacher=GPTModelConfig(...)``, the old meaning of
``teacher``, maps to ``teacher.config``."""


def _field_default(cls: type, name: str) -> Any:
    field = cls.__dataclass_fields__[name]
    return field.default if field.default is not dataclasses.MISSING else dataclasses.MISSING


def fold_flat_keywords(entry: str, groups: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """The entry point's groups with its deprecated flat keywords folded in.

    Args:
        entry: the entry point's name, for messages (``"distill"``).
        groups: the grouped parameters as given (``{"teacher": ..., "job": ...}``); only these
            groups' flat keywords are accepted. ``teacher`` may be a
            :class:`~kd_module.models.gpt.GPTModelConfig`: the old meaning of ``teacher``.
        flat: the other keyword arguments of the call.

    Returns:
        ``groups`` with each flat keyword set on its group (a group given as ``None`` is made
        when a flat keyword has a value for it). A ``DeprecationWarning`` names the keywords.

    Raises:
        TypeError: for a keyword that is no flat keyword of this entry point.
        ValueError: when a flat keyword and its group's field are both given, naming both.
    """
    out = dict(groups)
    flat = dict(flat)
    unknown = [key for key in flat if FLAT_KEYWORDS.get(key, ("",))[0] not in groups]
    if unknown:
        raise TypeError(f"{entry}() got an unexpected keyword argument {unknown[0]!r}")
    targets = {key: FLAT_KEYWORDS[key] for key in flat}
    teacher = out.get("teacher")
    if isinstance(teacher, GPTModelConfig):  # the old ``teacher=``: the architecture
        flat["teacher"], targets["teacher"] = teacher, ("teacher", "config")
        out["teacher"] = None
    if not flat:
        return out
    warnings.warn(
        f"{entry}: deprecated keywords, removed in the next release: "
        + ", ".join(f"{key}= (use {'.'.join(targets[key])}=)" for key in flat),
        DeprecationWarning,
        stacklevel=4,  # the caller of the entry point (under its cli_errors wrapper)
    )
    problems = Problems()
    changes: dict[str, dict[str, Any]] = {group: {} for group in groups}
    for key, value in flat.items():
        group, field = targets[key]
        given = out[group]
        if given is not None and getattr(given, field) != _field_default(GROUPS[group], field):
            problems.add(
                f"{key}={value!r} and {group}.{field}={getattr(given, field)!r} are both given; "
                f"keep {group}.{field} only"
            )
        changes[group][field] = value
    problems.raise_if_any(entry)
    for group, values in changes.items():
        if out[group] is not None:
            out[group] = dataclasses.replace(out[group], **values)
        elif any(value is not None for value in values.values()) and _has_required(group, values):
            out[group] = GROUPS[group](**values)
    return out


def _has_required(group: str, values: dict[str, Any]) -> bool:
    """Whether ``values`` sets every field of ``group`` without a default (``offline_loss_mode=``
    without ``teacher_cache=`` made no offline run before either)."""
    cls = GROUPS[group]
    return all(
        values.get(name) is not None
        for name in cls.__dataclass_fields__
        if _field_default(cls, name) is dataclasses.MISSING
    )


def group_problems(groups: dict[str, Any]) -> list[str]:
    """A group that is neither ``None`` nor its dataclass, as messages."""
    return [
        f"{group}={value!r} must be a {GROUPS[group].__name__} or None"
        for group, value in groups.items()
        if value is not None and not isinstance(value, GROUPS[group])
    ]
