"""A resumable batch sampler in the manner of Megatron-LM's ``MegatronPretrainingSampler``.

Samples are read in order: global batch ``g`` is samples ``[g * G, (g + 1) * G)`` with
``G = global_batch_size``. Data-parallel rank ``r`` of ``D`` takes the contiguous share
``[g * G + r * G / D, g * G + (r + 1) * G / D)`` and yields it as micro-batches of
``micro_batch_size`` indices. Starting at ``consumed_samples`` continues a stopped run exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import Sampler

from kd_module.models.gpt import ParallelLayout
from kd_module.rules import Problems


class MegatronPretrainingSampler(Sampler[list[int]]):
    """Yields this data-parallel rank's micro-batches of dataset indices, from ``consumed_samples``.

    Use as a ``DataLoader``'s ``batch_sampler``. Only whole global batches are drawn: a trailing
    remainder smaller than ``global_batch_size`` is dropped.

    Args:
        total_samples: Number of samples in the dataset.
        consumed_samples: Samples every rank together already consumed (a multiple of
            ``global_batch_size`` when resuming at a step boundary).
        micro_batch_size: Samples per micro-batch on one rank.
        global_batch_size: Samples per optimizer step over all data-parallel ranks; a multiple of
            ``micro_batch_size * data_parallel_size``.
        data_parallel_rank: This rank's index in the data-parallel group.
        data_parallel_size: Number of data-parallel ranks.
        position_fn: Called at the start of every pass over the sampler to read the current
            ``consumed_samples`` (the trainer's step), so a pass that Lightning starts as a new
            epoch continues where training is instead of where the loader was created.

    Raises:
        ValueError: naming every inconsistent argument.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        position_fn: Callable[[], int] | None = None,
    ) -> None:
        problems = Problems()
        for name, value, minimum in (
            ("total_samples", total_samples, 0),
            ("consumed_samples", consumed_samples, 0),
            ("micro_batch_size", micro_batch_size, 1),
            ("global_batch_size", global_batch_size, 1),
            ("data_parallel_size", data_parallel_size, 1),
            ("data_parallel_rank", data_parallel_rank, 0),
        ):
            problems.int_at_least(name, value, minimum)
        if not problems:
            if data_parallel_rank >= data_parallel_size:
                problems.append(
                    f"data_parallel_rank={data_parallel_rank} must be below "
                    f"data_parallel_size={data_parallel_size}"
                )
            problems += ParallelLayout.batch_problems(
                global_batch_size, micro_batch_size, data_parallel_size
            )
            if consumed_samples > total_samples:
                problems.append(
                    f"consumed_samples={consumed_samples} exceeds total_samples={total_samples}"
                )
        problems.raise_if_any("pretraining sampler")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.position_fn = position_fn

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per global batch on one rank."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def __len__(self) -> int:
        """Micro-batches this rank still yields."""
        global_batches = (self.total_samples - self.consumed_samples) // self.global_batch_size
        return global_batches * self.num_microbatches

    def __iter__(self) -> Iterator[list[int]]:
        if self.position_fn is not None:
            self.consumed_samples = min(self.position_fn(), self.total_samples)
        share = self.global_batch_size // self.data_parallel_size
        last_start = self.total_samples - self.global_batch_size
        for start in range(self.consumed_samples, last_start + 1, self.global_batch_size):
            first = start + self.data_parallel_rank * share
            for offset in range(0, share, self.micro_batch_size):
                yield list(range(first + offset, first + offset + self.micro_batch_size))
