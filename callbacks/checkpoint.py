"""Run checkpoints as a Lightning callback (implemented in ``kd_module.run_checkpoint``)."""

from __future__ import annotations

from kd_module.run_checkpoint import RunCheckpoint

__all__ = ["RunCheckpoint"]
