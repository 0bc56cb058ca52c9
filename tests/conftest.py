"""Shared pytest setup: the ``gpu`` marker skips without CUDA; a single-rank megatron fixture."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def single_rank():
    """megatron parallel state on one in-process gloo rank, torn down after the test."""
    from kd_module import runtime

    runtime.initialize_distributed(seed=1234)
    yield runtime
    runtime.destroy_distributed()
