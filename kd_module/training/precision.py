"""The one table of floating-point precisions: our short names, torch dtypes, Lightning strings.

A run's ``precision`` (:data:`PRECISIONS`), the teacher cache's ``dtype`` and the ``precision``
of a NeMo ``model_config.yaml`` (:func:`dtype_name_of`) all read this table. It imports torch
only when a dtype is asked for, so recipes and the CLI can list precisions without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kd_module.rules import Problems

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Precision:
    """One floating-point format."""

    name: str
    """Our short name (``bf16``)."""
    dtype_name: str
    """The ``torch`` attribute of its dtype (``bfloat16``)."""
    lightning: str
    """Lightning's precision string, as NeMo writes it in ``model_config.yaml``."""
    aliases: tuple[str, ...]
    """Spellings NeMo and Lightning use for it (lower case), read from model configs."""

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)


DTYPES: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision(
            "fp16",
            "float16",
            "16-mixed",
            ("16", "16-mixed", "16-true", "fp16", "fp16-mixed", "float16", "half"),
        ),
        Precision(
            "bf16", "bfloat16", "bf16-mixed", ("bf16", "bf16-mixed", "bf16-true", "bfloat16")
        ),
        Precision("fp32", "float32", "32", ("32", "32-true", "fp32", "float32")),
    )
}
"""Every format, by short name."""

PRECISIONS: dict[str, Precision] = {name: DTYPES[name] for name in ("fp32", "bf16")}
"""Precisions a run trains (or caches a teacher) in: bf16 parameters need CUDA."""

ALIASES: dict[str, str] = {alias: p.dtype_name for p in DTYPES.values() for alias in p.aliases}
"""NeMo/Lightning precision spelling -> torch dtype name."""


def dtype_name_of(spelling: object) -> str | None:
    """The torch dtype name of a NeMo/Lightning precision spelling (any case), or ``None``."""
    if isinstance(spelling, bool):
        return None
    return ALIASES.get(str(spelling).lower())


def lightning_precision(dtype_name: str) -> str:
    """Lightning's precision string for a torch dtype name (unknown names are returned as is)."""
    for p in DTYPES.values():
        if p.dtype_name == dtype_name:
            return p.lightning
    return dtype_name


def precision_problems(precision: object, cuda: bool) -> list[str]:
    """``precision`` is a run precision, and one this machine (CUDA or not) can run."""
    problems = Problems()
    if problems.one_of("precision", precision, PRECISIONS) and precision != "fp32" and not cuda:
        problems.add(
            f"precision={precision!r} needs accelerator='gpu'; use precision='fp32' on CPU"
        )
    return list(problems)
