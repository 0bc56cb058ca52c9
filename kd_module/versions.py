"""What a run records about itself: the installed stack's versions, and configs as JSON."""

from __future__ import annotations

import platform
from dataclasses import asdict, is_dataclass
from typing import Any

PACKAGES = ("torch", "lightning", "megatron-core", "nvidia-modelopt", "nemo-run", "megatron-kd")


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (for summaries and benchmark results)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
