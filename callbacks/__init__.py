"""Lightning callbacks for distillation runs.

Imported lazily so that ``import callbacks`` stays cheap (no Lightning, megatron or ModelOpt).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LatencyProfiler", "ManualGC", "RunCheckpoint"]

_EXPORTS = {
    "ManualGC": "callbacks.manual_gc",
    "LatencyProfiler": "callbacks.latency_profiler",
    "RunCheckpoint": "callbacks.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
