"""Private megatron-core internals we rely on, one named accessor each (written against 0.16.1).

The CPU bridge (:mod:`kd_module.parallel.runtime`) also patches megatron modules' public
``torch`` global and some functions' code objects; that is documented there, next to the lines
it covers. megatron is imported inside the functions, when they are called.
"""

from __future__ import annotations

from typing import Any


def rng_tracker() -> Any | None:
    """megatron's process-wide RNG states tracker as it is, ``None`` when none was created.

    megatron-core 0.16.1 keeps it in the private global ``_CUDA_RNG_STATE_TRACKER`` of
    ``tensor_parallel/random.py``. The public ``get_cuda_rng_tracker()`` creates a
    ``CudaRNGStatesTracker`` when there is none; seeding and tear-down on the CPU must read the
    tracker without creating one.

    Returns:
        The tracker, or ``None``.
    """
    from megatron.core.tensor_parallel import random as mp_random

    return mp_random._CUDA_RNG_STATE_TRACKER


def swap_rng_tracker(tracker: Any | None, initialized: bool = True) -> tuple[Any | None, bool]:
    """Make ``tracker`` megatron's RNG states tracker; returns the previous one, to swap back.

    megatron-core 0.16.1: ``get_cuda_rng_tracker()`` (used by its layers' initialization and
    tensor-parallel dropout) returns the private global ``_CUDA_RNG_STATE_TRACKER`` and creates a
    ``CudaRNGStatesTracker`` unless ``_CUDA_RNG_STATE_TRACKER_INITIALIZED`` is set. On the CPU a
    tracker over CUDA generator states cannot work, so the CPU bridge installs its own, and a
    later CUDA run in the same process swaps megatron's back.

    Args:
        tracker: the tracker megatron should use.
        initialized: the value of megatron's "already initialized" flag beside it.

    Returns:
        The previous ``(tracker, initialized)`` pair: ``swap_rng_tracker(*previous)`` undoes this.
    """
    from megatron.core.tensor_parallel import random as mp_random

    previous = (mp_random._CUDA_RNG_STATE_TRACKER, mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = initialized
    return previous
