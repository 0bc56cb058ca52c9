"""Benchmark: what a KD training step costs over the student step plus the teacher forward.

In one process, on the same micro-batches, it times three things in interleaved repetitions
(the order alternates between repetitions so that drift hits all of them alike) and reports
medians:

- ``kd_step_s``: a KD training step on the ``DistillationModel`` (megatron's forward-backward
  schedule through ``kd_module.distillation.model.forward_backward(objective="kd")``, then an
  Adam step);
- ``student_step_s``: the same step for the student alone (``objective="lm"``, same weights, same
  optimizer);
- ``teacher_forward_s``: the teacher's forward alone (no grad, eval), as the KD step runs it.

``overhead_ratio = kd_step_s / (student_step_s + teacher_forward_s)`` is what distillation
costs beyond its two unavoidable parts. ``student_forward_slowdown`` compares the student's
forward inside the KD step with the student's forward inside the student-only step: both are
timed the same way, from a forward pre-hook on the student's embedding to a forward hook on the
student module (inside the KD step the teacher runs before the student's embedding, so the
span holds the student alone). Both forwards are training-mode forwards with autograd on.

A breakdown says where the time goes: teacher forward inside the KD step, the KD loss
(``compute_kd_loss``: criteria and balancer), the student's LM loss (inside the KD step with
``--logit-loss-impl chunked``, the default ``auto``'s choice at vocabulary 8192: computed from
the logits, for logging; with ``fused`` this span is the whole fused pass: both projections, the
divergence and the LM loss, and ``compute_kd_loss`` only picks its result up), the optimizer
step, and the rest (backward and schedule). ``--chunk-sizes`` adds KD steps with other loss
chunk sizes.

The last line of stdout is one JSON object::

    {"machine": {...}, "versions": {...}, "settings": {...}, "kd_step_s": ...,
     "student_step_s": ..., "teacher_forward_s": ..., "overhead_ratio": ...,
     "student_forward_slowdown": ..., "breakdown": {...}, "targets": {...}}

Examples:
    .venv/bin/python -m bench.kd_overhead --quick
    .venv/bin/python -m bench.kd_overhead --repeats 9 --chunk-sizes 256 4096
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from bench._common import machine_description
from kd_module.models.gpt import GPTModelConfig

OVERHEAD_TARGET = 1.05
SLOWDOWN_TARGET = 1.05
STUDENT_SEED, TEACHER_SEED, DATA_SEED = 1, 2, 3

FULL_STUDENT = GPTModelConfig(
    num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256, vocab_size=8192
)
FULL_TEACHER = FULL_STUDENT.replace(num_layers=8, hidden_size=512, num_attention_heads=8)
QUICK_STUDENT = GPTModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, vocab_size=512
)
QUICK_TEACHER = QUICK_STUDENT.replace(num_layers=2, hidden_size=64)


@dataclass
class OverheadCase:
    """Sizes and repetitions of one overhead measurement."""

    student: GPTModelConfig = field(default_factory=lambda: FULL_STUDENT)
    """The student's architecture (its ``seq_length`` is the benchmark's)."""
    teacher: GPTModelConfig = field(default_factory=lambda: FULL_TEACHER)
    """The teacher's architecture (same vocabulary and sequence length as the student)."""
    micro_batch_size: int = 2
    """Samples per micro-batch."""
    num_microbatches: int = 2
    """Micro-batches per training step."""
    repeats: int = 15
    """Measured repetitions of each step (medians are reported)."""
    warmup: int = 2
    """Unmeasured repetitions first (allocator, lazy imports, first-call paths)."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the logits KD loss (``build_distillation_model``'s default)."""
    lr: float = 1e-4
    """Adam learning rate of both optimizers (small: the weights barely move across repeats)."""
    logit_loss_impl: str = "auto"
    """The distillation config's ``logit_loss_impl`` (``auto``: ``chunked`` at vocabulary 8192)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("micro_batch_size", "num_microbatches", "repeats", "loss_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive int")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            problems.append(f"warmup={self.warmup!r} must be a non-negative int")
        if self.student.seq_length != self.teacher.seq_length:
            problems.append(
                f"teacher.seq_length={self.teacher.seq_length} must equal the student's "
                f"{self.student.seq_length}"
            )
        if not self.student.vocab_size or self.student.vocab_size != self.teacher.vocab_size:
            problems.append(
                f"vocab_size: student {self.student.vocab_size} and teacher "
                f"{self.teacher.vocab_size} must be set and equal"
            )
        if problems:
            raise ValueError("kd_overhead case: " + "; ".join(problems))

    @property
    def seq_length(self) -> int:
        """Tokens per sample."""
        return self.student.seq_length


QUICK_CASE = dict(
    student=QUICK_STUDENT,
    teacher=QUICK_TEACHER,
    micro_batch_size=2,
    num_microbatches=2,
    repeats=3,
    warmup=1,
)
"""``--quick``: a few tiny steps, to check that everything runs (Python overhead dominates)."""


def _now() -> tuple[float, float]:
    """Wall time and this process's CPU time (all threads), after the GPU's queued work."""
    from kd_module.parallel import runtime

    if runtime.uses_cuda():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _now()
    return wall - start[0], cpu - start[1]


class Stopwatch:
    """Accumulates wall and CPU time between ``start`` and ``stop`` calls (usable as hooks)."""

    def __init__(self) -> None:
        self.total = (0.0, 0.0)
        self._started: tuple[float, float] | None = None

    def start(self, *args: Any, **kwargs: Any) -> None:
        """Begin a span (signature fits ``register_forward_pre_hook``)."""
        self._started = _now()

    def stop(self, *args: Any, **kwargs: Any) -> None:
        """End the current span (signature fits ``register_forward_hook``)."""
        if self._started is not None:
            wall, cpu = _since(self._started)
            self.total = (self.total[0] + wall, self.total[1] + cpu)
            self._started = None

    def take(self) -> tuple[float, float]:
        """The accumulated ``(wall, cpu)`` seconds; resets them to zero."""
        total, self.total = self.total, (0.0, 0.0)
        return total

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed on every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop()

        return timed


def make_batches(case: OverheadCase, seed: int = DATA_SEED) -> list[dict[str, torch.Tensor]]:
    """``num_microbatches`` random micro-batches in the layout megatron's schedule expects."""
    generator = torch.Generator().manual_seed(seed)
    seq, size, vocab = case.seq_length, case.micro_batch_size, case.student.vocab_size
    batches = []
    for _ in range(case.num_microbatches):
        tokens = torch.randint(0, vocab, (size, seq + 1), generator=generator)
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(size, seq),
                "position_ids": torch.arange(seq).expand(size, seq).contiguous(),
            }
        )
    return batches


