"""Writing a teacher cache: :func:`cache_teacher` runs a teacher (megatron ``GPTModel`` stages at
any tensor/pipeline/data parallel layout) over samples ``0 .. N-1`` of a megatron dataset and
stores, per token, its global top-k logits, their vocabulary indices and the log-sum-exp of the
teacher's FULL distribution (format: :mod:`kd_module.offline.format`). Interrupted, it resumes:
only incomplete shards are computed again."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from kd_module.checkpoints.atomic import write_json_atomic
from kd_module.data.datamodule import data_parallel_rank_and_size, model_inputs
from kd_module.distillation.losses import all_gather_last_dim, resolve_tp_group
from kd_module.offline.format import (
    CACHE_DTYPES,
    MANIFEST_FILE,
    NUMPY_DTYPES,
    manifest_with_settings,
    shard_path,
    token_fingerprint,
)
from kd_module.offline.reader import TeacherCache
from kd_module.parallel.collectives import barrier
from kd_module.rules import Problems
from kd_module.training.precision import DTYPES


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


def teacher_logits_topk(
    logits: Tensor, k: int, shared_vocab_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-k and full log-sum-exp of vocab-parallel logits.

    Each tensor-parallel rank takes its local top-k; candidates are gathered over the TP group and
    the global top-k picked among them (as ``LogitsKDLoss``'s top-k does). The log-sum-exp of the
    full distribution reduces the per-token maximum and sum of exponentials over the group.

    With ``shared_vocab_size`` ``N`` the distribution is the one over the real vocabulary
    ``[0, N)``: padding columns at or beyond ``N`` are never among the top-k and are left out of
    the log-sum-exp. A rank with fewer real columns than the others fills its candidate slots
    (the gather needs equal sizes) with ``-inf``, which ``k <= N`` finite logits always beat.

    Args:
        logits: [..., v_local], this rank's contiguous vocabulary shard.
        k: entries to keep; at most the full (or the shared) vocabulary.
        shared_vocab_size: the tokenizer's size ``N``, or ``None`` for the whole padded
            vocabulary.

    Returns:
        ``(values, indices, lse)``: values [..., k] in the input dtype, sorted descending; global
        vocabulary indices [..., k] (int64); fp32 log-sum-exp [...]. Identical on every TP rank.

    Raises:
        ValueError: when ``k`` exceeds the vocabulary, or the padded vocabulary is smaller than
            ``shared_vocab_size``.
    """
    group = resolve_tp_group()
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    local_vocab = logits.shape[-1]
    vocab = local_vocab * world
    if shared_vocab_size is not None and shared_vocab_size > vocab:
        raise ValueError(
            f"teacher cache: shared_vocab_size={shared_vocab_size} is larger than the teacher's "
            f"padded vocabulary ({vocab})"
        )
    vocab = vocab if shared_vocab_size is None else shared_vocab_size
    if k > vocab:
        raise ValueError(f"teacher cache: k={k} is larger than the vocabulary ({vocab})")
    slots = min(k, local_vocab)
    valid = min(max(vocab - rank * local_vocab, 0), local_vocab)
    token_shape = logits.shape[:-1]
    rows = logits.reshape(-1, local_vocab)[:, :valid]  # a view: no copy of the logits
    values, index = torch.topk(rows, min(slots, valid), dim=-1)
    index = index + rank * local_vocab
    if valid < slots:
        pad = slots - valid
        values = torch.cat([values, values.new_full((values.shape[0], pad), -math.inf)], -1)
        index = torch.cat([index, index.new_zeros((index.shape[0], pad))], -1)
    values, index = values.reshape(*token_shape, slots), index.reshape(*token_shape, slots)
    if valid:
        maximum = rows.amax(dim=-1).float().reshape(token_shape)
    else:  # this rank holds only padding
        maximum = torch.full(token_shape, -math.inf, device=logits.device)
    values, index = all_gather_last_dim([values, index], group)
    if world > 1:
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
    # Chunked over tokens: no fp32 copy of all the logits at once.
    flat_max = maximum.reshape(-1, 1)
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


def _is_writer() -> bool:
    """The rank that writes its replica's shards: last pipeline stage, tensor-parallel rank 0."""
    if not parallel_state.model_parallel_is_initialized():
        return True
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def _teacher_topk_chunk(
    model: torch.nn.Module,
    batches: list[dict[str, Tensor]],
    k: int,
    dtype: str,
    shared_vocab_size: int | None = None,
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
            values, index, lse = teacher_logits_topk(logits, k, shared_vocab_size)
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
            shard_path(out, shard, f"{kind}.npy"), mode="w+", dtype=np_dtype, shape=shape
        )

    return {
        "values": create("values", NUMPY_DTYPES[dtype], (rows, seq_length, k)),
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
    shared_vocab_size: int | None = None,
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
        shared_vocab_size: the tokenizer's size ``N`` when the teacher's embedding table is
            padded beyond it: the top-k and log-sum-exp are over ``[0, N)`` (no stored index is
            ``>= N``) and the manifest records it, so that a student with another padding
            distills over the same vocabulary. ``None``: the teacher's whole padded vocabulary.

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
    if (
        shared_vocab_size is not None
        and problems.positive_int("shared_vocab_size", shared_vocab_size)
        and isinstance(k, int)
        and k > shared_vocab_size
    ):
        problems.add(f"k={k} is larger than shared_vocab_size={shared_vocab_size}")
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
    manifest = dict(manifest)
    if shared_vocab_size is not None:
        manifest["shared_vocab_size"] = shared_vocab_size
    expected = manifest_with_settings(manifest, k, dtype, shard_size, num_samples)
    if (out / MANIFEST_FILE).exists():
        TeacherCache(out).check_manifest(expected)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MANIFEST_FILE).exists():
            write_json_atomic(out / MANIFEST_FILE, {**expected, "complete": False})
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
                batch = model_inputs([dataset[i] for i in rows], device)
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
                results = _teacher_topk_chunk(model, batches, k, dtype, shared_vocab_size)
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
                arrays["values"][rows] = values[:count].numpy().view(NUMPY_DTYPES[dtype])
                arrays["indices"][rows] = index[:count].numpy()
                arrays["lse"][rows] = lse[:count].numpy()
                arrays["tokens"][rows] = fingerprint[:count].numpy()
                position += count
        if writer:
            for array in arrays.values():
                array.flush()
            marker = {"rows": len(samples), "first": samples[0], "seq_length": seq_length}
            write_json_atomic(shard_path(out, shard, "done"), marker)
            if on_shard_done is not None:
                on_shard_done(shard)
    barrier()  # every shard is marked before anyone checks
    missing = [s for s in range(num_shards) if not shard_path(out, s, "done").exists()]
    if missing:
        raise RuntimeError(f"cache_teacher: shards {missing} of {out} were not completed")
    final = {**expected, "complete": True}
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_json_atomic(out / MANIFEST_FILE, final)
    barrier()  # the final manifest exists before any rank returns
    return final
