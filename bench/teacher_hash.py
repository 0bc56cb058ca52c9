"""Benchmark: the teacher integrity hash, streamed (now) against whole-tensor host copies (before).

``kd_module.guards.teacher_digests`` hashes every teacher tensor when the model is built and
again at the end of training. It used to copy each tensor to the host (``.cpu()``) and copy it
again into a ``bytes`` object (``.numpy().tobytes()``): the teacher twice on the host. Now a CPU
tensor is hashed where it lies and a device tensor goes through one reused host buffer of
``chunk_mb``. Both give the same digests (checked here).

It hashes a module holding ``--total-mb`` of bf16 tensors (on CUDA when available) ``--repeats``
times with each method, interleaved, and reports the median wall time and the largest host
memory growth of each (peak RSS over the call minus RSS before it, see :mod:`bench._common`),
and their ratios, new / old.

The last line of stdout is one JSON object::

    {"machine": {...}, "settings": {...},
     "old": {"time_s": ..., "peak_host_mb": ...}, "new": {"time_s": ..., "peak_host_mb": ...},
     "time_ratio": ..., "memory_ratio": ..., "digests_equal": true}

Examples:
    .venv/bin/python -m bench.teacher_hash --quick
    .venv/bin/python -m bench.teacher_hash --total-mb 512 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench._common import _hwm_mb, _reset_hwm, _rss_mb, machine_description

FULL_TOTAL_MB = 384
QUICK_TOTAL_MB = 32
FULL_CHUNK_MB = 64
QUICK_CHUNK_MB = 4
NUM_TENSORS = 8
_MB = 1024 * 1024


def previous_tensor_sha256(tensor: torch.Tensor) -> str:
    """``tensor_sha256`` as it was: a host copy of the tensor, then a ``bytes`` copy of that."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def previous_teacher_digests(model: torch.nn.Module) -> dict[str, str]:
    """``teacher_digests`` as it was, over :func:`previous_tensor_sha256`."""
    digests = {name: previous_tensor_sha256(param) for name, param in model.named_parameters()}
    for name, buffer in model.named_buffers():
        if buffer is not None and buffer.is_floating_point():
            digests[name] = previous_tensor_sha256(buffer)
    return dict(sorted(digests.items()))


def _teacher(total_mb: int, device: torch.device) -> torch.nn.Module:
    """``NUM_TENSORS`` bf16 parameters adding up to ``total_mb``, random so that bytes differ."""
    generator = torch.Generator().manual_seed(0)
    per_tensor = total_mb * _MB // NUM_TENSORS // 2  # bf16 elements
    columns = 1024
    params = torch.nn.ParameterList()
    for _ in range(NUM_TENSORS):
        values = torch.randn(per_tensor // columns, columns, generator=generator)
        params.append(torch.nn.Parameter(values.bfloat16().to(device), requires_grad=False))
    return params


def _return_freed_memory_to_the_system() -> bool:
    """Fix glibc's mmap threshold at 1 MB, so large blocks are unmapped when freed (Linux).

    glibc raises the threshold after the first large ``free`` and then keeps freed blocks in the
    heap: a second run of the old method would reuse them and show no RSS growth at all.
    Returns whether the setting took.
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(
            libc.mallopt(m_mmap_threshold, 1024 * 1024)
            and libc.mallopt(m_trim_threshold, 1024 * 1024)
        )
    except (OSError, AttributeError):
        return False


def _measure_host(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """Run ``fn``; its result, host RSS growth at its peak (MB) and wall time (s, synchronized)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _reset_hwm()
    before = _rss_mb()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return result, _hwm_mb() - before, seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON summary as the last line of stdout."""
    from kd_module.guards import teacher_digests

    parser = argparse.ArgumentParser(prog="python -m bench.teacher_hash", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="32 MB, for CI (a few seconds)")
    parser.add_argument("--total-mb", type=int, help=f"teacher size (default {FULL_TOTAL_MB})")
    parser.add_argument("--chunk-mb", type=int, help=f"host buffer (default {FULL_CHUNK_MB})")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method")
    parser.add_argument("--device", help="where the teacher lies (default: cuda if available)")
    options = parser.parse_args(argv)
    total_mb = options.total_mb or (QUICK_TOTAL_MB if options.quick else FULL_TOTAL_MB)
    chunk_mb = options.chunk_mb or (QUICK_CHUNK_MB if options.quick else FULL_CHUNK_MB)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    fixed_malloc = _return_freed_memory_to_the_system()
    teacher = _teacher(total_mb, device)
    methods = {
        "old": lambda: previous_teacher_digests(teacher),
        "new": lambda: teacher_digests(teacher, chunk_bytes=chunk_mb * _MB),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, list[float]] = {name: [] for name in methods}
    digests: dict[str, Any] = {}
    for _ in range(options.repeats):
        for name, method in methods.items():
            digests[name], peak_mb, seconds = _measure_host(method, device)
            times[name].append(seconds)
            peaks[name].append(peak_mb)
    results = {
        name: {
            "time_s": round(statistics.median(times[name]), 4),
            "peak_host_mb": round(max(peaks[name]), 1),
        }
        for name in methods
    }
    summary = {
        "machine": machine_description(),
        "settings": {
            "device": str(device),
            "total_mb": total_mb,
            "tensors": NUM_TENSORS,
            "dtype": "bfloat16",
            "chunk_mb": chunk_mb,
            "repeats": options.repeats,
            "malloc_mmap_threshold_fixed": fixed_malloc,
        },
        **results,
        "time_ratio": round(results["new"]["time_s"] / results["old"]["time_s"], 3),
        "memory_ratio": round(
            results["new"]["peak_host_mb"] / max(results["old"]["peak_host_mb"], 1e-9), 3
        ),
        "digests_equal": digests["old"] == digests["new"],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
