"""The teacher cache's on-disk format: dtypes, shard file names, the manifest, the token
fingerprint.

On disk (``out_dir``)::

    manifest.json                 what was cached (written atomically; "complete" at the end)
    shard_00000.values.npy        [rows, seq_length, k]  top-k logits (bf16 as uint16 bits)
    shard_00000.indices.npy       [rows, seq_length, k]  int32 vocabulary indices
    shard_00000.lse.npy           [rows, seq_length]     fp32 full log-sum-exp
    shard_00000.tokens.npy        [rows]                 int64 token fingerprint per sample
    shard_00000.done              completion marker (JSON: rows, first sample, seq_length)

Rows are keyed by the dataset's sample index: sample ``i`` lives in shard ``i // shard_size``,
row ``i % shard_size``. Bytes per token: ``k * (2 + 4) + 4`` with bf16/fp16 values (``k * 8 + 4``
with fp32), e.g. 388 bytes for k=64 in bf16, against ``2 * vocab`` bytes for full bf16 logits
(256 KB at 128k); plus 8 bytes per sample for the fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_module.training.precision import DTYPES

CACHE_DTYPES = ("bf16", "fp16", "fp32")
"""Storage dtypes of the cached top-k values (names in :mod:`kd_module.training.precision`)."""


RESERVED_MANIFEST_KEYS = ("k", "dtype", "shard_size", "num_samples", "complete")
"""Manifest keys :func:`cache_teacher` sets itself."""


MANIFEST_FILE = "manifest.json"


NUMPY_DTYPES = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}


def cache_bytes_per_token(k: int, dtype: str) -> int:
    """Bytes one token takes in the cache: k values, k int32 indices and one fp32 LSE."""
    return k * (torch.finfo(DTYPES[dtype].dtype).bits // 8 + 4) + 4


def shard_path(out_dir: Path, shard: int, kind: str) -> Path:
    return out_dir / f"shard_{shard:05d}.{kind}"


def manifest_with_settings(
    manifest: dict, k: int, dtype: str, shard_size: int, num_samples: int
) -> dict:
    """``manifest`` plus what :func:`cache_teacher` records itself (``k``, ``dtype``, ...).

    Raises:
        ValueError: when ``manifest`` sets one of them itself.
    """
    reserved = set(RESERVED_MANIFEST_KEYS) & manifest.keys()
    if reserved:
        raise ValueError(
            f"teacher cache: manifest keys {sorted(reserved)} are set by cache_teacher; remove them"
        )
    return {
        **manifest,
        "k": k,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_samples": num_samples,
    }


_FINGERPRINT_WEIGHTS: dict[int, Tensor] = {}


def token_fingerprint(tokens: Tensor) -> Tensor:
    """One int64 per sample that changes when any of its tokens changes: [b, s] -> [b].

    A weighted sum of the token ids with fixed pseudo-random odd int64 weights per position,
    wrapping on overflow. The cache stores it per sample; training compares it with the
    tokens it is about to distill on, so a cache paired with other data (another shuffle,
    split, sequence length or tokenizer) is caught at the first batch instead of silently
    distilling against the wrong teacher logits.
    """
    seq_length = tokens.shape[-1]
    if seq_length not in _FINGERPRINT_WEIGHTS:
        # The device is explicit: under Lightning's torch.device("cuda") init context a CPU
        # generator would otherwise be asked for a CUDA tensor.
        generator = torch.Generator(device="cpu").manual_seed(0x5EED)
        weights = torch.randint(
            1, 2**62, (seq_length,), generator=generator, dtype=torch.int64, device="cpu"
        )
        _FINGERPRINT_WEIGHTS[seq_length] = weights | 1
    weights = _FINGERPRINT_WEIGHTS[seq_length].to(tokens.device)
    return (tokens.long() * weights).sum(dim=-1)


def dataset_manifest(data: Any, num_samples: int) -> dict[str, Any]:
    """What identifies the samples of a :class:`~kd_module.data.GPTDataModule`'s train split.

    megatron's sample order depends on the prefixes, split, seed, sequence length, the EOD/
    position options and on the number of samples the dataset was built for; a cache is only
    valid for a training run that builds the same train dataset.
    """
    paths = data.paths
    if isinstance(paths, dict):
        paths = {key: value for key, value in paths.items() if key == "train"}
    return {
        "paths": json.loads(json.dumps(paths, default=str)),
        "mock": bool(data.mock),
        "split": None if isinstance(data.paths, dict) else data.split,
        "seed": data.seed,
        "seq_length": data.seq_length,
        "num_samples": num_samples,
        "eod_mask_loss": data.eod_mask_loss,
        "reset_position_ids": data.reset_position_ids,
        "reset_attention_mask": data.reset_attention_mask,
    }
