"""Benchmark: importing a Hugging Face checkpoint into megatron-core, time and peak memory.

A Llama-shaped checkpoint of about 0.5 B parameters (``--quick``: about 1 M) is written
locally, random, in bf16 (``--dtype fp32`` for fp32), as ``save_pretrained`` lays it out:
``config.json`` (transformers' ``LlamaConfig``), ``model-0000i-of-0000n.safetensors`` shards of
at most ``--max-shard-mb`` and ``model.safetensors.index.json``. It is written tensor by tensor,
one shard in memory at a time, and kept in ``--work-dir`` for later runs.

Every measurement is a fresh process (``tests.helpers.run_distributed``: torchrun, gloo; TP=1 is
one rank, TP=2 two), one torch thread per rank. Per TP size there are two launches: the first
after the weight files were evicted from the page cache (``cold_import_s``, read from disk), the
second with them cached; the memory figures and ratios are the second's (the first's peaks are
kept under ``cold_ranks``). ``--quick`` skips the cold launch. Each rank initializes megatron's
parallel state, imports the libraries the import needs (megatron-core, ModelOpt's importer and
with it transformers), builds the empty megatron model in the checkpoint's dtype
(``--params-dtype`` another one, so that the import casts) and returns freed heap to the OS
(``malloc_trim``), then calls :func:`kd_module.hf.importer.load_hf_weights`. Memory figures, per
rank, from ``/proc/self/status``:

- ``rss_libraries_mb``: resident set before the model is built (interpreter and libraries);
- ``rss_model_mb``: after the model is built (the import's baseline);
- ``peak_rss_mb``: the high-water mark during the import (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the call), so it counts every page the import touched,
  memory-mapped file pages included;
- ``import_increase_mb = peak_rss_mb - rss_model_mb``: what the import needs beyond the model;
- ``peak_over_libraries_mb = peak_rss_mb - rss_libraries_mb``: the model plus the import's
  transient memory, i.e. the memory that grows with the checkpoint;
- ``max_rss_anon_mb`` / ``max_rss_file_mb``: the largest anonymous and file-backed resident sets
  a sampling thread (every 10 ms) saw during the import, to tell copies from mapped file pages;
- ``peak_rss_before_import_mb``: the high-water mark of everything before (building the model).

Targets (issue #17), with the fixed library footprint left out: at TP=1 ``peak_over_libraries``
at most 1.5x the checkpoint's bytes (``tp1_peak_to_checkpoint``); at TP=2, on every rank, at
most the rank's shard of the parameters plus the largest file (``tp2_peak_to_shard_plus_file``).
Ratios of the whole process's peak are reported beside them. Each rank also checks that its
slice of the embedding and of the last MLP weight equal the file's.

The last line of stdout is one JSON object::

    {"machine": {...}, "settings": {...}, "checkpoint": {...},
     "tp1": {"ranks": [{...}], ...}, "tp2": {"ranks": [{...}, {...}], ...}, "targets": {...}}

Examples:
    .venv/bin/python -m bench.hf_import --quick
    .venv/bin/python -m bench.hf_import --work-dir /tmp/kd-bench-hf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_MB = 1024 * 1024
SEQ_LENGTH = 128

MODELS: dict[str, dict[str, Any]] = {
    # 16 x 1536, GQA 12/4 (head 128), SwiGLU 4096, vocab 32000, untied: 0.50 B parameters.
    "full": {
        "vocab_size": 32000,
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 16,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "max_shard_mb": 200,
    },
    "quick": {
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_shard_mb": 0.5,
    },
}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


# ---------------------------------------------------------------- the checkpoint


def _plan_shards(shapes: dict[str, tuple[int, ...]], bytes_per_value: int, limit: int) -> list:
    """Tensor names grouped into files of at most ``limit`` bytes, in order (a tensor larger
    than the limit gets a file of its own), as ``save_pretrained`` groups them."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * bytes_per_value
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_checkpoint(directory: Path, model: dict[str, Any], dtype_name: str, seed: int = 0):
    """Write a random Llama checkpoint to ``directory``, one shard in memory at a time.

    Returns the directory; an existing complete checkpoint with the same settings is reused.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    from kd_module.hf.importer import hf_model_config
    from kd_module.hf.weights import expected_shapes

    marker = directory / "bench-settings.json"
    settings = {"model": model, "dtype": dtype_name, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    fields = {k: v for k, v in model.items() if k != "max_shard_mb"}
    hf_config = transformers.LlamaConfig(
        **fields,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype=DTYPES[dtype_name],
    )
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.save_pretrained(directory)
    config = hf_model_config(directory, seq_length=SEQ_LENGTH)
    # The names and shapes the importer checks against are the ones written.
    shapes = expected_shapes(config, "LlamaForCausalLM")
    dtype = getattr(torch, DTYPES[dtype_name])
    element = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(shapes, element, int(model["max_shard_mb"] * _MB))
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensor = 1.0 + 0.1 * torch.randn(shapes[name], generator=generator)
            else:
                tensor = 0.02 * torch.randn(shapes[name], generator=generator)
            tensors[name] = tensor.to(dtype)
            total += tensors[name].numel() * element
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    marker.write_text(json.dumps(settings))
    return directory


def checkpoint_summary(directory: Path) -> dict[str, Any]:
    """Sizes on disk: all weight files, the largest one, the count, the parameters."""
    files = sorted(directory.glob("*.safetensors"))
    sizes = [f.stat().st_size for f in files]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    settings = json.loads((directory / "bench-settings.json").read_text())
    element = 2 if settings["dtype"] == "bf16" else 4
    return {
        "directory": str(directory),
        "dtype": settings["dtype"],
        "num_files": len(files),
        "checkpoint_bytes": sum(sizes),
        "largest_file_bytes": max(sizes),
        "tensor_bytes": index["metadata"]["total_size"],
        "num_parameters": index["metadata"]["total_size"] // element,
    }


# ---------------------------------------------------------------- one rank's measurement


def _status_kb(*keys: str) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    return out


def _rss_mb() -> float:
    return _status_kb("VmRSS")["VmRSS"] / 1024


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the baseline is what the model holds."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include freed pages
        pass


class _Sampler:
    """The largest anonymous and file-backed resident sets seen, sampled every 10 ms."""

    def __init__(self) -> None:
        self.max_anon_kb = 0
        self.max_file_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = _status_kb("RssAnon", "RssFile")
            self.max_anon_kb = max(self.max_anon_kb, now["RssAnon"])
            self.max_file_kb = max(self.max_file_kb, now["RssFile"])
            self._stop.wait(0.01)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _slices_match(model: Any, directory: str) -> bool:
    """This rank's embedding rows and last fc2 columns equal the checkpoint's."""
    import torch
    from megatron.core import parallel_state
    from safetensors import safe_open

    from kd_module.hf.weights import weight_files

    files = weight_files(directory)
    rank = parallel_state.get_tensor_model_parallel_rank()

    def read(name: str, dim: int, part: int) -> torch.Tensor:
        with safe_open(str(files.directory / files.tensor_file[name]), framework="pt") as f:
            piece = f.get_slice(name)
            size = piece.get_shape()[dim] // part
            index = [slice(None)] * len(piece.get_shape())
            index[dim] = slice(rank * size, (rank + 1) * size)
            return piece[tuple(index)]

    tp = parallel_state.get_tensor_model_parallel_world_size()
    last = len(model.decoder.layers) - 1
    embedding = model.embedding.word_embeddings.weight
    fc2 = model.decoder.layers[last].mlp.linear_fc2.weight
    return torch.equal(embedding, read("model.embed_tokens.weight", 0, tp)) and torch.equal(
        fc2, read(f"model.layers.{last}.mlp.down_proj.weight", 1, tp)
    )


def measure_import(
    directory: str, tensor_model_parallel_size: int, params_dtype: str
) -> dict[str, Any]:
    """On each rank: build the empty megatron model, then time and measure the HF import."""
    # Libraries the import uses, imported before the baseline: their cost does not grow with
    # the checkpoint.
    import modelopt.torch.export.plugins.megatron_importer  # noqa: F401
    import torch

    from bench._common import _reset_hwm
    from kd_module.hf.importer import hf_model_config, load_hf_weights
    from kd_module.models.gpt import ParallelLayout, build_model
    from kd_module.parallel import runtime

    torch.set_num_threads(1)
    runtime.initialize_distributed(tensor_model_parallel_size, 1, seed=0)
    config = hf_model_config(directory, seq_length=SEQ_LENGTH)
    dtype = getattr(torch, DTYPES[params_dtype])
    _trim_heap()
    rss_libraries = _rss_mb()
    start = time.perf_counter()
    model = build_model(config, ParallelLayout(tensor_model_parallel_size, 1), params_dtype=dtype)
    build_s = time.perf_counter() - start
    _trim_heap()
    rss_model = _rss_mb()
    peak_before = _status_kb("VmHWM")["VmHWM"] / 1024
    shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.distributed.barrier()
    _reset_hwm()
    with _Sampler() as sampler:
        start = time.perf_counter()
        load_hf_weights(model, directory, config)
        import_s = time.perf_counter() - start
    peak = _status_kb("VmHWM")["VmHWM"] / 1024
    rss_after = _rss_mb()

    return {
        "rank": torch.distributed.get_rank(),
        "rank_shard_bytes": shard_bytes,
        "build_s": build_s,
        "import_s": import_s,
        "rss_libraries_mb": rss_libraries,
        "rss_model_mb": rss_model,
        "peak_rss_mb": peak,
        "rss_after_import_mb": rss_after,
        "import_increase_mb": peak - rss_model,
        "peak_over_libraries_mb": peak - rss_libraries,
        "max_rss_anon_mb": sampler.max_anon_kb / 1024,
        "max_rss_file_mb": sampler.max_file_kb / 1024,
        "peak_rss_before_import_mb": peak_before,
        "weights_match": _slices_match(model, directory),
    }


# ---------------------------------------------------------------- the driver


def evict_page_cache(directory: Path) -> None:
    """Drop the weight files' pages from the page cache (``POSIX_FADV_DONTNEED``: clean pages,
    no privileges needed), so that the next import reads them from disk."""

    for path in directory.glob("*.safetensors"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _launch(directory: Path, tp: int, params_dtype: str, timeout: float) -> list[dict[str, Any]]:
    from tests.helpers import run_distributed

    # By name: under ``python -m`` this module is ``__main__``, which ranks cannot import.
    return run_distributed(
        "bench.hf_import:measure_import", tp, str(directory), tp, params_dtype, timeout=timeout
    )


def run_layout(
    directory: Path,
    tp: int,
    params_dtype: str,
    checkpoint: dict[str, Any],
    timeout: float,
    cold_cache: bool = True,
) -> dict[str, Any]:
    """Fresh launches at TP=``tp``: with ``cold_cache``, first one with the files evicted from
    the page cache (``cold_*``), then one with them cached, whose worst rank gives the memory
    figures and the ratios."""
    cold = []
    if cold_cache:
        evict_page_cache(directory)
        cold = _launch(directory, tp, params_dtype, timeout)
    ranks = _launch(directory, tp, params_dtype, timeout)
    ckpt_mb = checkpoint["checkpoint_bytes"] / _MB
    file_mb = checkpoint["largest_file_bytes"] / _MB
    worst = max(ranks, key=lambda r: r["peak_over_libraries_mb"])
    shard_plus_file_mb = worst["rank_shard_bytes"] / _MB + file_mb
    return {
        "ranks": ranks,
        "import_s": max(r["import_s"] for r in ranks),
        "cold_import_s": max((r["import_s"] for r in cold), default=None),
        "cold_peak_rss_mb": max((r["peak_rss_mb"] for r in cold), default=None),
        "peak_over_libraries_to_checkpoint": worst["peak_over_libraries_mb"] / ckpt_mb,
        "peak_rss_to_checkpoint": worst["peak_rss_mb"] / ckpt_mb,
        "import_increase_to_largest_file": worst["import_increase_mb"] / file_mb,
        "peak_over_libraries_to_shard_plus_file": worst["peak_over_libraries_mb"]
        / shard_plus_file_mb,
        "peak_rss_to_shard_plus_file": worst["peak_rss_mb"] / shard_plus_file_mb,
        "weights_match": all(r["weights_match"] for r in ranks + cold),
        "cold_ranks": cold,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 M parameter model (CI smoke)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="checkpoint's")
    parser.add_argument(
        "--params-dtype",
        choices=sorted(DTYPES),
        default=None,
        help="the megatron model's (default: the checkpoint's; another one makes the import cast)",
    )
    parser.add_argument("--max-shard-mb", type=float, default=None, help="largest weight file")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the checkpoint is written and kept (default: a temporary directory, removed)",
    )
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    options = parser.parse_args(argv)
    name = "quick" if options.quick else "full"
    model = dict(MODELS[name])
    params_dtype = options.params_dtype or options.dtype
    if options.max_shard_mb:
        model["max_shard_mb"] = options.max_shard_mb

    temporary = None
    if options.work_dir is None:
        temporary = tempfile.mkdtemp(prefix="kd-bench-hf-")
        work = Path(temporary)
    else:
        work = Path(options.work_dir)
    try:
        directory = work / f"llama-{name}-{options.dtype}"
        start = time.perf_counter()
        write_checkpoint(directory, model, options.dtype)
        print(f"[bench.hf_import] checkpoint {directory} ready", file=sys.stderr, flush=True)
        checkpoint = checkpoint_summary(directory)
        checkpoint["prepare_s"] = time.perf_counter() - start
        summary: dict[str, Any] = {
            "benchmark": "HF safetensors import (kd_module.hf.importer.load_hf_weights) into "
            "megatron-core: time and peak RSS against the checkpoint's size",
            "machine": _machine(),
            "settings": {
                "model": name,
                "architecture": "LlamaForCausalLM",
                "hf_config": {k: v for k, v in model.items() if k != "max_shard_mb"},
                "max_shard_mb": model["max_shard_mb"],
                "dtype": options.dtype,
                "megatron_params_dtype": params_dtype,
                "torch_threads_per_rank": 1,
                "page_cache": "cold_*: weight files evicted (POSIX_FADV_DONTNEED) before a launch "
                "(not with --quick); the rest: a launch with the files in the page cache",
                "peak_rss": "VmHWM during load_hf_weights (reset just before), per rank",
            },
            "checkpoint": checkpoint,
        }
        for tp in options.tp:
            result = run_layout(
                directory, tp, params_dtype, checkpoint, options.timeout, not options.quick
            )
            summary[f"tp{tp}"] = result
            print(f"[bench.hf_import] TP={tp}: {json.dumps(result)}", file=sys.stderr, flush=True)
        summary["targets"] = _targets(summary)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    print(json.dumps(summary))
    return summary


def _machine() -> dict[str, Any]:
    from bench._common import machine_description

    return machine_description()


def _targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Issue #17's targets, the process's fixed library footprint left out."""
    targets: dict[str, Any] = {}
    if "tp1" in summary:
        ratio = summary["tp1"]["peak_over_libraries_to_checkpoint"]
        targets["tp1_peak_to_checkpoint"] = {"value": ratio, "limit": 1.5, "met": ratio <= 1.5}
    if "tp2" in summary:
        ratio = summary["tp2"]["peak_over_libraries_to_shard_plus_file"]
        targets["tp2_peak_to_shard_plus_file"] = {
            "value": ratio,
            "limit": 1.0,
            "met": ratio <= 1.0,
        }
    return targets


if __name__ == "__main__":
    main()
