"""Offline distillation: cache a teacher's top-k logits once, train students from the cache.

:func:`cache_teacher` runs a teacher (one megatron ``GPTModel`` pipeline stage holding both the
embedding and the output layer, any tensor-parallel size) over micro-batches and stores, per
token, the teacher's global top-k logits (``bf16``/``fp16``/``fp32``), their vocabulary indices
(``int32``) and the log-sum-exp of the teacher's FULL distribution (``fp32``). Rows are keyed by
the dataset's sample index: sample ``i`` lives in shard ``i // shard_size``, row
``i % shard_size``, as numpy ``.npy`` files that :class:`TeacherCache` memory-maps.

On disk (``out_dir``)::

    manifest.json                 what was cached (written atomically; "complete" at the end)
    shard_00000.values.npy        [shard_size, seq_length, k]  top-k logits (bf16 as uint16 bits)
    shard_00000.indices.npy       [shard_size, seq_length, k]  int32 vocabulary indices
    shard_00000.lse.npy           [shard_size, seq_length]     fp32 full log-sum-exp
    shard_00000.done              completion marker (JSON: rows written, largest sample index)

Bytes per token: ``k * (2 + 4) + 4`` with bf16/fp16 values (``k * 8 + 4`` with fp32), e.g.
388 bytes for k=64 in bf16, against ``2 * vocab`` bytes for full bf16 logits (256 KB at 128k).

Resuming: a shard is complete once its done marker exists; a restarted run skips batches whose
samples all lie in complete shards and rewrites every incomplete shard from scratch, so the
result is byte-identical to an uninterrupted run (the teacher forward is deterministic).

:func:`offline_topk_kd_loss` is the per-token loss of student logits against the cache, either
renormalized over the teacher's top-k (equal to ``LogitsKDLoss(top_k=k)``) or with a tail bucket
that keeps the teacher's probability mass outside the top-k.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch import Tensor

__all__ = [
    "CACHE_DTYPES",
    "OFFLINE_LOSS_MODES",
    "TeacherCache",
    "cache_bytes_per_token",
    "cache_teacher",
    "offline_topk_kd_loss",
    "teacher_logits_topk",
    "weights_sha256",
]

CACHE_DTYPES = ("bf16", "fp16", "fp32")
"""Storage dtypes of the cached top-k logit values."""
OFFLINE_LOSS_MODES = ("renormalized", "tail")
"""How :func:`offline_topk_kd_loss` treats the vocabulary outside the teacher's top-k."""

