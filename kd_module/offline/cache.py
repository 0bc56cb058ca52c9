"""Offline distillation: cache a teacher's top-k logits once, train students from the cache.

:func:`cache_teacher` runs a teacher (megatron ``GPTModel`` stages at any tensor/pipeline/data
parallel layout) over samples ``0 .. N-1`` of a megatron dataset and stores, per token, the
teacher's global top-k logits (``bf16``/``fp16``/``fp32``), their vocabulary indices
(``int32``) and the log-sum-exp of the teacher's FULL distribution (``fp32``). Rows are keyed by
the dataset's sample index: sample ``i`` lives in shard ``i // shard_size``, row
``i % shard_size``, as numpy ``.npy`` files that :class:`TeacherCache` memory-maps.

On disk (``out_dir``)::

    manifest.json                 what was cached (written atomically; "complete" at the end)
    shard_00000.values.npy        [rows, seq_length, k]  top-k logits (bf16 as uint16 bits)
    shard_00000.indices.npy       [rows, seq_length, k]  int32 vocabulary indices
    shard_00000.lse.npy           [rows, seq_length]     fp32 full log-sum-exp
    shard_00000.tokens.npy        [rows]                 int64 token fingerprint per sample
    shard_00000.done              completion marker (JSON: rows, first sample, seq_length)

Bytes per token: ``k * (2 + 4) + 4`` with bf16/fp16 values (``k * 8 + 4`` with fp32), e.g.
388 bytes for k=64 in bf16, against ``2 * vocab`` bytes for full bf16 logits (256 KB at 128k);
plus 8 bytes per sample for the fingerprint.

:func:`offline_topk_kd_loss` is the per-token loss of student logits against the cache, either
renormalized over the teacher's top-k (equal to ``LogitsKDLoss(top_k=k)``) or with a tail bucket
that keeps the teacher's probability mass outside the top-k.
:class:`~kd_module.offline.module.OfflineDistillationModule` trains a student from a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch import Tensor
from torch.utils.data import default_collate

from kd_module.checkpoints.atomic import write_json_atomic
from kd_module.data.datamodule import data_parallel_rank_and_size
from kd_module.distillation.losses import all_gather_last_dim, resolve_tp_group, vocab_parallel_max
from kd_module.parallel.collectives import barrier
from kd_module.rules import Problems
from kd_module.training.precision import DTYPES

__all__ = [
    "CACHE_DTYPES",
    "OFFLINE_LOSS_MODES",
    "RESERVED_MANIFEST_KEYS",
    "TeacherCache",
    "cache_bytes_per_token",
    "cache_teacher",
    "dataset_manifest",
    "offline_topk_kd_loss",
    "teacher_logits_topk",
    "token_fingerprint",
    "weights_sha256",
]

CACHE_DTYPES = ("bf16", "fp16", "fp32")
"""Storage dtypes of the cached top-k values (names in :mod:`kd_module.training.precision`)."""
OFFLINE_LOSS_MODES = ("renormalized", "tail")
"""How :func:`offline_topk_kd_loss` treats the vocabulary outside the teacher's top-k."""

RESERVED_MANIFEST_KEYS = ("k", "dtype", "shard_size", "num_samples", "complete")
"""Manifest keys :func:`cache_teacher` sets itself."""

_MANIFEST = "manifest.json"
_NUMPY_DTYPES = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}


