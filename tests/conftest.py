"""Shared pytest setup: the ``gpu`` marker, ``KD_REQUIRE_GPU``, a single-rank megatron fixture.

A test marked ``gpu`` skips without CUDA. With ``KD_REQUIRE_GPU=1`` in the environment every skip
of a ``gpu``-marked test fails instead: the marker's own skip, and ``pytest.skip`` or
``pytest.importorskip`` inside the test (a missing Transformer Engine, too few GPUs). ``make
gpu-check`` sets it, so that a GPU machine with a wrong install (no CUDA build of torch, a missing
package) cannot report green.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REQUIRE_GPU_ENV = "KD_REQUIRE_GPU"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def _require_gpu() -> bool:
    return os.environ.get(REQUIRE_GPU_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; here too for runs that load this file as a plugin.
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on machines without a GPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under ``KD_REQUIRE_GPU=1`` a skipped ``gpu`` test is reported as failed, with the reason."""
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and _require_gpu()
        and item.get_closest_marker("gpu") is not None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (
            f"{REQUIRE_GPU_ENV}=1: this gpu test was skipped ({reason}); "
            "a GPU check must run it (is torch's CUDA build installed, and every package?)"
        )
    return report


@pytest.fixture
def single_rank():
    """megatron parallel state on one in-process gloo rank, torn down after the test."""
    from kd_module.parallel import runtime

    runtime.initialize_distributed(seed=1234)
    yield runtime
    runtime.destroy_distributed()