class _Bench:
    """The three models, their optimizers and the stopwatches hooked into them."""

    def __init__(self, case: OverheadCase) -> None:
        from kd_module.distillation.config import DistillConfig
        from kd_module.distillation.model import build_distillation_model
        from kd_module.models.gpt import build_model
        from tests.helpers import init_weights_by_global_key

        self.case = case
        from kd_module.parallel import runtime

        device = torch.device("cuda", torch.cuda.current_device()) if runtime.uses_cuda() else "cpu"
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(case)]
        self.kd = build_distillation_model(
            case.student,
            case.teacher,
            DistillConfig(logit_loss_impl=case.logit_loss_impl),
            student_init=lambda m: init_weights_by_global_key(m, seed=STUDENT_SEED),
            teacher_loader=lambda m: init_weights_by_global_key(m, seed=TEACHER_SEED),
            loss_chunk_size=case.loss_chunk_size,
        ).model
        self.student = build_model(case.student)
        init_weights_by_global_key(self.student, seed=STUDENT_SEED)
        self.teacher = self.kd.teacher_model
        self.kd.train()
        self.student.train()
        self.kd_optimizer = torch.optim.Adam(
            [p for p in self.kd.parameters() if p.requires_grad], lr=case.lr
        )
        self.student_optimizer = torch.optim.Adam(self.student.parameters(), lr=case.lr)
        self.watches = {
            name: Stopwatch()
            for name in (
                "kd_student_forward",
                "kd_teacher_forward",
                "kd_loss",
                "kd_lm_loss",
                "alone_student_forward",
                "alone_lm_loss",
            )
        }
        self._hook(self.kd, "kd_student_forward")
        self.teacher.register_forward_pre_hook(self.watches["kd_teacher_forward"].start)
        self.teacher.register_forward_hook(self.watches["kd_teacher_forward"].stop)
        self._hook(self.student, "alone_student_forward")
        # Instance attributes shadow the methods KDObjective.loss_func and GPTModel.forward call.
        self.kd.compute_kd_loss = self.watches["kd_loss"].wrap(self.kd.compute_kd_loss)
        self.kd.compute_language_model_loss = self.watches["kd_lm_loss"].wrap(
            self.kd.compute_language_model_loss
        )
        self.student.compute_language_model_loss = self.watches["alone_lm_loss"].wrap(
            self.student.compute_language_model_loss
        )

    def _hook(self, model: torch.nn.Module, name: str) -> None:
        """Student forward span: embedding pre-hook to the student module's forward hook."""
        model.embedding.register_forward_pre_hook(self.watches[name].start)
        model.register_forward_hook(self.watches[name].stop)

    def _train_step(self, model: Any, optimizer: Any, objective: str) -> tuple[Any, Any]:
        from kd_module.distillation.model import forward_backward

        case = self.case
        optimizer.zero_grad(set_to_none=True)
        start = _now()
        forward_backward(
            model,
            iter(self.batches),
            case.num_microbatches,
            case.seq_length,
            case.micro_batch_size,
            objective=objective,
        )
        before_step = _now()
        optimizer.step()
        return _since(start), _since(before_step)

    def kd_step(self) -> dict[str, float]:
        """One KD training step with its breakdown (seconds; ``*_cpu``: CPU seconds)."""
        total, optimizer = self._train_step(self.kd, self.kd_optimizer, "kd")
        parts = {
            "student_forward": self.watches["kd_student_forward"].take(),
            "teacher_forward": self.watches["kd_teacher_forward"].take(),
            "kd_loss": self.watches["kd_loss"].take(),
            "lm_loss": self.watches["kd_lm_loss"].take(),
            "optimizer_step": optimizer,
        }
        return _flatten(total, parts)

    def student_step(self) -> dict[str, float]:
        """One student-only training step with its breakdown (seconds; ``*_cpu``: CPU seconds)."""
        total, optimizer = self._train_step(self.student, self.student_optimizer, "lm")
        parts = {
            "student_forward": self.watches["alone_student_forward"].take(),
            "lm_loss": self.watches["alone_lm_loss"].take(),
            "optimizer_step": optimizer,
        }
        return _flatten(total, parts)

    def teacher_forward(self) -> dict[str, float]:
        """The teacher's forward on every micro-batch, called the way the KD step calls it."""
        start = _now()
        with torch.no_grad():
            self.teacher.eval()
            for batch in self.batches:
                self.teacher(
                    batch["tokens"],
                    batch["position_ids"],
                    batch.get("attention_mask"),
                    labels=batch["labels"],
                )
        total = _since(start)
        self.watches["kd_teacher_forward"].take()  # the hooks fire here too
        # ModelOpt's capture hook kept the teacher's logits; the KD step expects none stored.
        for module in self.teacher.modules():
            if getattr(module, "_intermediate_output", None) is not None:
                module._intermediate_output = None
        return _flatten(total, {})