def cache_bytes_per_token(k: int, dtype: str) -> int:
    """Bytes one token takes in the cache: k values, k int32 indices and one fp32 LSE."""
    return k * (torch.finfo(DTYPES[dtype].dtype).bits // 8 + 4) + 4


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of this rank's parameters (names, shapes, dtypes and bytes), in name order.

    Each parameter is hashed as the teacher-integrity check hashes it (in place on the CPU,
    streamed through one bounded host buffer from a GPU: never a host copy of the model).
    """
    from kd_module.guards import teacher_digests

    digests = teacher_digests(model)
    names = sorted(name for name, _ in model.named_parameters())
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{digests[name]}".encode())
    return digest.hexdigest()


def teacher_logits_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-k and full log-sum-exp of vocab-parallel logits.

    Each tensor-parallel rank takes its local top-k; candidates are gathered over the TP group and
    the global top-k picked among them (as ``LogitsKDLoss``'s top-k does). The log-sum-exp of the
    full distribution reduces the per-token maximum and sum of exponentials over the group.

    Args:
        logits: [..., v_local], this rank's contiguous vocabulary shard.
        k: entries to keep; at most the full vocabulary.

    Returns:
        ``(values, indices, lse)``: values [..., k] in the input dtype, sorted descending; global
        vocabulary indices [..., k] (int64); fp32 log-sum-exp [...]. Identical on every TP rank.
    """
    group = resolve_tp_group()
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    local_vocab = logits.shape[-1]
    if k > local_vocab * world:
        raise ValueError(
            f"teacher cache: k={k} is larger than the vocabulary ({local_vocab * world})"
        )
    values, index = torch.topk(logits, min(k, local_vocab), dim=-1)
    index = index + rank * local_vocab
    maximum = logits.amax(dim=-1).float()
    values, index = all_gather_last_dim([values, index], group)
    if world > 1:
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
    # Chunked over tokens: no fp32 copy of all the logits at once.
    rows, flat_max = logits.reshape(-1, local_vocab), maximum.reshape(-1, 1)
    sum_exp = torch.cat(
        [
            torch.exp(rows[start : start + 1024].float() - flat_max[start : start + 1024]).sum(-1)
            for start in range(0, rows.shape[0], 1024)
        ]
    ).reshape(maximum.shape)
    if world > 1:
        dist.all_reduce(sum_exp, group=group)
    values, pick = torch.topk(values, k, dim=-1)
    return values, torch.gather(index, -1, pick), maximum + torch.log(sum_exp)


def _shard_path(out_dir: Path, shard: int, kind: str) -> Path:
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


def _is_writer() -> bool:
    """The rank that writes its replica's shards: last pipeline stage, tensor-parallel rank 0."""
    if not parallel_state.model_parallel_is_initialized():
        return True
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def _collate(samples: list[dict[str, Any]], device: torch.device) -> dict[str, Tensor]:
    """The teacher's inputs of ``samples``, stacked by torch's default collate, on ``device``."""
    batch = default_collate(samples)
    keys = ("tokens", "position_ids", "attention_mask")
    return {key: batch[key].to(device) for key in keys if batch.get(key) is not None}


def _teacher_topk_chunk(
    model: torch.nn.Module, batches: list[dict[str, Tensor]], k: int, dtype: str
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Teacher top-k of each micro-batch through megatron's forward-only schedule.

    With pipeline parallelism the activations travel between stages as in training; the last
    stage computes the top-k of its logits (a TP collective) and returns CPU tensors
    ``(values, int32 indices, lse)`` per micro-batch. Other stages return an empty list.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator: Any, stage: Any) -> tuple:
        batch = next(data_iterator)
        output = stage(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))

        def collect(logits: Tensor, non_loss_data: bool = False) -> tuple:
            values, index, lse = teacher_logits_topk(logits, k)
            values = values.to(DTYPES[dtype].dtype).cpu()
            return values, index.to(torch.int32).cpu(), lse.cpu()

        return output, collect

    tokens = batches[0]["tokens"]
    return list(
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
        or []
    )


