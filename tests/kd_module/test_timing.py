"""kd_module.parallel.timing: the clock waits for a CUDA device's queued work, and only for CUDA."""

from __future__ import annotations

import time

import pytest
import torch

from kd_module.parallel.timing import synchronize, synchronized_perf_counter
from tests.helpers import gpu_sleep


def test_cpu_devices_never_touch_cuda(monkeypatch):
    """On a CPU device (object or string) nothing CUDA is called and the clock is perf_counter's."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize called for a CPU device")

    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    synchronize(torch.device("cpu"))
    synchronize("cpu")
    before = time.perf_counter()
    assert before <= synchronized_perf_counter(torch.device("cpu")) <= time.perf_counter()


@pytest.mark.gpu
def test_cuda_clock_waits_for_queued_work():
    """With 200 ms of GPU work queued, an event behind it is pending; the synchronized clock
    returns only once that event has completed, well after an unsynchronized read (at least 50 ms:
    the spin's length follows the GPU's clock, which an H200 changes under load)."""
    device = torch.device("cuda", torch.cuda.current_device())
    synchronize(device)
    gpu_sleep(200.0)
    after_work = torch.cuda.Event()
    after_work.record()
    launched = time.perf_counter()
    assert not after_work.query()  # still queued: perf_counter alone would not have waited
    finished = synchronized_perf_counter(device)
    assert after_work.query()
    assert finished - launched >= 0.05
