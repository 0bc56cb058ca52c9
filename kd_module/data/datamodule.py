"""Lightning data module over megatron-core's GPT datasets.

Batches are dicts of CPU tensors, one micro-batch of this data-parallel rank at a time:

- ``tokens`` ``[b, s]`` int64: input ids;
- ``labels`` ``[b, s]`` int64: the next token of each position;
- ``loss_mask`` ``[b, s]`` float32: 1 where the label counts (0 on EOD when ``eod_mask_loss``);
- ``position_ids`` ``[b, s]`` int64 (restarting after each EOD when ``reset_position_ids``);
- ``attention_mask`` ``[b, 1, s, s]`` bool, True = masked, present only when
  ``reset_attention_mask`` (otherwise the model's causal mask applies);
- ``sample_index`` ``[b]`` int64: each row's index in its split's megatron dataset (what an
  offline teacher cache is keyed by, :mod:`kd_module.offline.format`).

``b`` is ``micro_batch_size``; ``global_batch_size / (micro_batch_size * data_parallel_size)``
consecutive micro-batches make one optimizer step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from kd_module.data.sampler import MegatronPretrainingSampler
from kd_module.data.tokenizers import TokenizerConfig
from kd_module.rules import Problems, close_matches

SPLITS = ("train", "validation", "test")
"""Keys of a per-split ``paths`` dict."""


def check_seq_length(seq_length: int, max_position_embeddings: int) -> None:
    """Refuse sequences longer than the model's position embeddings.

    Raises:
        ValueError: naming both numbers when ``seq_length > max_position_embeddings``.
    """
    if seq_length > max_position_embeddings:
        raise ValueError(
            f"seq_length={seq_length} is larger than the model's "
            f"max_position_embeddings={max_position_embeddings}"
        )


def parse_blend(paths: str | list[Any]) -> tuple[list[str], list[float] | None]:
    """Megatron's ``(prefixes, weights)`` from one prefix, a list, or ``[w1, p1, w2, p2, ...]``.

    Args:
        paths: A dataset prefix, a list of prefixes (weighted by their sizes), or alternating
            weights and prefixes.

    Returns:
        The prefixes and their weights (``None``: weighted by size).

    Raises:
        ValueError: for an empty list, a list mixing weights and prefixes out of order, or a
            non-positive weight.
    """
    if isinstance(paths, str):
        return [paths], None
    paths = list(paths)
    if not paths:
        raise ValueError("data paths: the list is empty; give at least one dataset prefix")
    numbers = [_as_weight(item) for item in paths]
    if all(number is None for number in numbers):
        return [str(item) for item in paths], None
    weights, prefixes = numbers[0::2], paths[1::2]
    misplaced = any(w is None for w in weights) or any(n is not None for n in numbers[1::2])
    if len(paths) % 2 or misplaced:
        raise ValueError(
            f"data paths: {paths!r} mixes weights and prefixes; a blend alternates them as "
            "[weight1, prefix1, weight2, prefix2, ...]"
        )
    if any(w <= 0 for w in weights):
        raise ValueError(f"data paths: blend weights {weights} must all be positive")
    return [str(p) for p in prefixes], weights


def _as_weight(item: Any) -> float | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, int | float):
        return float(item)
    try:
        return float(item)
    except (TypeError, ValueError):
        return None


def check_prefixes_exist(prefixes: list[str]) -> None:
    """Raise ``ValueError`` naming each prefix lacking its ``.bin`` or ``.idx`` file."""
    missing = [
        prefix
        for prefix in prefixes
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"))
    ]
    if missing:
        raise ValueError(
            "data paths: no megatron dataset (.bin and .idx) at prefix "
            + ", ".join(repr(p) for p in missing)
            + "; create one with `nemo kd prepare-data` (kd_module.data.prepare.prepare_data)"
        )


def check_splits_have_documents(prefixes: list[str], split: str) -> None:
    """Raise ``ValueError`` when ``split`` leaves a split of some prefix without any document.

    megatron-core 0.16.1 loops forever building a split with no tokens
    (``GPTDataset._get_num_epochs``), so an empty split is refused up front. The document ranges
    are megatron's own: ``round(bound * documents)`` for each bound of the split matrix.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    problems = []
    for prefix in prefixes:
        documents = len(IndexedDataset(prefix).sequence_lengths)
        for name, bounds in zip(SPLITS, matrix, strict=True):
            if bounds is None:
                continue
            begin, end = (int(round(bound * documents)) for bound in bounds)
            if end <= begin:
                problems.append(f"{name} split of {prefix!r} ({documents} documents)")
    if problems:
        raise ValueError(
            f"data config: split={split!r} leaves no document in the "
            + ", ".join(problems)
            + "; give that split weight 0 (e.g. '90,10,0'), use more documents, or pass "
            "paths={'train': ..., 'validation': ...}"
        )


