"""The CPU runtime: in-process init/teardown, the RNG tracker, and the CUDA bridge."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch


def test_initialize_twice_in_one_process():
    """init -> destroy -> init works in one process (notebooks and tests run fits back to back)."""
    from megatron.core import parallel_state

    from kd_module.parallel import runtime

    for _ in range(2):
        runtime.initialize_distributed(seed=7)
        assert torch.distributed.get_world_size() == 1
        assert torch.distributed.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        runtime.destroy_distributed()
        assert not parallel_state.model_parallel_is_initialized()
        assert not torch.distributed.is_initialized()


def test_world_size_not_divisible_by_layout_is_refused():
    """TP=2 on a single rank fails with a message naming the sizes."""
    from kd_module.parallel import runtime

    with pytest.raises(ValueError, match=r"world size 1 is not divisible by .*= 2"):
        runtime.initialize_distributed(tensor_model_parallel_size=2)
    runtime.destroy_distributed()


def test_rng_tracker_names_and_fork_semantics(single_rank):
    """The tracker holds megatron's three names; fork is reproducible and restores state."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    assert set(tracker.get_states()) == {
        "data-parallel-rng",
        "model-parallel-rng",
        "expert-parallel-rng",
    }
    saved = tracker.get_states()
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer), "fork must restore the default generator"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the forked state must advance between forks"
    tracker.set_states(saved)
    with tracker.fork():
        again = torch.rand(4)
    assert torch.equal(first, again), "set_states must rewind the named state"
    expected = torch.Generator().manual_seed(1234 + 2718)
    tracker.set_states(saved)
    with tracker.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(3), torch.rand(3, generator=expected))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bridge is inert on CUDA machines")
def test_gradient_clipping_runs_on_cpu_grads(single_rank):
    """megatron's clip_grad_by_total_norm_fp32 (CUDA type asserts upstream) scales CPU grads."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = get_grad_norm_fp32([p.grad for p in params])
    assert norm == pytest.approx(5.0)
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[1].grad[1], torch.tensor(0.8), rtol=1e-5, atol=1e-6)


def test_bridges_are_inert_when_cuda_is_available():
    """With CUDA reported available, install_cpu_bridges changes nothing in megatron."""
    script = textwrap.dedent(
        """
        import torch
        torch.cuda.is_available = lambda: True
        from kd_module.parallel import runtime
        assert runtime.install_cpu_bridges() is False
        assert not runtime.bridges_installed()
        from megatron.core.pipeline_parallel import schedules, p2p_communication
        from megatron.core.optimizer import clip_grads
        from megatron.core.tensor_parallel import random
        from megatron.core.models.common.language_module.language_module import LanguageModule
        assert schedules.torch is torch and p2p_communication.torch is torch
        assert "torch.cuda.FloatTensor" in repr(
            clip_grads.clip_grad_by_total_norm_fp32.__code__.co_consts)
        assert "cuda" in LanguageModule.setup_embeddings_and_output_layer.__code__.co_names
        assert random._CUDA_RNG_STATE_TRACKER is None
        print("inert")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "inert" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_bridges_installed_on_cpu(single_rank):
    """Without CUDA the bridged megatron modules see the CPU view of torch.cuda."""
    from megatron.core.pipeline_parallel import schedules

    from kd_module.parallel import runtime

    assert runtime.bridges_installed()
    assert schedules.torch is not torch
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"


@pytest.mark.gpu
def test_cuda_machine_uses_nccl_and_real_cuda(single_rank):
    """On a GPU machine the runtime uses NCCL and megatron keeps its real torch.cuda."""
    from megatron.core.pipeline_parallel import schedules

    from kd_module.parallel import runtime

    assert not runtime.bridges_installed()
    assert torch.distributed.get_backend() == "nccl"
    assert schedules.torch is torch


def test_every_package_export_resolves_to_its_named_object():
    """`kd_module.NAME` for each name in `__all__` imports the object of that name."""
    import kd_module

    for name in kd_module.__all__:
        assert getattr(kd_module, name).__name__ == name, name
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        kd_module.nothing  # noqa: B018
