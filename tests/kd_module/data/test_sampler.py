"""Tests for kd_module.data.sampler.MegatronPretrainingSampler: order, DP shares, resume."""

from __future__ import annotations

import pytest

from kd_module.data.sampler import MegatronPretrainingSampler


def _sampler(total=16, consumed=0, micro=2, global_=8, rank=0, size=1):
    return MegatronPretrainingSampler(total, consumed, micro, global_, rank, size)


def test_dp2_ranks_take_contiguous_halves_of_each_global_batch():
    """Hand-computed: with G=8, b=2, DP=2, rank 0 takes 0-3 and 8-11, rank 1 takes 4-7 and 12-15."""
    assert list(_sampler(rank=0, size=2)) == [[0, 1], [2, 3], [8, 9], [10, 11]]
    assert list(_sampler(rank=1, size=2)) == [[4, 5], [6, 7], [12, 13], [14, 15]]
    assert _sampler(rank=1, size=2).num_microbatches == 2


@pytest.mark.parametrize("size", [1, 2, 4])
def test_ranks_partition_every_global_batch(size):
    """Over all DP ranks, global batch g is exactly samples [g*G, (g+1)*G), each taken once."""
    total, micro, global_ = 100, 2, 16
    per_rank = [list(_sampler(total, 0, micro, global_, r, size)) for r in range(size)]
    num_microbatches = global_ // (micro * size)
    for step in range(total // global_):
        taken = [
            index
            for rank_batches in per_rank
            for batch in rank_batches[step * num_microbatches : (step + 1) * num_microbatches]
            for index in batch
        ]
        assert sorted(taken) == list(range(step * global_, (step + 1) * global_))


@pytest.mark.parametrize("size", [1, 2])
def test_resume_continues_with_the_uninterrupted_sequence(size):
    """Starting at consumed_samples = k*G yields what an uninterrupted run yields after k steps."""
    total, micro, global_ = 64, 2, 8
    for rank in range(size):
        full = list(_sampler(total, 0, micro, global_, rank, size))
        per_step = global_ // (micro * size)
        for k in range(total // global_ + 1):
            resumed = list(_sampler(total, k * global_, micro, global_, rank, size))
            assert resumed == full[k * per_step :]
            assert len(_sampler(total, k * global_, micro, global_, rank, size)) == len(resumed)


def test_trailing_partial_global_batch_is_dropped():
    """20 samples with G=8 give two global batches; the last 4 samples are not drawn."""
    sampler = _sampler(total=20, micro=4, global_=8)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert len(sampler) == 4


def test_inconsistent_arguments_are_named():
    """G not a multiple of b x DP, a rank outside the group and an overrun resume are refused."""
    uneven = r"global_batch_size=6 is not divisible by micro_batch_size=2 x data_parallel_size=2"
    with pytest.raises(ValueError, match=uneven):
        _sampler(micro=2, global_=6, size=2)
    with pytest.raises(ValueError, match="data_parallel_rank=2 must be below data_parallel_size=2"):
        _sampler(rank=2, size=2)
    with pytest.raises(ValueError, match="consumed_samples=24 exceeds total_samples=16"):
        _sampler(consumed=24)
    with pytest.raises(ValueError, match="micro_batch_size=0 must be an integer >= 1"):
        _sampler(micro=0)