def data_parallel_rank_and_size() -> tuple[int, int]:
    """This rank's data-parallel rank and group size from megatron's parallel state, else (0, 1)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
        )
    return 0, 1


def disable_mask_cache(dataset: Any) -> None:
    """Make megatron's ``GPTDataset`` compute each sample's masks instead of caching them.

    megatron-core 0.16.1 (``gpt_dataset.py``, ``GPTDataset.__getitem__``) caches the loss mask
    of the FIRST sample a process reads and then zeroes that same tensor where the sample's
    labels are the pad token, so every later sample inherits the first one's padded positions.
    Which sample comes first differs between data-parallel ranks (and between a resumed and an
    uninterrupted run), so losses differed with the layout: DP=2 gave lm_loss 5.806056 where
    DP=1 gave 5.805644 on the same weights and samples. Computing the masks per sample costs a
    ``ones``/``arange`` per sample. Blends are walked into their member datasets.
    """
    if dataset is None:
        return
    for member in getattr(dataset, "datasets", None) or []:
        disable_mask_cache(member)
    if hasattr(dataset, "masks_and_position_ids_are_cacheable"):
        dataset.masks_and_position_ids_are_cacheable = False


class IndexedSamples(Dataset):
    """A dataset whose items also carry their own index as ``sample_index``.

    Args:
        dataset: a map-style dataset of dicts (a megatron ``GPTDataset``).
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "sample_index": torch.tensor(index, dtype=torch.int64)}