def _open_shard(out: Path, shard: int, rows: int, seq_length: int, k: int, dtype: str) -> dict:
    """Fresh memory-mapped arrays of one shard (an incomplete earlier shard is overwritten)."""

    def create(kind: str, np_dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.lib.format.open_memmap(
            _shard_path(out, shard, f"{kind}.npy"), mode="w+", dtype=np_dtype, shape=shape
        )

    return {
        "values": create("values", _NUMPY_DTYPES[dtype], (rows, seq_length, k)),
        "indices": create("indices", np.int32, (rows, seq_length, k)),
        "lse": create("lse", np.float32, (rows, seq_length)),
        "tokens": create("tokens", np.int64, (rows,)),
    }


def cache_teacher(
    model: torch.nn.Module,
    dataset: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike,
    k: int,
    manifest: dict,
    num_samples: int | None = None,
    micro_batch_size: int = 1,
    dtype: str = "bf16",
    shard_size: int = 1024,
    micro_batches_per_call: int = 16,
    on_shard_done: Callable[[int], None] | None = None,
) -> dict:
    """Run the teacher over samples ``0 .. num_samples-1`` of ``dataset``; cache top-k per token.

    Call it on every rank (tensor, pipeline and data parallel). Each data-parallel replica
    caches the shards ``r, r + dp, r + 2 dp, ...`` (``r`` its data-parallel rank); inside a
    replica the forward runs megatron's forward-only schedule (any TP/PP layout; no context
    parallelism) and the last pipeline stage's tensor-parallel rank 0 writes. A shard's
    micro-batches do not depend on the layout, so every layout writes the same rows.

    Resuming: a shard is complete once its done marker exists; a restarted run skips complete
    shards and rewrites every incomplete one from scratch, so the result is byte-identical to
    an uninterrupted run (the teacher forward is deterministic).

    Args:
        model: this rank's teacher stage (megatron ``GPTModel``); run in eval mode, no grad.
        dataset: ``dataset[i]`` is a dict with ``tokens`` [s] and ``position_ids`` [s] (and
            ``attention_mask`` when the data makes one): a megatron ``GPTDataset``.
        out_dir: cache directory (created).
        k: top-k entries kept per token.
        manifest: what describes the cache: teacher path and weights hash
            (:func:`weights_sha256`), tokenizer, dataset (:func:`dataset_manifest`),
            ``seq_length``...; stored with ``k``, ``dtype``, ``shard_size``, ``num_samples``.
            A restart must pass the same manifest.
        num_samples: samples to cache (``len(dataset)`` when ``None``).
        micro_batch_size: samples per teacher forward; the last micro-batch of a shard is
            padded by repeating its last sample (the padding is not stored).
        dtype: storage of the top-k values, one of :data:`CACHE_DTYPES`.
        shard_size: samples per shard file.
        micro_batches_per_call: micro-batches per call of megatron's schedule (bounds the
            top-k results held in memory before they are written).
        on_shard_done: called with the shard number after each shard this rank wrote is marked
            complete.

    Returns:
        The final manifest (also in ``out_dir/manifest.json``), with ``complete: true``.

    Raises:
        ValueError: on bad arguments, a manifest differing from the one already in ``out_dir``
            (naming the field), or samples of different lengths.

    Examples:
        >>> cache_teacher(teacher_stage, data.train_dataset, "/data/cache", k=64,
        ...               manifest={"teacher": "/ckpt/llama31_8b", "seq_length": 4096},
        ...               num_samples=100_000, micro_batch_size=4)
    """
    problems = Problems()
    for name, value in (
        ("k", k),
        ("shard_size", shard_size),
        ("micro_batch_size", micro_batch_size),
        ("micro_batches_per_call", micro_batches_per_call),
    ):
        problems.positive_int(name, value)
    problems.one_of("dtype", dtype, CACHE_DTYPES)
    if num_samples is None and dataset is not None:
        num_samples = len(dataset)
    if (
        problems.positive_int("num_samples", num_samples)
        and dataset is not None
        and num_samples > len(dataset)
    ):
        problems.add(f"num_samples={num_samples} is more than the dataset's {len(dataset)}")
    problems.raise_if_any("cache_teacher")
    out = Path(out_dir)
    expected = manifest_with_settings(dict(manifest), k, dtype, shard_size, num_samples)
    if (out / _MANIFEST).exists():
        TeacherCache(out).check_manifest(expected)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / _MANIFEST).exists():
            write_json_atomic(out / _MANIFEST, {**expected, "complete": False})
    barrier()  # every rank sees the manifest and the same completed shards
    completed = {int(path.name.split("_")[1].split(".")[0]) for path in out.glob("shard_*.done")}
    dp_rank, dp_size = data_parallel_rank_and_size()
    writer = _is_writer()
    num_shards = -(-num_samples // shard_size)
    device = next(model.parameters()).device
    model.eval()
    seq_length = None
    for shard in range(dp_rank, num_shards, dp_size):
        if shard in completed:
            continue
        samples = list(range(shard * shard_size, min((shard + 1) * shard_size, num_samples)))
        arrays = None
        for first in range(0, len(samples), micro_batch_size * micro_batches_per_call):
            chunk = samples[first : first + micro_batch_size * micro_batches_per_call]
            batches, fingerprints = [], []
            for start in range(0, len(chunk), micro_batch_size):
                rows = chunk[start : start + micro_batch_size]
                rows = rows + [rows[-1]] * (micro_batch_size - len(rows))  # pad the last one
                batch = _collate([dataset[i] for i in rows], device)
                if seq_length is None:
                    seq_length = batch["tokens"].shape[1]
                if batch["tokens"].shape[1] != seq_length:
                    raise ValueError(
                        f"cache_teacher: sample {rows[0]} has {batch['tokens'].shape[1]} tokens, "
                        f"earlier samples {seq_length}"
                    )
                batches.append(batch)
                fingerprints.append(token_fingerprint(batch["tokens"]).cpu())
            with torch.no_grad():
                results = _teacher_topk_chunk(model, batches, k, dtype)
            if not writer:
                continue
            if arrays is None:
                arrays = _open_shard(out, shard, len(samples), seq_length, k, dtype)
            position = first
            for (values, index, lse), fingerprint in zip(results, fingerprints, strict=True):
                count = min(micro_batch_size, len(chunk) - (position - first))
                rows = slice(position, position + count)
                if dtype == "bf16":
                    values = values.view(torch.int16)  # numpy has no bf16: keep the raw bits
                arrays["values"][rows] = values[:count].numpy().view(_NUMPY_DTYPES[dtype])
                arrays["indices"][rows] = index[:count].numpy()
                arrays["lse"][rows] = lse[:count].numpy()
                arrays["tokens"][rows] = fingerprint[:count].numpy()
                position += count
        if writer:
            for array in arrays.values():
                array.flush()
            marker = {"rows": len(samples), "first": samples[0], "seq_length": seq_length}
            write_json_atomic(_shard_path(out, shard, "done"), marker)
            if on_shard_done is not None:
                on_shard_done(shard)
    barrier()  # every shard is marked before anyone checks
    missing = [s for s in range(num_shards) if not _shard_path(out, s, "done").exists()]
    if missing:
        raise RuntimeError(f"cache_teacher: shards {missing} of {out} were not completed")
    final = {**expected, "complete": True}
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_json_atomic(out / _MANIFEST, final)
    barrier()  # the final manifest exists before any rank returns
    return final


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
        path = self.out_dir / _MANIFEST
        if not path.exists():
            raise ValueError(f"teacher cache: no {_MANIFEST} in {self.out_dir}")
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
                kind: np.load(_shard_path(self.out_dir, shard, f"{kind}.npy"), mmap_mode="r")
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


def _gather_student(student: Tensor, indices: Tensor) -> Tensor:
    """Student logits at global vocabulary ``indices`` from a vocab-parallel shard (autograd).

    Each rank gathers the entries it owns and zeros the rest; the sum over the TP group (identity
    in backward, megatron's ``reduce_from_tensor_model_parallel_region``) assembles them.
    """
    group = resolve_tp_group()
    local_vocab = student.shape[-1]
    if group is None:
        return torch.gather(student, -1, indices)
    local = indices - dist.get_rank(group) * local_vocab
    owned = (local >= 0) & (local < local_vocab)
    picked = torch.gather(student, -1, local.clamp(0, local_vocab - 1))
    return reduce_from_tensor_model_parallel_region(picked.masked_fill(~owned, 0.0))


class _VocabParallelLogSumExps(torch.autograd.Function):
    """Log-sum-exp of vocab-parallel logits over the whole vocabulary and over its tail.

    The tail is the vocabulary without each token's ``excluded`` entries (the teacher's top-k).
    Computing ``log q_tail`` from the tail's own sum, rather than as ``log(1 - sum_i q_i)``,
    keeps it exact when the student's top-k mass is close to 1. Chunked over tokens, one fp32
    chunk of exponentials at a time; backward recomputes them (as ``LogitsKDLoss`` does).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, excluded: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        group = resolve_tp_group()
        rows = logits.shape[0]
        shift = vocab_parallel_max(logits, chunk, group)
        sums = torch.empty(2, rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk):
            end = start + chunk
            exp = torch.exp(logits[start:end].float() - shift[start:end, None])
            sums[0, start:end] = exp.sum(dim=-1)
            target, any_owned = _excluded_targets(excluded[start:end])
            zeros = torch.where(any_owned, 0.0, exp.gather(-1, target))
            sums[1, start:end] = exp.scatter_(-1, target, zeros).sum(dim=-1)
        if group is not None:
            dist.all_reduce(sums, group=group)
        lse = shift + torch.log(sums)  # the tail's is -inf when it is empty
        ctx.save_for_backward(logits, excluded, lse)
        ctx.chunk = chunk
        return lse[0], lse[1]

    @staticmethod
    def backward(ctx: Any, grad_all: Tensor, grad_tail: Tensor) -> tuple:
        logits, excluded, lse = ctx.saved_tensors
        # d lse_all / dx = softmax; d lse_tail / dx = softmax * exp(lse_all - lse_tail) on the
        # tail, 0 on excluded entries. The exponent is capped: beyond exp(80) the tail's mass is
        # below fp32's range anyway.
        ratio = torch.exp((lse[0] - lse[1]).clamp(max=80.0))
        tail_scale = torch.where(torch.isfinite(lse[1]), grad_tail.float() * ratio, 0.0)
        grad_all = grad_all.float()
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            end = start + ctx.chunk
            softmax = torch.exp(logits[start:end].float() - lse[0, start:end, None])
            chunk_grad = softmax * (grad_all[start:end] + tail_scale[start:end])[:, None]
            target, any_owned = _excluded_targets(excluded[start:end])
            fixed = torch.where(
                any_owned,
                softmax.gather(-1, target) * grad_all[start:end, None],
                chunk_grad.gather(-1, target),
            )
            grad[start:end] = chunk_grad.scatter_(-1, target, fixed).to(grad.dtype)
        return grad, None, None


def _excluded_targets(excluded: Tensor) -> tuple[Tensor, Tensor]:
    """Columns to overwrite for each row's excluded entries, safe for one ``scatter_``.

    ``excluded`` holds local vocabulary indices, -1 for entries on another TP rank. Those -1
    slots are pointed at a column the same row really excludes (so every write to a column
    carries the same value); a row excluding nothing locally points all its slots at column 0,
    which the caller rewrites with its own value.

    Returns:
        ``(target [rows, k], any_owned [rows, 1])``.
    """
    owned = excluded >= 0
    any_owned = owned.any(dim=-1, keepdim=True)
    first = torch.where(owned, excluded, torch.full_like(excluded, torch.iinfo(excluded.dtype).max))
    first = torch.where(any_owned, first.amin(dim=-1, keepdim=True), 0)
    return torch.where(owned, excluded, first), any_owned


def _student_log_sum_exps(student: Tensor, indices: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Differentiable full-vocabulary and tail log-sum-exps of vocab-parallel logits.

    Args:
        student: [..., v_local] logits (this rank's contiguous vocabulary shard).
        indices: [..., k] global vocabulary indices excluded from the tail.
        chunk: tokens per chunk.

    Returns:
        fp32 ``(lse_all, lse_tail)``, each [...], identical on every TP rank.
    """
    group = resolve_tp_group()
    local_vocab = student.shape[-1]
    rank = 0 if group is None else dist.get_rank(group)
    local = indices - rank * local_vocab
    local = torch.where((local >= 0) & (local < local_vocab), local, torch.full_like(local, -1))
    flat = student.reshape(-1, local_vocab)
    lse_all, lse_tail = _VocabParallelLogSumExps.apply(
        flat, local.reshape(flat.shape[0], -1), chunk
    )
    return lse_all.reshape(student.shape[:-1]), lse_tail.reshape(student.shape[:-1])


def _x_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``p * (log p - log q)`` with ``0 * anything = 0``."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def offline_topk_kd_loss(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    lse: Tensor,
    temperature: float = 1.0,
    mode: str = "renormalized",
    chunk_size: int = 1024,
) -> Tensor:
    """Per-token forward KL ``KL(teacher || student)`` against cached teacher top-k logits.

    Modes:

    - ``"renormalized"``: both distributions restricted to the teacher's top-k entries and
      renormalized over them, after dividing by ``temperature``; equals
      ``LogitsKDLoss("forward_kl", temperature, top_k=k)`` up to the rounding of the stored values.
      ``lse`` is unused.
    - ``"tail"``: the teacher's full-distribution probabilities ``p_i = exp(v_i - lse)`` on the
      top-k and one tail bucket holding the rest, ``p_tail = 1 - sum_i p_i``; the student likewise
      ``q_i = softmax(student)_i`` over the full vocabulary and ``q_tail`` the softmax mass of the
      other entries (computed from their own log-sum-exp, exact even when tiny). The loss
      is ``sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)``: the exact KL between the two
      distributions coarsened to k + 1 outcomes, a lower bound of the full-vocabulary KL (it
      ignores how each side spreads its tail mass) and equal to it when the teacher's tail is
      empty. Only ``temperature=1``: the cache holds the raw logits' log-sum-exp, and the
      log-sum-exp of ``logits / T`` cannot be recovered from it.

    Args:
        student_logits: [s, b, v_local], the student's logits or this rank's vocabulary shard.
        values: [s, b, k] cached teacher top-k logits (any float dtype; used in fp32).
        indices: [s, b, k] their global vocabulary indices.
        lse: [s, b] cached teacher full log-sum-exp (``"tail"`` only).
        temperature: logits are divided by this before the softmax (no ``T**2`` factor).
        mode: one of :data:`OFFLINE_LOSS_MODES`.
        chunk_size: tokens per chunk of the student's log-sum-exps (``"tail"``), which never
            hold an fp32 copy of all the logits.

    Note:
        :meth:`TeacherCache.lookup` returns ``[b, s, ...]``; transpose its outputs with
        ``.transpose(0, 1)`` to the student's ``[s, b]`` token order.

    Returns:
        fp32 [s, b], identical on every TP rank; gradients flow to ``student_logits`` only.

    Raises:
        ValueError: on an unknown mode, ``temperature != 1`` with ``"tail"``, or mismatched shapes.

    Examples:
        >>> values, indices, lse = (t.transpose(0, 1) for t in cache.lookup(sample_index))
        >>> per_token = offline_topk_kd_loss(student_logits, values, indices, lse, mode="tail")
    """
    problems = Problems()
    problems.one_of("mode", mode, OFFLINE_LOSS_MODES)
    if problems.positive_number("temperature", temperature) and mode == "tail" and temperature != 1:
        problems.append(
            f"temperature={temperature!r} needs mode='renormalized': the cache stores the "
            "log-sum-exp of the raw logits, so the tail mass at another temperature is unknown"
        )
    token_shape = tuple(student_logits.shape[:-1])
    if tuple(values.shape) != tuple(indices.shape) or tuple(values.shape[:-1]) != token_shape:
        problems.append(
            f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must be "
            f"[*{list(token_shape)}, k] like the student logits {tuple(student_logits.shape)}"
        )
    if mode == "tail" and tuple(lse.shape) != token_shape:
        problems.append(f"lse {tuple(lse.shape)} must be {list(token_shape)}")
    if problems:
        raise ValueError("offline_topk_kd_loss: " + "; ".join(problems))
    student = _gather_student(student_logits, indices.long()).float()
    teacher = values.detach().float()
    if mode == "renormalized":
        log_q = torch.log_softmax(student / temperature, dim=-1)
        log_p = torch.log_softmax(teacher / temperature, dim=-1)
        return _x_log_ratio(log_p.exp(), log_p, log_q).sum(dim=-1)
    log_p = teacher - lse.detach().float().unsqueeze(-1)
    lse_all, lse_tail = _student_log_sum_exps(student_logits, indices.long(), chunk_size)
    log_q = student - lse_all.unsqueeze(-1)
    p = log_p.exp()
    top = _x_log_ratio(p, log_p, log_q).sum(dim=-1)
    # The teacher's tail mass from its stored log-sum-exp (clamped: rounding can push the top-k
    # sum just past 1); the student's directly from its tail log-sum-exp.
    tail_p = (1.0 - p.sum(dim=-1)).clamp_min(0.0)
    # k = the whole vocabulary: no tail on either side, whatever rounding left in 1 - sum(p).
    tail_p = torch.where(torch.isfinite(lse_tail), tail_p, torch.zeros_like(tail_p))
    log_tail_p = torch.log(tail_p.clamp_min(torch.finfo(torch.float32).tiny))
    tail = _x_log_ratio(tail_p, log_tail_p, lse_tail - lse_all)
    return top + tail