def _flatten(total: tuple[float, float], parts: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``{"step": wall, "step_cpu": cpu, part: wall, part + "_cpu": cpu, ...}`` in seconds.

    ``backward_and_rest`` is the step minus its timed parts; the LM loss runs inside the student
    forward span, so it is not subtracted twice.
    """
    flat = {"step": total[0], "step_cpu": total[1]}
    for name, (wall, cpu) in parts.items():
        flat[name], flat[name + "_cpu"] = wall, cpu
    if parts:
        inside = [value for name, value in parts.items() if name != "lm_loss"]
        flat["backward_and_rest"] = total[0] - sum(wall for wall, _ in inside)
        flat["backward_and_rest_cpu"] = total[1] - sum(cpu for _, cpu in inside)
    return flat


def _timed(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``fn()`` with the garbage collector held off while it runs."""
    gc.collect()
    gc.disable()
    try:
        return fn()
    finally:
        gc.enable()


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def measure_overhead(case: OverheadCase) -> dict[str, Any]:
    """Interleaved repetitions of the three measurements; medians and per-repeat samples.

    megatron's parallel state must be initialized (one rank).
    """
    bench = _Bench(case)
    runs: dict[str, Callable[[], dict[str, float]]] = {
        "kd": bench.kd_step,
        "student": bench.student_step,
        "teacher": bench.teacher_forward,
    }
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for repeat in range(case.warmup + case.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            result = _timed(runs[name])
            if repeat >= case.warmup:
                samples[name].append(result)
    return {name: {"median": _medians(s), "samples": s} for name, s in samples.items()}


def kd_step_median(case: OverheadCase) -> dict[str, float]:
    """Median KD step breakdown alone (for the chunk-size sweep)."""
    bench = _Bench(case)
    for _ in range(case.warmup):
        _timed(bench.kd_step)
    return _medians([_timed(bench.kd_step) for _ in range(case.repeats)])


def _ratios(
    kd: dict[str, float], student: dict[str, float], teacher: dict[str, float], suffix: str
):
    overhead = kd["step" + suffix] / (student["step" + suffix] + teacher["step" + suffix])
    slowdown = kd["student_forward" + suffix] / student["student_forward" + suffix]
    return overhead, slowdown


def extra_time(
    kd: dict[str, float], student: dict[str, float], teacher: dict[str, float], suffix: str = ""
) -> dict[str, float]:
    """The KD step's time beyond student step + teacher forward, split by where it is spent.

    The terms add up to ``kd_step - student_step - teacher_forward`` (same statistic, same
    clock: ``suffix`` ``""`` for wall time, ``"_cpu"`` for CPU time).
    """

    def get(values: dict[str, float], key: str) -> float:
        return values[key + suffix]

    terms = {
        "teacher_forward_in_kd_minus_alone": get(kd, "teacher_forward") - get(teacher, "step"),
        "student_forward_in_kd_minus_alone": get(kd, "student_forward")
        - get(student, "student_forward"),
        "of_which_lm_loss_in_kd_minus_alone": get(kd, "lm_loss") - get(student, "lm_loss"),
        "kd_loss_forward": get(kd, "kd_loss"),
        "backward_and_rest_kd_minus_student": get(kd, "backward_and_rest")
        - get(student, "backward_and_rest"),
        "optimizer_step_kd_minus_student": get(kd, "optimizer_step")
        - get(student, "optimizer_step"),
    }
    terms["total"] = sum(v for k, v in terms.items() if not k.startswith("of_which"))
    return terms


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 6) for key, value in values.items()}


