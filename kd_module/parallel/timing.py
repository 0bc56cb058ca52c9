"""Wall-clock timing of device work: wait for a CUDA device before reading the clock.

CUDA kernels run asynchronously: ``time.perf_counter()`` read right after launching work measures
the launch, not the work. :func:`synchronized_perf_counter` waits for the device first. On the
CPU, where kernels are synchronous, both do nothing more than read the clock.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` when it is a CUDA device; nothing otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized_perf_counter(device: torch.device | str) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` (when CUDA) has finished."""
    synchronize(device)
    return time.perf_counter()
