"""Benchmark: tokens/s of a tiny CPU distillation fit at DP=1, DP=2, TP=2 and PP=2.

Each layout is a real Lightning ``Trainer.fit`` of a
:class:`~kd_module.training.module.DistillationModule`
through :class:`~kd_module.training.strategy.MegatronStrategy` on mock data, with the same global
batch
and micro-batch size everywhere (so DP=2 runs half the micro-batches per rank). DP=1 runs on one
torchrun rank; DP=2, TP=2 and PP=2 run one after the other in the same two ranks (one launch:
each rank pays its imports once). A callback stamps the end of every training step on rank 0;
throughput is ``global_batch_size * seq_length * measured_steps`` over the wall time from the end
of the last warmup step to the end of the last step, so start-up and first-step costs are
excluded. ``compute_tokens_per_s`` uses the module's own step timer instead (forward-backward and
optimizer step only, without Lightning's loop and the data loader).

Every rank gets ``cpu_count // ranks`` torch threads: on a 2-core machine DP=1 uses both cores
with 2 threads, and the 2-rank layouts share the same 2 cores with one thread each, so the
ratios compare layouts on equal hardware, not scaling to more hardware. The full run adds
``dp1_1thread`` (one rank, one thread): on a busy machine two OpenMP threads can lose far more
to oversubscription than they gain, and this row tells the two effects apart.

The architectures are the demo's (``examples.demo``: ``TINY_TEACHER`` and ``TINY_STUDENT`` with
2 layers instead of 1, so that PP=2 can split it).

The last line of stdout is one JSON object::

    {"machine": {...}, "versions": {...}, "settings": {...}, "note": "...",
     "layouts": [{"layout": "dp1", "tokens_per_s": ..., "ratio_to_dp1": 1.0, ...}, ...]}

Examples:
    .venv/bin/python -m bench.throughput --quick
    .venv/bin/python -m bench.throughput --measured-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from itertools import pairwise
from typing import Any

from bench._common import machine_description
from examples.demo import SEQ_LENGTH, TINY_STUDENT, TINY_TEACHER
from kd_module.models.gpt import GPTModelConfig

LAYOUTS = (
    ("dp1", 1, 1, 1, None),
    ("dp1_1thread", 1, 1, 1, 1),
    ("dp2", 2, 1, 1, None),
    ("tp2", 2, 2, 1, None),
    ("pp2", 2, 1, 2, None),
)
"""``(name, ranks, tensor_model_parallel_size, pipeline_model_parallel_size, threads_per_rank)``;
``None`` threads: ``cpu_count // ranks``."""
QUICK_SKIPS = ("dp1_1thread",)
"""Layouts ``--quick`` leaves out."""
STUDENT_SEED, TEACHER_SEED = 1, 2

QUICK_STUDENT = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32)
QUICK_TEACHER = QUICK_STUDENT.replace(hidden_size=64)


@dataclass
class ThroughputCase:
    """Model sizes, batch and steps of one throughput measurement (the same for every layout)."""

    student: GPTModelConfig = field(default_factory=lambda: TINY_STUDENT.replace(num_layers=2))
    """The student's architecture (the demo's, 2 layers so that PP=2 can split it)."""
    teacher: GPTModelConfig = field(default_factory=lambda: TINY_TEACHER)
    """The teacher's architecture."""
    seq_length: int = SEQ_LENGTH
    """Tokens per sample."""
    micro_batch_size: int = 4
    """Samples per micro-batch (every layout)."""
    global_batch_size: int = 16
    """Samples per optimizer step (every layout)."""
    warmup_steps: int = 3
    """Steps not measured (first-call allocations, lazy imports)."""
    measured_steps: int = 10
    """Steps measured after the warmup."""

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "seq_length",
            "micro_batch_size",
            "global_batch_size",
            "warmup_steps",
            "measured_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive int")
        if not problems and self.global_batch_size % (2 * self.micro_batch_size):
            problems.append(
                f"global_batch_size={self.global_batch_size} must be a multiple of "
                f"2 x micro_batch_size={self.micro_batch_size} (DP=2 splits it)"
            )
        for who in ("student", "teacher"):
            config = getattr(self, who)
            if config.num_layers % 2 or config.num_attention_heads % 2:
                problems.append(
                    f"{who}: num_layers={config.num_layers} and num_attention_heads="
                    f"{config.num_attention_heads} must be even (PP=2, TP=2)"
                )
        if problems:
            raise ValueError("throughput case: " + "; ".join(problems))

    @property
    def total_steps(self) -> int:
        """Warmup plus measured steps."""
        return self.warmup_steps + self.measured_steps