def summarize(case: OverheadCase, measured: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers, ratios and target verdicts from :func:`measure_overhead`'s result.

    The headline (``kd_step_s``, ..., ``overhead_ratio``, ``student_forward_slowdown``) uses
    median wall times. Three other estimates, more robust on a busy machine, sit beside it:
    ratios of the minimum wall times (``min_wall``), the median of the per-repetition ratios
    (``paired_wall``: one repetition's three runs share its load), and ratios of median CPU
    times (``cpu``: time the process actually ran; torch uses one thread by default here).
    """
    kd = measured["kd"]["median"]
    student = measured["student"]["median"]
    teacher = measured["teacher"]["median"]
    overhead, slowdown = _ratios(kd, student, teacher, "")
    cpu_overhead, cpu_slowdown = _ratios(kd, student, teacher, "_cpu")
    minima = {
        name: {key: min(sample[key] for sample in result["samples"]) for key in result["median"]}
        for name, result in measured.items()
    }
    min_overhead, min_slowdown = _ratios(minima["kd"], minima["student"], minima["teacher"], "")
    paired = [
        _ratios(k, s, t, "")
        for k, s, t in zip(
            measured["kd"]["samples"],
            measured["student"]["samples"],
            measured["teacher"]["samples"],
            strict=True,
        )
    ]
    paired_overhead = statistics.median(ratio for ratio, _ in paired)
    paired_slowdown = statistics.median(ratio for _, ratio in paired)
    estimates = {
        "median_wall": (overhead, slowdown),
        "min_wall": (min_overhead, min_slowdown),
        "paired_wall": (paired_overhead, paired_slowdown),
        "cpu": (cpu_overhead, cpu_slowdown),
    }
    return {
        "kd_step_s": round(kd["step"], 6),
        "student_step_s": round(student["step"], 6),
        "teacher_forward_s": round(teacher["step"], 6),
        "overhead_ratio": round(overhead, 6),
        "extra_s": round(kd["step"] - student["step"] - teacher["step"], 6),
        "student_forward_in_kd_s": round(kd["student_forward"], 6),
        "student_forward_alone_s": round(student["student_forward"], 6),
        "student_forward_slowdown": round(slowdown, 6),
        "estimates": {
            name: {
                "overhead_ratio": round(pair[0], 6),
                "student_forward_slowdown": round(pair[1], 6),
            }
            for name, pair in estimates.items()
        },
        "cpu_time": {
            "kd_step_s": round(kd["step_cpu"], 6),
            "student_step_s": round(student["step_cpu"], 6),
            "teacher_forward_s": round(teacher["step_cpu"], 6),
            "extra_s": round(kd["step_cpu"] - student["step_cpu"] - teacher["step_cpu"], 6),
        },
        "extra_time": {
            "median_wall_s": _rounded(extra_time(kd, student, teacher)),
            "median_cpu_s": _rounded(extra_time(kd, student, teacher, "_cpu")),
            "notes": "kd_step - student_step - teacher_forward, by part; the backward term "
            "holds the KD loss's backward (the student-only step has none)",
        },
        "breakdown": {
            "kd_step": _rounded(kd),
            "student_step": _rounded(student),
            "teacher_forward_alone": _rounded(teacher),
            "kd_step_min": _rounded(minima["kd"]),
            "student_step_min": _rounded(minima["student"]),
            "teacher_forward_alone_min": _rounded(minima["teacher"]),
            "notes": "medians (and minima) in seconds, *_cpu in CPU seconds; lm_loss runs "
            "inside student_forward; backward_and_rest = step - forwards - kd_loss - "
            "optimizer_step",
        },
        "samples_s": {
            name: [round(sample["step"], 6) for sample in result["samples"]]
            for name, result in measured.items()
        },
        "targets": {
            "overhead_ratio_target": OVERHEAD_TARGET,
            "overhead_ratio_met": overhead <= OVERHEAD_TARGET,
            "student_forward_slowdown_target": SLOWDOWN_TARGET,
            "student_forward_slowdown_met": slowdown <= SLOWDOWN_TARGET,
            "met_by_estimate": {
                name: {
                    "overhead_ratio": pair[0] <= OVERHEAD_TARGET,
                    "student_forward_slowdown": pair[1] <= SLOWDOWN_TARGET,
                }
                for name, pair in estimates.items()
            },
        },
    }


def _case_settings(case: OverheadCase) -> dict[str, Any]:
    settings = asdict(case)
    for who in ("student", "teacher"):
        config = getattr(case, who)
        settings[who] = {
            key: getattr(config, key)
            for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
        }
    settings["seq_length"] = case.seq_length
    settings["tokens_per_step"] = case.seq_length * case.micro_batch_size * case.num_microbatches
    settings["dtype"] = "float32"
    settings["optimizer"] = "torch.optim.Adam on trainable parameters"
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON summary as the last line of stdout."""
    from kd_module.parallel.runtime import destroy_distributed, initialize_distributed
    from kd_module.versions import package_versions

    parser = argparse.ArgumentParser(prog="python -m bench.kd_overhead", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI (seconds)")
    parser.add_argument("--repeats", type=int, help="measured repetitions (default 15, quick 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steadier on a shared machine)",
    )
    parser.add_argument(
        "--logit-loss-impl",
        default="auto",
        choices=("auto", "fused", "chunked", "modelopt"),
        help="the distillation config's logit_loss_impl (default auto: chunked at vocabulary 8192)",
    )
    parser.add_argument(
        "--hidden-size",
        type=int,
        help="student hidden size (teacher: twice it); default 256 (quick 32)",
    )
    parser.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="*",
        default=[],
        help="extra KD-step runs with these loss chunk sizes (tokens)",
    )
    options = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK_CASE) if options.quick else {}
    if options.repeats is not None:
        overrides["repeats"] = options.repeats
    overrides["logit_loss_impl"] = options.logit_loss_impl
    if options.hidden_size is not None:
        base = OverheadCase(**overrides)
        width = options.hidden_size
        overrides["student"] = base.student.replace(hidden_size=width)
        overrides["teacher"] = base.teacher.replace(hidden_size=2 * width)
    case = OverheadCase(**overrides)
    torch.set_num_threads(options.threads)
    load_before = os.getloadavg()

    initialize_distributed(seed=1234)
    try:
        print(f"[bench.kd_overhead] {_case_settings(case)}", file=sys.stderr, flush=True)
        result = summarize(case, measure_overhead(case))
        print(f"[bench.kd_overhead] {result}", file=sys.stderr, flush=True)
        sweep = []
        for chunk_size in options.chunk_sizes:
            swept = replace(case, loss_chunk_size=chunk_size)
            median = kd_step_median(swept)
            sweep.append(
                {"loss_chunk_size": chunk_size, **{k: round(v, 6) for k, v in median.items()}}
            )
            print(f"[bench.kd_overhead] chunk sweep {sweep[-1]}", file=sys.stderr, flush=True)
    finally:
        destroy_distributed()

    summary = {
        "benchmark": "KD training step vs student training step + teacher forward (one process)",
        "machine": machine_description(),
        "versions": package_versions(),
        "settings": {**_case_settings(case), "quick": options.quick},
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        **result,
        "chunk_size_sweep": sweep,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
