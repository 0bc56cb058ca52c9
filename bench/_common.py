"""Small helpers shared by the benchmarks: a machine description and peak-memory measurement.

On CPU, peak memory is the growth of the process's resident set: the kernel's high-water mark
(``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs`` (Linux), and the growth is
``VmHWM`` after the measured code minus ``VmRSS`` before it. On CUDA it is
``torch.cuda.max_memory_allocated`` growth.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

_MB = 1024 * 1024


def machine_description() -> dict[str, Any]:
    """Where the numbers were measured: CPU/GPU, cores, memory, library versions."""
    description: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gb": round(_meminfo_kb("MemTotal") / 1024 / 1024, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        from importlib.metadata import version

        description["megatron_core"] = version("megatron-core")
        description["nvidia_modelopt"] = version("nvidia-modelopt")
    except Exception:  # metadata is informative only
        pass
    return description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kb(key: str, path: str = "/proc/meminfo") -> int:
    try:
        with open(path) as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_mb() -> float:
    return _meminfo_kb("VmRSS", "/proc/self/status") / 1024


def _hwm_mb() -> float:
    return _meminfo_kb("VmHWM", "/proc/self/status") / 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """Run ``fn`` once; return its result, the peak memory it added (MB) and its wall time (s)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) - before) / _MB
        return result, peak, seconds
    _reset_hwm()
    before = _rss_mb()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, _hwm_mb() - before, seconds
