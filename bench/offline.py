"""Benchmark: offline distillation (from a teacher cache) against online distillation.

For each teacher/student pair it measures, in one invocation:

- the cache: ``bytes_per_token`` on disk (top-k values, int32 indices, fp32 log-sum-exp, plus the
  per-sample token fingerprint) next to what full bf16 logits would take, and the time to build
  it per token (``nemo kd cache-teacher``'s work: the teacher forward, the top-k and the writes);
- training: the median step time and the peak memory of online distillation (student + frozen
  teacher) and of offline distillation (student + cache), each in a fresh subprocess so that
  peak memory is the run's own. Repetitions alternate the order (online first, then offline
  first) and medians are reported, so drift of a shared machine hits both alike.

``step_time_ratio = offline_step_s / online_step_s`` and ``peak_memory_ratio =
offline_peak_mb / online_peak_mb``; peak memory is the growth of the process's resident set
during ``Trainer.fit`` (models, optimizer, activations; for offline runs the cache pages read).

Pairs: ``tiny`` is the demo's (teacher 4 x 128, student 1 x 64, byte vocabulary padded to 320,
seq 128, k=32 in fp16, as ``nemo kd cache-teacher --factory tiny_cpu``); ``larger`` is
``kd_overhead``'s (teacher 8 x 512, student 4 x 256, vocab 8192, seq 256, k=64 in bf16). Both
use megatron's mock dataset, fp32 weights, one torch thread per process.

The last line of stdout is one JSON object::

    {"machine": {...}, "settings": {...}, "pairs": {"tiny": {...}, "larger": {...}}}

Examples:
    .venv/bin/python -m bench.offline --quick
    .venv/bin/python -m bench.offline --steps 12 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._common import machine_description

PAIRS: dict[str, dict[str, Any]] = {
    "tiny": {
        "teacher": {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4},
        "student": {"num_layers": 1, "hidden_size": 64, "num_attention_heads": 4},
        "vocab_size": 320,
        "seq_length": 128,
        "micro_batch_size": 8,
        "global_batch_size": 16,
        "k": 32,
        "dtype": "fp16",
    },
    "larger": {
        "teacher": {"num_layers": 8, "hidden_size": 512, "num_attention_heads": 8},
        "student": {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4},
        "vocab_size": 8192,
        "seq_length": 256,
        "micro_batch_size": 4,
        "global_batch_size": 4,
        "k": 64,
        "dtype": "bf16",
    },
}
WARMUP_STEPS = 2
"""Steps left out of the median (lazy initialization, first allocations)."""


def _configs(pair: dict[str, Any]) -> tuple[Any, Any]:
    from kd_module.models.gpt import GPTModelConfig

    common = {"seq_length": pair["seq_length"], "vocab_size": pair["vocab_size"]}
    return GPTModelConfig(**pair["teacher"], **common), GPTModelConfig(**pair["student"], **common)


def _data(pair: dict[str, Any], num_samples: int) -> Any:
    from kd_module.data import GPTDataModule

    return GPTDataModule(
        mock=True,
        seq_length=pair["seq_length"],
        micro_batch_size=pair["micro_batch_size"],
        global_batch_size=pair["global_batch_size"],
        num_train_samples=num_samples,
    )


def _teacher_init(model: Any) -> None:
    from tests.helpers import init_weights_by_global_key

    init_weights_by_global_key(model, seed=2, std=0.3)


def _student_init(model: Any) -> None:
    from tests.helpers import init_weights_by_global_key

    init_weights_by_global_key(model, seed=1)


def child_cache(pair: dict[str, Any], num_samples: int, out_dir: str) -> dict[str, Any]:
    """Build the cache; its size on disk and the time it took."""
    import time

    import numpy as np

    from kd_module.offline.job import build_teacher_cache
    from kd_module.specs import TeacherSpec

    teacher, _ = _configs(pair)
    start = time.perf_counter()
    build_teacher_cache(
        _data(pair, num_samples),
        out_dir,
        TeacherSpec(config=teacher),
        k=pair["k"],
        dtype=pair["dtype"],
        shard_size=64,
        accelerator="cpu",
        precision="fp32",
        teacher_init_fn=_teacher_init,
    )
    seconds = time.perf_counter() - start
    tokens = num_samples * pair["seq_length"]
    files = list(Path(out_dir).glob("shard_*.npy"))
    on_disk = sum(path.stat().st_size for path in files)
    data_bytes = sum(np.load(path, mmap_mode="r").nbytes for path in files)  # no .npy headers
    return {
        "cache_s": seconds,
        "tokens": tokens,
        "bytes_per_token": data_bytes / tokens,
        "disk_bytes_per_token": on_disk / tokens,
        "cache_s_per_1k_tokens": 1000 * seconds / tokens,
    }


def child_train(pair: dict[str, Any], mode: str, steps: int, cache_dir: str) -> dict[str, Any]:
    """One fit, online or offline; median step time and peak RSS growth over the fit."""
    import lightning as L

    from bench._common import _hwm_mb, _reset_hwm, _rss_mb
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy

    teacher, student = _configs(pair)
    optimizer = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1)
    if mode == "online":
        from kd_module.training.module import DistillationModule

        module: Any = DistillationModule(
            student,
            teacher,
            distill_config={"logit_kl_topk": pair["k"]},
            optimizer=optimizer,
            student_init_fn=_student_init,
            teacher_init_fn=_teacher_init,
        )
    else:
        from kd_module.offline.module import OfflineDistillationModule

        module = OfflineDistillationModule(
            student,
            cache_dir,
            offline_loss_mode="tail",
            optimizer=optimizer,
            student_init_fn=_student_init,
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    _reset_hwm()
    before = _rss_mb()
    trainer.fit(module, datamodule=_data(pair, steps * pair["global_batch_size"]))
    peak = _hwm_mb() - before
    times = module.step_times[WARMUP_STEPS:] or module.step_times
    return {"step_s": statistics.median(times), "peak_mb": peak, "steps": len(module.step_times)}


def _run_child(*arguments: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.offline", "--child", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench child {arguments} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_pair(name: str, steps: int, repeats: int, work_dir: Path) -> dict[str, Any]:
    """Cache, then alternate online and offline fits; medians and ratios."""
    pair = PAIRS[name]
    cache_dir = str(work_dir / f"cache-{name}")
    num_samples = steps * pair["global_batch_size"]
    cache = _run_child("cache", name, str(num_samples), cache_dir)
    runs: dict[str, list[dict[str, Any]]] = {"online": [], "offline": []}
    for repeat in range(repeats):
        order = ("online", "offline") if repeat % 2 == 0 else ("offline", "online")
        for mode in order:
            runs[mode].append(_run_child(mode, name, str(steps), cache_dir))
    online_s = statistics.median(run["step_s"] for run in runs["online"])
    offline_s = statistics.median(run["step_s"] for run in runs["offline"])
    online_mb = statistics.median(run["peak_mb"] for run in runs["online"])
    offline_mb = statistics.median(run["peak_mb"] for run in runs["offline"])
    return {
        "settings": pair,
        "cache": {
            **cache,
            "full_bf16_logits_bytes_per_token": 2 * pair["vocab_size"],
        },
        "online_step_s": online_s,
        "offline_step_s": offline_s,
        "step_time_ratio": offline_s / online_s,
        "online_peak_mb": online_mb,
        "offline_peak_mb": offline_mb,
        "peak_memory_ratio": offline_mb / online_mb,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pair, 4 steps, 1 repeat")
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["tiny", "larger"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)
        kind, name, number, *rest = args.child
        pair = PAIRS[name]
        if kind == "cache":
            result = child_cache(pair, int(number), rest[0])
        else:
            result = child_train(pair, kind, int(number), rest[0])
        print(json.dumps(result))
        return
    if args.quick:
        args.pairs, args.steps, args.repeats = ["tiny"], WARMUP_STEPS + 2, 1
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as work:
        pairs = {
            name: bench_pair(name, args.steps, args.repeats, Path(work)) for name in args.pairs
        }
    summary = {
        "machine": machine_description(),
        "settings": {"steps": args.steps, "repeats": args.repeats, "warmup_steps": WARMUP_STEPS},
        "pairs": pairs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