_MANIFEST = "manifest.json"
_NUMPY_DTYPES = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_bytes_per_token(k: int, dtype: str) -> int:
    """Bytes one token takes in the cache: k values, k int32 indices and one fp32 LSE."""
    return k * (torch.finfo(_TORCH_DTYPES[dtype]).bits // 8 + 4) + 4


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of this rank's parameters (names, shapes, dtypes and bytes), in name order.

    Reads every parameter once; cheap for the sizes a cache run can afford to run forward anyway.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tp_group() -> Any:
    if (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_tensor_model_parallel_world_size() > 1
    ):
        return parallel_state.get_tensor_model_parallel_group()
    return None


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
    group = _tp_group()
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
    if world > 1:
        gathered_values = [torch.empty_like(values) for _ in range(world)]
        gathered_index = [torch.empty_like(index) for _ in range(world)]
        dist.all_gather(gathered_values, values.contiguous(), group=group)
        dist.all_gather(gathered_index, index.contiguous(), group=group)
        values = torch.cat(gathered_values, dim=-1)
        index = torch.cat(gathered_index, dim=-1)
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


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _shard_path(out_dir: Path, shard: int, kind: str) -> Path:
    return out_dir / f"shard_{shard:05d}.{kind}"


def _full_manifest(manifest: dict, k: int, dtype: str, shard_size: int) -> dict:
    reserved = {"k", "dtype", "shard_size", "num_samples", "complete"} & manifest.keys()
    if reserved:
        raise ValueError(
            f"teacher cache: manifest keys {sorted(reserved)} are set by cache_teacher; remove them"
        )
    return {**manifest, "k": k, "dtype": dtype, "shard_size": shard_size}


def cache_teacher(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Tensor]],
    out_dir: str | os.PathLike,
    k: int,
    manifest: dict,
    dtype: str = "bf16",
    shard_size: int = 1024,
    on_shard_done: Callable[[int], None] | None = None,
) -> dict:
    """Run ``model`` over ``batches`` and cache its top-k logits per token; resumable.

    Args:
        model: the teacher, a megatron ``GPTModel`` holding the embedding and the output layer
            (a single pipeline stage), at any tensor-parallel size; run in eval mode, no grad.
            Data parallelism is not handled: run it with DP=1 (TP rank 0 writes).
        batches: micro-batches with ``tokens`` [b, s], ``position_ids`` [b, s] and
            ``sample_index`` [b] (the dataset's sample index of each row). Over the whole run the
            sample indices must be exactly ``0 .. N-1``, each once, in any order.
        out_dir: cache directory (created).
        k: top-k entries kept per token.
        manifest: what describes the cache: teacher id/path and weights hash
            (:func:`weights_sha256`), tokenizer, dataset description, ``seq_length``...; stored
            with ``k``, ``dtype``, ``shard_size`` and, once complete, ``num_samples``. A restart
            must pass the same manifest.
        dtype: storage of the top-k values, one of :data:`CACHE_DTYPES`.
        shard_size: samples per shard file.
        on_shard_done: called with the shard number after each shard is marked complete.

    Returns:
        The final manifest (also in ``out_dir/manifest.json``).

    Raises:
        ValueError: on bad arguments, a manifest differing from the one already in ``out_dir``,
            sample indices that are not ``0 .. N-1`` each once, or a sequence length change.

    Examples:
        >>> cache_teacher(teacher, batches, "/data/cache", k=64,
        ...               manifest={"teacher": "llama31_8b", "seq_length": 4096})
    """
    problems = []
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        problems.append(f"k={k!r} must be a positive int")
    if dtype not in CACHE_DTYPES:
        problems.append(f"dtype={dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        problems.append(f"shard_size={shard_size!r} must be a positive int")
    if problems:
        raise ValueError("cache_teacher: " + "; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expected = _full_manifest(dict(manifest), k, dtype, shard_size)
    if (out / _MANIFEST).exists():
        TeacherCache(out).check_manifest(expected)
    # Only rank 0 of the TP group writes; every rank runs the forward and the collectives.
    writer = _tp_group() is None or dist.get_rank(_tp_group()) == 0
    if writer and not (out / _MANIFEST).exists():
        _write_json_atomic(out / _MANIFEST, {**expected, "complete": False})

    if _tp_group() is not None:
        dist.barrier(group=_tp_group())  # all ranks see the same completed shards
    # Shards completed by an earlier run; read once so every TP rank skips the same batches.
    completed = {int(path.name.split("_")[1].split(".")[0]) for path in out.glob("shard_*.done")}
    open_shards: dict[int, dict[str, Any]] = {}
    finished: set[int] = set()

    def finish(shard: int) -> None:
        state = open_shards.pop(shard)
        finished.add(shard)
        for array in state["arrays"].values():
            array.flush()
        marker = {"rows": len(state["rows"]), "max_index": max(state["rows"])}
        _write_json_atomic(_shard_path(out, shard, "done"), marker)
        if on_shard_done is not None:
            on_shard_done(shard)

    seq_length = None
    model.eval()
    for batch in batches:
        sample_index = [int(i) for i in batch["sample_index"]]
        shards = [i // shard_size for i in sample_index]
        if all(shard in completed for shard in shards):
            continue
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(
                batch["tokens"].to(device), batch["position_ids"].to(device), None
            )  # [b, s, v_local]
        values, index, lse = teacher_logits_topk(logits, k)
        if seq_length is None:
            seq_length = logits.shape[1]
        elif logits.shape[1] != seq_length:
            raise ValueError(f"cache_teacher: sequence length {logits.shape[1]} != {seq_length}")
        if not writer:
            continue
        values = values.to(_TORCH_DTYPES[dtype]).cpu()
        if dtype == "bf16":
            values = values.view(torch.int16)  # numpy has no bf16: keep the raw bits
        for row, (sample, shard) in enumerate(zip(sample_index, shards, strict=True)):
            if shard in completed:
                continue
            if shard in finished:
                raise ValueError(f"cache_teacher: sample index {sample} appears twice")
            if shard not in open_shards:
                shape = (shard_size, seq_length)
                open_mode = np.lib.format.open_memmap
                open_shards[shard] = {
                    "rows": set(),
                    "arrays": {
                        "values": open_mode(
                            _shard_path(out, shard, "values.npy"),
                            mode="w+",
                            dtype=_NUMPY_DTYPES[dtype],
                            shape=(*shape, k),
                        ),
                        "indices": open_mode(
                            _shard_path(out, shard, "indices.npy"),
                            mode="w+",
                            dtype=np.int32,
                            shape=(*shape, k),
                        ),
                        "lse": open_mode(
                            _shard_path(out, shard, "lse.npy"),
                            mode="w+",
                            dtype=np.float32,
                            shape=shape,
                        ),
                    },
                }
            state = open_shards[shard]
            if sample in state["rows"]:
                raise ValueError(f"cache_teacher: sample index {sample} appears twice")
            position = sample % shard_size
            state["arrays"]["values"][position] = values[row].numpy().view(_NUMPY_DTYPES[dtype])
            state["arrays"]["indices"][position] = index[row].to(torch.int32).cpu().numpy()
            state["arrays"]["lse"][position] = lse[row].cpu().numpy()
            state["rows"].add(sample)
            if len(state["rows"]) == shard_size:
                finish(shard)
    for shard in sorted(open_shards):
        finish(shard)
    group = _tp_group()
    if group is not None:
        dist.barrier(group=group)  # every shard marker is written before anyone reads them
    # Every rank validates, so all of them raise together instead of one waiting for the rest.
    markers = [json.loads(path.read_text()) for path in sorted(out.glob("shard_*.done"))]
    num_samples = max((marker["max_index"] for marker in markers), default=-1) + 1
    rows = sum(marker["rows"] for marker in markers)
    if rows != num_samples:
        raise ValueError(
            f"cache_teacher: {rows} samples were cached but the largest sample index is "
            f"{num_samples - 1}; sample indices must be 0 .. N-1, each once"
        )
    final = {**expected, "num_samples": num_samples, "complete": True}
    if writer:
        _write_json_atomic(out / _MANIFEST, final)
    if group is not None:
        dist.barrier(group=group)  # the final manifest exists before any rank returns
    return final


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

        Raises:
            ValueError: naming the first differing field (in ``expected``'s order) and both
                values.
        """
        for key, value in expected.items():
            stored = self.manifest.get(key, "<missing>")
            if stored != value:
                raise ValueError(
                    f"teacher cache {self.out_dir}: manifest field {key!r} is {stored!r} in the "
                    f"cache but {value!r} is expected"
                )

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._shards:
            self._shards[shard] = {
                kind: np.load(_shard_path(self.out_dir, shard, f"{kind}.npy"), mmap_mode="r")
                for kind in ("values", "indices", "lse")
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


def _gather_student(student: Tensor, indices: Tensor) -> Tensor:
    """Student logits at global vocabulary ``indices`` from a vocab-parallel shard (autograd).

    Each rank gathers the entries it owns and zeros the rest; the sum over the TP group (identity
    in backward, megatron's ``reduce_from_tensor_model_parallel_region``) assembles them.
    """
    group = _tp_group()
    local_vocab = student.shape[-1]
    if group is None:
        return torch.gather(student, -1, indices)
    local = indices - dist.get_rank(group) * local_vocab
    owned = (local >= 0) & (local < local_vocab)
    picked = torch.gather(student, -1, local.clamp(0, local_vocab - 1))
    return reduce_from_tensor_model_parallel_region(picked.masked_fill(~owned, 0.0))


def _student_log_sum_exp(student: Tensor) -> Tensor:
    """Differentiable full-vocabulary log-sum-exp of vocab-parallel logits."""
    group = _tp_group()
    maximum = student.detach().amax(dim=-1)
    if group is not None:
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(student - maximum.unsqueeze(-1)).sum(dim=-1)
    if group is not None:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
    return maximum + torch.log(sum_exp)


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
) -> Tensor:
    """Per-token forward KL ``KL(teacher || student)`` against cached teacher top-k logits.

    Modes:

    - ``"renormalized"``: both distributions restricted to the teacher's top-k entries and
      renormalized over them, after dividing by ``temperature``; equals
      ``LogitsKDLoss("forward_kl", temperature, top_k=k)`` up to the rounding of the stored values.
      ``lse`` is unused.
    - ``"tail"``: the teacher's full-distribution probabilities ``p_i = exp(v_i - lse)`` on the
      top-k and one tail bucket holding the rest, ``p_tail = 1 - sum_i p_i``; the student likewise
      ``q_i = softmax(student)_i`` over the full vocabulary and ``q_tail = 1 - sum_i q_i``. The loss
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
    problems = []
    if mode not in OFFLINE_LOSS_MODES:
        problems.append(f"mode={mode!r} is not one of {', '.join(OFFLINE_LOSS_MODES)}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        problems.append(f"temperature={temperature!r} must be a number > 0")
    elif mode == "tail" and temperature != 1.0:
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
    log_q = student - _student_log_sum_exp(student_logits.float()).unsqueeze(-1)
    p = log_p.exp()
    top = _x_log_ratio(p, log_p, log_q).sum(dim=-1)
    # Tail masses from log(1 - sum p): clamped, since rounding can push the sum just past 1.
    tail_p = (1.0 - p.sum(dim=-1)).clamp_min(0.0)
    tail_q = (1.0 - log_q.exp().sum(dim=-1)).clamp_min(torch.finfo(torch.float32).tiny)
    tail = _x_log_ratio(
        tail_p, torch.log(tail_p.clamp_min(torch.finfo(torch.float32).tiny)), torch.log(tail_q)
    )
    return top + tail