class GPTDataModule(L.LightningDataModule):
    """Pretraining-style data for distillation from megatron indexed datasets.

    Args:
        paths: A dataset prefix (``<prefix>.bin``/``.idx``), a list of prefixes, a weighted blend
            ``[w1, prefix1, w2, prefix2, ...]``, or a dict ``{"train": ..., "validation": ...,
            "test": ...}`` of any of those, one per split (then ``split`` is not used). ``None``
            only with ``mock=True``.
        seq_length: Tokens per sample.
        micro_batch_size: Samples per micro-batch on one data-parallel rank.
        global_batch_size: Samples per optimizer step over all data-parallel ranks.
        tokenizer: The tokenizer the data was prepared with (byte tokenizer when ``None``).
        split: Train/validation/test weights of the documents of each prefix, e.g. ``"969,30,1"``.
        index_mapping_dir: Where megatron caches its sample index mappings (next to the data when
            ``None``, and for blends when no process group is initialized).
        eod_mask_loss: Give EOD labels zero loss weight.
        reset_position_ids: Restart position ids after each EOD.
        reset_attention_mask: Stop attention across EODs; adds ``attention_mask`` to batches.
        mock: Use megatron's ``MockGPTDataset`` (synthetic tokens) instead of ``paths``.
        seed: Seed of megatron's document and sample shuffling.
        num_workers: DataLoader worker processes.
        num_train_samples: Training samples to build; ``trainer.max_steps * global_batch_size``
            when ``None``.
        num_val_samples: Validation samples to build; ``trainer.limit_val_batches *
            global_batch_size`` when that is an int, else one pass over the validation split.
        consumed_samples: Samples consumed before the trainer's step 0: the train sampler starts
            at ``consumed_samples + trainer.global_step * global_batch_size``.

    Raises:
        ValueError: naming every bad argument.

    Examples:
        >>> data = GPTDataModule(paths="data/corpus", seq_length=256, micro_batch_size=2,
        ...                      global_batch_size=8, num_train_samples=800)
    """

    def __init__(
        self,
        paths: str | list[Any] | dict[str, Any] | None = None,
        seq_length: int = 2048,
        micro_batch_size: int = 1,
        global_batch_size: int = 8,
        tokenizer: TokenizerConfig | None = None,
        split: str = "969,30,1",
        index_mapping_dir: str | None = None,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
        mock: bool = False,
        seed: int = 1234,
        num_workers: int = 0,
        num_train_samples: int | None = None,
        num_val_samples: int | None = None,
        consumed_samples: int = 0,
    ) -> None:
        super().__init__()
        problems = Problems()
        if mock and paths is not None:
            problems.append(f"paths={paths!r} is not used with mock=True; leave it None")
        if not mock and paths is None:
            problems.append("paths is None; give dataset prefixes or set mock=True")
        if isinstance(paths, dict):
            for key in paths:
                if key not in SPLITS:
                    problems.append(
                        f"paths: unknown split {key!r}{close_matches(key, SPLITS)}; "
                        f"allowed: {', '.join(SPLITS)}"
                    )
            if "train" not in paths:
                problems.append("paths: a per-split dict needs a 'train' entry")
        for name, value, minimum in (
            ("seq_length", seq_length, 1),
            ("micro_batch_size", micro_batch_size, 1),
            ("global_batch_size", global_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("consumed_samples", consumed_samples, 0),
            ("num_train_samples", num_train_samples, 1),
            ("num_val_samples", num_val_samples, 0),
        ):
            if value is None and name.startswith("num_") and name != "num_workers":
                continue
            problems.int_at_least(name, value, minimum)
        if (
            isinstance(micro_batch_size, int)
            and isinstance(global_batch_size, int)
            and micro_batch_size > 0
            and global_batch_size % micro_batch_size
        ):
            problems.append(
                f"global_batch_size={global_batch_size} must be a multiple of "
                f"micro_batch_size={micro_batch_size}"
            )
        parts = split.split(",") if isinstance(split, str) else []
        if not 1 <= len(parts) <= 3 or any(_as_weight(p) is None or float(p) < 0 for p in parts):
            problems.append(
                f"split={split!r} must be up to 3 non-negative comma-separated weights, "
                "e.g. '969,30,1'"
            )
        elif sum(float(p) for p in parts) <= 0:
            problems.append(f"split={split!r} must have a positive weight")
        if tokenizer is not None and not isinstance(tokenizer, TokenizerConfig):
            problems.append(f"tokenizer={tokenizer!r} must be a TokenizerConfig")
        if problems:
            raise ValueError("data config: " + "; ".join(problems))
        self.paths = paths
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.tokenizer = tokenizer if tokenizer is not None else TokenizerConfig()
        self.tokenizer_given = tokenizer is not None
        """False while the tokenizer is the default, which a teacher's HF tokenizer replaces."""
        self.split = split
        self.index_mapping_dir = index_mapping_dir
        self.eod_mask_loss = eod_mask_loss
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.mock = mock
        self.seed = seed
        self.num_workers = num_workers
        self.num_train_samples = num_train_samples
        self.num_val_samples = num_val_samples
        self.consumed_samples = consumed_samples
        self._blend = self._blend_per_split = None
        if isinstance(paths, dict):
            self._blend_per_split = [
                parse_blend(paths[key]) if paths.get(key) is not None else None for key in SPLITS
            ]
        elif paths is not None:
            self._blend = parse_blend(paths)
        self.train_dataset = self.validation_dataset = self.test_dataset = None
        self._planned_samples: dict[str, int | None] = {}

    # ------------------------------------------------------------------ building
    def prefixes(self) -> list[str]:
        """Every dataset prefix this module reads."""
        blends = [self._blend] if self._blend is not None else (self._blend_per_split or [])
        return [prefix for blend in blends if blend is not None for prefix in blend[0]]

    def _sample_counts(self) -> tuple[int, int | None]:
        trainer = self._trainer_or_none()
        train = self.num_train_samples
        if train is None:
            max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
            if max_steps is None or max_steps <= 0:
                raise ValueError(
                    "data config: num_train_samples is None and there is no trainer with "
                    "max_steps > 0 to derive it from; set num_train_samples or trainer.max_steps"
                )
            train = max_steps * self.global_batch_size
        validation = self.num_val_samples
        if validation is None and trainer is not None:
            limit = getattr(trainer, "limit_val_batches", None)
            if isinstance(limit, int) and not isinstance(limit, bool):
                validation = limit * self.global_batch_size
        if validation is None and self._is_weighted():
            # megatron needs a size for a weighted blend; one global batch per validation run.
            validation = self.global_batch_size
        return train, validation

    def _is_weighted(self) -> bool:
        blends = [self._blend] if self._blend is not None else (self._blend_per_split or [])
        return any(blend is not None and blend[1] is not None for blend in blends)

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def _path_to_cache(self) -> str | None:
        import torch.distributed

        blends = [self._blend] if self._blend is not None else (self._blend_per_split or [])
        blended = any(b is not None and (len(b[0]) > 1 or b[1] is not None) for b in blends)
        if blended and not torch.distributed.is_initialized():
            # megatron-core 0.16.1 blended_dataset.py:153 calls torch.distributed.get_rank() to
            # write a cached blend index, which fails without a process group. Without a cache
            # directory megatron keeps the blend index in memory and caches each source's
            # indices next to its data instead.
            return None
        return self.index_mapping_dir

    def dataset_config(self) -> Any:
        """megatron-core's ``GPTDatasetConfig`` for this module."""
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

        return GPTDatasetConfig(
            random_seed=self.seed,
            sequence_length=self.seq_length,
            blend=self._blend,
            blend_per_split=self._blend_per_split,
            split=None if self._blend_per_split is not None else self.split,
            path_to_cache=self._path_to_cache(),
            tokenizer=self.tokenizer.build(),
            reset_position_ids=self.reset_position_ids,
            reset_attention_mask=self.reset_attention_mask,
            eod_mask_loss=self.eod_mask_loss,
            create_attention_mask=self.reset_attention_mask,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the train, validation and test datasets (idempotent).

        Raises:
            ValueError: naming a prefix without ``.bin``/``.idx`` or a split without documents
                (before any index is built), or when the number of training samples cannot be
                derived.
        """
        if self.train_dataset is not None:
            return
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

        check_prefixes_exist(self.prefixes())
        if self._blend is not None:
            check_splits_have_documents(self._blend[0], self.split)
        train, validation = self._sample_counts()
        self._planned_samples = {"train": train, "validation": validation, "test": validation}
        builder = BlendedMegatronDatasetBuilder(
            MockGPTDataset if self.mock else GPTDataset,
            [train, validation, validation],
            lambda: True,
            self.dataset_config(),
        )
        self.train_dataset, self.validation_dataset, self.test_dataset = builder.build()
        for dataset in (self.train_dataset, self.validation_dataset, self.test_dataset):
            disable_mask_cache(dataset)

    # ------------------------------------------------------------------ loading
    def current_consumed_samples(self) -> int:
        """``consumed_samples + trainer.global_step * global_batch_size``."""
        trainer = self._trainer_or_none()
        step = trainer.global_step if trainer is not None else 0
        return self.consumed_samples + step * self.global_batch_size

    def _loader(
        self,
        dataset: Any,
        split: str,
        consumed_samples: int,
        position_fn: Callable[[], int] | None = None,
    ) -> DataLoader:
        # megatron builds whole epochs; draw only the samples planned (max_steps x batch).
        planned = self._planned_samples[split]
        total = len(dataset) if planned is None else min(planned, len(dataset))
        rank, size = data_parallel_rank_and_size()
        sampler = MegatronPretrainingSampler(
            total_samples=total,
            consumed_samples=consumed_samples,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            data_parallel_rank=rank,
            data_parallel_size=size,
            position_fn=position_fn,
        )
        return DataLoader(
            IndexedSamples(dataset),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Micro-batches of this data-parallel rank, from :meth:`current_consumed_samples`."""
        self.setup("fit")
        return self._loader(
            self.train_dataset,
            "train",
            self.current_consumed_samples(),
            position_fn=self.current_consumed_samples,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation micro-batches of this data-parallel rank, from sample 0 every time."""
        self.setup("validate")
        if self.validation_dataset is None:
            return []
        return self._loader(self.validation_dataset, "validation", 0)

    def test_dataloader(self) -> DataLoader:
        """Test micro-batches of this data-parallel rank, from sample 0."""
        self.setup("test")
        if self.test_dataset is None:
            return []
        return self._loader(self.test_dataset, "test", 0)

    # ------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """``{"consumed_samples", "global_step"}``: where the train sampler stands."""
        trainer = self._trainer_or_none()
        return {
            "consumed_samples": self.current_consumed_samples(),
            "global_step": trainer.global_step if trainer is not None else 0,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the train sampler where :meth:`state_dict` left it.

        The trainer restores its own ``global_step`` from the same checkpoint, so the samples it
        accounts for are subtracted here and the next :meth:`train_dataloader` starts at the
        saved ``consumed_samples``.
        """
        consumed = int(state_dict["consumed_samples"])
        step = int(state_dict.get("global_step", 0))
        if self._trainer_or_none() is None:
            step = 0
        self.consumed_samples = consumed - step * self.global_batch_size

    def num_microbatches(self) -> int:
        """Micro-batches per optimizer step on one data-parallel rank."""
        _, size = data_parallel_rank_and_size()
        return self.global_batch_size // (self.micro_batch_size * size)


def model_inputs(samples: list[dict[str, Any]], device: Any) -> dict[str, Any]:
    """A GPT's forward inputs of dataset ``samples`` (``tokens``, ``position_ids`` and, when
    the data makes one, ``attention_mask``), stacked by torch's default collate, on ``device``."""
    from torch.utils.data import default_collate

    batch = default_collate(samples)
    keys = ("tokens", "position_ids", "attention_mask")
    return {key: batch[key].to(device) for key in keys if batch.get(key) is not None}
