"""Reading a teacher cache: :class:`TeacherCache` memory-maps the shards and checks the manifest
against a run's settings (format: :mod:`kd_module.offline.format`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kd_module.offline.format import MANIFEST_FILE, shard_path, token_fingerprint


class TeacherCache:
    """Read-only view of a cache written by :func:`cache_teacher`.

    Args:
        out_dir: the cache directory.

    Raises:
        ValueError: when the directory holds no manifest or the cache is incomplete.

    Examples:
        >>> cache = TeacherCache("/data/cache")
        >>> cache.check_manifest({"teacher": "llama31_8b", "k": 64})
        >>> values, indices, lse = cache.lookup(batch["sample_index"])  # [b, s, k] x2, [b, s]
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        path = self.out_dir / MANIFEST_FILE
        if not path.exists():
            raise ValueError(f"teacher cache: no {MANIFEST_FILE} in {self.out_dir}")
        self.manifest: dict = json.loads(path.read_text())
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def check_manifest(self, expected: dict) -> None:
        """Refuse a cache whose manifest differs from ``expected`` on any of its keys.

        Nested dicts are compared key by key and named with dots (``dataset.seed``).

        Raises:
            ValueError: naming the first differing field (in ``expected``'s order) and both
                values.
        """

        def compare(stored: dict, wanted: dict, prefix: str) -> None:
            for key, value in wanted.items():
                have = stored.get(key, "<missing>") if isinstance(stored, dict) else "<missing>"
                if isinstance(value, dict) and isinstance(have, dict):
                    compare(have, value, f"{prefix}{key}.")
                elif have != value:
                    raise ValueError(
                        f"teacher cache {self.out_dir}: manifest field {prefix + key!r} is "
                        f"{have!r} in the cache but {value!r} is expected"
                    )

        compare(self.manifest, expected, "")

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._shards:
            self._shards[shard] = {
                kind: np.load(shard_path(self.out_dir, shard, f"{kind}.npy"), mmap_mode="r")
                for kind in ("values", "indices", "lse", "tokens")
            }
        return self._shards[shard]

    def lookup(self, sample_indices: Tensor | Iterable[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Cached rows of ``sample_indices``.

        Returns:
            ``(values, indices, lse)``: values [b, s, k] in the cached dtype, indices [b, s, k]
            int64, lse [b, s] fp32.

        Raises:
            ValueError: when the cache is incomplete or an index is outside ``0 .. N-1``.
        """
        if not self.manifest.get("complete"):
            raise ValueError(f"teacher cache {self.out_dir} is incomplete; finish cache_teacher")
        num_samples = self.manifest["num_samples"]
        shard_size = self.manifest["shard_size"]
        dtype = self.manifest["dtype"]
        rows: dict[str, list[np.ndarray]] = {"values": [], "indices": [], "lse": []}

        for sample in (int(i) for i in sample_indices):
            if not 0 <= sample < num_samples:
                raise ValueError(
                    f"teacher cache: sample index {sample} outside 0 .. {num_samples - 1}"
                )
            arrays = self._shard(sample // shard_size)
            for kind in rows:
                rows[kind].append(np.array(arrays[kind][sample % shard_size]))
        values = torch.from_numpy(np.stack(rows["values"]))
        if dtype == "bf16":
            values = values.view(torch.bfloat16)
        indices = torch.from_numpy(np.stack(rows["indices"])).long()
        return values, indices, torch.from_numpy(np.stack(rows["lse"]))

    def check_tokens(self, sample_indices: Tensor | Iterable[int], tokens: Tensor) -> None:
        """Refuse samples whose tokens differ from the ones the teacher was run on.

        Args:
            sample_indices: [b] dataset sample indices.
            tokens: [b, s] the tokens about to be trained on.

        Raises:
            ValueError: naming the first mismatching sample index: the cache belongs to other
                data (shuffle, split, sequence length or tokenizer).
        """
        shard_size = self.manifest["shard_size"]
        found = token_fingerprint(tokens.cpu())
        for row, sample in enumerate(int(i) for i in sample_indices):
            stored = int(self._shard(sample // shard_size)["tokens"][sample % shard_size])
            if stored != int(found[row]):
                raise ValueError(
                    f"teacher cache {self.out_dir}: the tokens of sample {sample} differ from "
                    "the ones the teacher was cached on; the cache belongs to other data "
                    "(dataset paths, split, seed, seq_length, num_samples or tokenizer)"
                )