QUICK_CASE = dict(
    student=QUICK_STUDENT,
    teacher=QUICK_TEACHER,
    seq_length=32,
    micro_batch_size=2,
    global_batch_size=8,
    warmup_steps=1,
    measured_steps=3,
)
"""``--quick``: a few tiny steps per layout, to check that everything runs."""


def _step_clock() -> Any:
    """A Lightning callback stamping ``time.perf_counter()`` at the end of every training step."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.step_ends: list[float] = []

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self.step_ends.append(time.perf_counter())

    return StepClock()


def fit_layout(case: ThroughputCase, tp: int, pp: int) -> dict[str, Any]:
    """One distillation fit on this torchrun group at (TP, PP); DP is the rest of the world.

    Returns:
        Step end times, the module's own per-step times and the last logged metrics.
    """
    import lightning as L

    from kd_module.data import GPTDataModule
    from kd_module.training.module import DistillationModule
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy
    from tests.helpers import init_weights_by_global_key

    module = DistillationModule(
        case.student.replace(seq_length=case.seq_length),
        case.teacher.replace(seq_length=case.seq_length),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1),
        student_init_fn=lambda m: init_weights_by_global_key(m, seed=STUDENT_SEED),
        teacher_init_fn=lambda m: init_weights_by_global_key(m, seed=TEACHER_SEED),
    )
    data = GPTDataModule(
        mock=True,
        seq_length=case.seq_length,
        micro_batch_size=case.micro_batch_size,
        global_batch_size=case.global_batch_size,
        num_train_samples=case.total_steps * case.global_batch_size,
        num_val_samples=case.global_batch_size,
    )
    clock = _step_clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("WORLD_SIZE", "1")),
        strategy=MegatronStrategy(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        max_steps=case.total_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=data)
    return {
        "step_ends": clock.step_ends,
        "module_step_s": list(module.step_times),
        "kd_loss": module.last_train_metrics.get("kd_loss"),
    }


def rank_fits(
    case_fields: dict[str, Any], layouts: list[tuple[str, int, int, int | None]]
) -> list[dict[str, Any]]:
    """One rank of a launch: every ``(name, tp, pp, threads)`` layout in turn, in this process.

    ``case_fields`` are the :class:`ThroughputCase` fields (the class itself does not pickle
    across ``python -m``: there it belongs to ``__main__``).
    """
    import torch

    case = ThroughputCase(**case_fields)
    if not torch.distributed.is_initialized():
        # A process group made here outlives each fit: the strategy's teardown destroys only a
        # group kd_module.parallel.runtime created, and re-creating one under the same torchrun
        # store
        # reads the previous group's stale addresses (gloo: connection refused).
        torch.distributed.init_process_group(backend="gloo")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    results = []
    for name, tp, pp, threads in layouts:
        threads = threads or max(1, (os.cpu_count() or 1) // ranks)
        torch.set_num_threads(threads)
        result = fit_layout(case, tp, pp)
        results.append({"layout": name, "threads_per_rank": threads, **result})
    return results


def summarize_layout(
    case: ThroughputCase, name: str, ranks: int, tp: int, pp: int, result: dict[str, Any]
) -> dict[str, Any]:
    """Tokens/s over the measured steps (rank 0's clock) and the step-time statistics."""
    ends = result["step_ends"]
    if len(ends) != case.total_steps:
        raise RuntimeError(f"{name}: expected {case.total_steps} steps, clock saw {len(ends)}")
    tokens_per_step = case.global_batch_size * case.seq_length
    measured = ends[case.warmup_steps - 1 :]
    wall = measured[-1] - measured[0]
    step_seconds = [b - a for a, b in pairwise(measured)]
    module_steps = result["module_step_s"][case.warmup_steps :]
    return {
        "layout": name,
        "ranks": ranks,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "data_parallel_size": ranks // (tp * pp),
        "threads_per_rank": result["threads_per_rank"],
        "tokens_per_s": round(tokens_per_step * case.measured_steps / wall, 2),
        "best_step_tokens_per_s": round(tokens_per_step / min(step_seconds), 2),
        "step_s_median": round(statistics.median(step_seconds), 5),
        "step_s_samples": [round(s, 5) for s in step_seconds],
        "compute_tokens_per_s": round(tokens_per_step * len(module_steps) / sum(module_steps), 2),
        "final_kd_loss": result["kd_loss"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON summary as the last line of stdout."""
    from kd_module.versions import package_versions
    from tests.helpers import run_distributed

    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--warmup-steps", type=int, help="unmeasured steps (default 3, quick 1)")
    parser.add_argument("--measured-steps", type=int, help="measured steps (default 10, quick 3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    options = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK_CASE) if options.quick else {}
    if options.warmup_steps is not None:
        overrides["warmup_steps"] = options.warmup_steps
    if options.measured_steps is not None:
        overrides["measured_steps"] = options.measured_steps
    case = ThroughputCase(**overrides)
    load_before = os.getloadavg()

    # By name: under ``python -m`` this module is ``__main__``, which ranks cannot import.
    target = "bench.throughput:rank_fits"
    rows = []
    layouts = [layout for layout in LAYOUTS if not (options.quick and layout[0] in QUICK_SKIPS)]
    for ranks in sorted({layout[1] for layout in layouts}):
        group = [(name, tp, pp, threads) for name, n, tp, pp, threads in layouts if n == ranks]
        print(f"[bench.throughput] {ranks} rank(s): {group}", file=sys.stderr, flush=True)
        case_fields = {item.name: getattr(case, item.name) for item in fields(case)}
        per_rank = run_distributed(target, ranks, case_fields, group, timeout=options.timeout)
        for (name, tp, pp, _), result in zip(group, per_rank[0], strict=True):
            rows.append(summarize_layout(case, name, ranks, tp, pp, result))
            print(f"[bench.throughput] {rows[-1]}", file=sys.stderr, flush=True)
    by_name = {row["layout"]: row for row in rows}
    for row in rows:
        for reference in ("dp1", "dp1_1thread"):
            if reference in by_name:
                row[f"ratio_to_{reference}"] = round(
                    row["tokens_per_s"] / by_name[reference]["tokens_per_s"], 4
                )
        row["best_step_ratio_to_dp1"] = round(
            row["best_step_tokens_per_s"] / by_name["dp1"]["best_step_tokens_per_s"], 4
        )
        row["compute_ratio_to_dp1"] = round(
            row["compute_tokens_per_s"] / by_name["dp1"]["compute_tokens_per_s"], 4
        )

    settings = asdict(case)
    for who in ("student", "teacher"):
        config = getattr(case, who)
        settings[who] = {
            key: getattr(config, key)
            for key in ("num_layers", "hidden_size", "num_attention_heads")
        }
    summary = {
        "benchmark": "tokens/s of a tiny CPU distillation fit (Lightning + MegatronStrategy, "
        "mock data) per parallel layout",
        "machine": machine_description(),
        "versions": package_versions(),
        "settings": {
            **settings,
            "tokens_per_step": case.global_batch_size * case.seq_length,
            "data": "GPTDataModule(mock=True)",
            "architectures": "examples.demo TINY_TEACHER / TINY_STUDENT (2 layers)"
            if not options.quick
            else "quick: 2x32 student, 2x64 teacher",
            "quick": options.quick,
        },
        "note": f"the machine has {os.cpu_count()} CPU cores: the 2-rank layouts share them "
        "(one torch thread per rank) while DP=1 uses them all (dp1_1thread: one), so ratios "
        "compare layouts on the same cores, not scaling; the machine is shared with other "
        "jobs, so tokens_per_s (wall time over the measured steps) includes waiting for a "
        "core; best_step_tokens_per_s uses the fastest measured step instead",
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "layouts": rows,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
