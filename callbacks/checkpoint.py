"""Run checkpoints as a Lightning callback (implemented in ``kd_module.checkpoints.run``)."""

from __future__ import annotations

from kd_module.checkpoints.run import RunCheckpoint

__all__ = ["RunCheckpoint"]
