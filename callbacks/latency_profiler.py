"""``LatencyProfiler``: where a distillation step's time goes; how the teacher slows the student.

On profiled steps it times, summed over the step's micro-batches:

- ``data``: fetching the step's micro-batches from the data loader (the module's
  ``_micro_batches``, wrapped on the instance);
- ``teacher_forward``: forward pre/post hooks on the teacher;
- ``student_forward``: hooks on the student (the DistillationModel, whose forward runs the teacher
  first) minus the teacher's share; it includes the student's LM loss (megatron computes it in
  the output layer);
- ``loss``: the KD criteria and balancer (``compute_kd_loss``, wrapped on the instance);
- ``backward``: from the end of a micro-batch's loss to the start of the next forward or of the
  optimizer step (megatron's backward step, and after the last micro-batch its gradient
  finalization: DDP reduction, embedding-gradient all-reduce);
- ``optimizer``: megatron's optimizer step (the optimizer's ``step``, wrapped on the instance);
- ``other``: the rest of the Lightning step (gradient zeroing, logging, LR schedule, and
  the hooks of callbacks listed after this one: list the profiler first).

Marks are CUDA events on GPU, recorded on the module device's current stream (resolved once per
profiled step, after the step's last event and one synchronization of that device), and
``time.perf_counter`` on CPU, where kernels are synchronous. Hooks and wrappers observe only:
they return nothing and change no tensor, so a profiled fit computes what an unprofiled one does.

Known issue (Megatron-LM distillation): the student's forward runs slower beside the teacher than
alone. Once, on a recorded micro-batch, this callback runs the student's forward alone (ModelOpt's
``only_student_forward``, same train/grad mode, RNG states saved and restored, captured outputs
discarded) and reports ``student_forward_slowdown`` = in-step student forward / alone.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from kd_module.parallel.timing import synchronize
from kd_module.rules import Problems
from kd_module.upstream.modelopt import discard_captured_outputs

PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer")
ALONE_REPEATS = 3


class LatencyProfiler(L.Callback):
    """Time the phases of profiled training steps; measure the student's forward alone once.

    Args:
        every_n_steps: profile one step in this many.
        warmup_steps: steps skipped before the first profiled one (lazy initialization).
        slowdown_threshold: warn when the student's forward beside the teacher takes more than
            this many times its forward alone.

    Raises:
        ValueError: for ``every_n_steps`` < 1, ``warmup_steps`` < 0 or a threshold below 1.

    Examples:
        Python::

            profiler = LatencyProfiler(every_n_steps=10, warmup_steps=2)
            trainer = L.Trainer(callbacks=[profiler], ...)
            trainer.fit(module, datamodule=data)
            profiler.summary()["student_forward_slowdown"]

        CLI (nemo-run recipe)::

            nemo llm distill ... trainer.callbacks='[run.Config(LatencyProfiler)]'
    """

    def __init__(
        self, every_n_steps: int = 10, warmup_steps: int = 2, slowdown_threshold: float = 1.2
    ) -> None:
        problems = Problems()
        problems.positive_int("every_n_steps", every_n_steps)
        problems.int_at_least("warmup_steps", warmup_steps, 0)
        if not slowdown_threshold >= 1:
            problems.add(f"slowdown_threshold={slowdown_threshold!r} must be >= 1")
        problems.raise_if_any("LatencyProfiler")
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self.slowdown_threshold = float(slowdown_threshold)
        self._cuda = False
        self._device: torch.device = torch.device("cpu")
        self._active = False
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, str]] = []
        self._intervals: list[tuple[str, Any, Any]] = []
        self._open: dict[str, Any] = {}
        self._backward_from: Any = None
        self._step_start: Any = None
        self._recorded_batch: tuple[tuple, dict] | None = None
        self._steps: list[dict[str, float]] = []
        self._student_forward_ms: list[float] = []
        self._alone_ms: float | None = None
        self._warned = False

    # ------------------------------------------------------------------ clock
    def _mark(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self._device))
            return event
        return time.perf_counter()

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        if self._cuda:
            return start.elapsed_time(end)
        return (end - start) * 1000.0

    def _sync(self) -> None:
        synchronize(self._device)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._device = pl_module.device
        self._cuda = self._device.type == "cuda"
        student = pl_module.core_model
        teacher = getattr(student, "teacher_model", None)
        self._add_forward_hooks(student, "forward")
        if teacher is not None:
            self._add_forward_hooks(teacher, "teacher_forward")
        if hasattr(student, "compute_kd_loss"):
            self._wrap(student, "compute_kd_loss", "loss")
        for optimizer in trainer.optimizers:
            self._wrap(optimizer, "step", "optimizer")
        if hasattr(pl_module, "_micro_batches"):
            self._wrap(pl_module, "_micro_batches", "data")

    def _add_forward_hooks(self, module: torch.nn.Module, phase: str) -> None:
        def pre(module: Any, args: Any, kwargs: Any) -> None:
            if self._active:
                self._open[phase] = mark = self._mark()
                if phase == "forward":
                    self._close_backward(mark)
                if phase == "forward" and self._recorded_batch is None and self._alone_ms is None:
                    self._recorded_batch = (args, dict(kwargs))

        def post(module: Any, args: Any, output: Any) -> None:
            if self._active and phase in self._open:
                end = self._mark()
                self._intervals.append((phase, self._open.pop(phase), end))
                if phase == "forward":
                    self._backward_from = end

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post))

    def _close_backward(self, mark: Any) -> None:
        """A micro-batch's backward ends where the next forward or the optimizer step starts."""
        if self._backward_from is not None:
            self._intervals.append(("backward", self._backward_from, mark))
            self._backward_from = None

    def _wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return original(*args, **kwargs)
            start = self._mark()
            if phase == "optimizer":
                self._close_backward(start)
            result = original(*args, **kwargs)
            end = self._mark()
            self._intervals.append((phase, start, end))
            if phase == "loss":
                self._backward_from = end
            return result

        setattr(owner, name, timed)
        self._restore.append((owner, name))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for owner, name in self._restore:
            owner.__dict__.pop(name, None)
        self._restore = []

    # ------------------------------------------------------------------ steps
    def _profiles(self, step: int) -> bool:
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.every_n_steps == 0

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._active = self._profiles(trainer.global_step)
        if self._active:
            self._intervals = []
            self._open = {}
            self._backward_from = None
            self._sync()
            self._step_start = self._mark()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        # The end mark first, then the wait: an event's time can only be read once it completed.
        step_end = self._mark()
        self._sync()
        self._active = False
        totals: dict[str, float] = defaultdict(float)
        teacher_share = 0.0
        for phase, start, end in self._intervals:
            elapsed = self._elapsed_ms(start, end)
            totals[phase] += elapsed
            if phase == "teacher_forward":
                teacher_share = elapsed  # runs inside the DistillationModel's forward
            elif phase == "forward":
                self._student_forward_ms.append(elapsed - teacher_share)
                teacher_share = 0.0
        record = {phase: totals.get(phase, 0.0) for phase in PHASES}
        record["student_forward"] = totals.get("forward", 0.0) - totals.get("teacher_forward", 0.0)
        record["step"] = self._elapsed_ms(self._step_start, step_end)
        record["other"] = record["step"] - sum(record[phase] for phase in PHASES)
        self._steps.append(record)
        for key, value in record.items():
            pl_module.log(f"latency/{key}_ms", value, batch_size=1)
        if self._alone_ms is None and self._recorded_batch is not None:
            self._alone_ms = self._student_alone_ms(pl_module)
            self._recorded_batch = None

    def _student_alone_ms(self, pl_module: Any) -> float | None:
        """The student's forward alone on the recorded micro-batch (median of a few runs, ms)."""
        student = pl_module.core_model
        if not hasattr(student, "only_student_forward") or self._recorded_batch is None:
            return None
        args, kwargs = self._recorded_batch
        rng = _RNGStates.save()
        times = []
        try:
            with student.only_student_forward():
                for _ in range(ALONE_REPEATS):
                    self._sync()
                    start = self._mark()
                    output = type(student).forward(student, *args, **kwargs)
                    end = self._mark()
                    self._sync()
                    times.append(self._elapsed_ms(start, end))
                    del output
        finally:
            # The student's capture hooks stored outputs nothing will consume.
            discard_captured_outputs(student)
            rng.restore()
        return statistics.median(times)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove_hooks()
        self._active = False
        summary = self.summary()
        if not summary["profiled_steps"]:
            return
        rank_zero_info(self.table())
        slowdown = summary["student_forward_slowdown"]
        if slowdown is not None and slowdown > self.slowdown_threshold and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"LatencyProfiler: the student's forward takes {slowdown:.2f}x as long beside the "
                f"teacher ({summary['student_forward_ms']:.2f} ms per micro-batch) as alone "
                f"({summary['student_forward_alone_ms']:.2f} ms), above slowdown_threshold="
                f"{self.slowdown_threshold}. Known issue of Megatron-LM distillation on CUDA "
                "(up to 40% longer steps); see the README's known issues."
            )

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove_hooks()
        self._active = False

    # ------------------------------------------------------------------ results
    def summary(self) -> dict[str, Any]:
        """Mean milliseconds per profiled step by phase, and the student forward slowdown.

        Returns:
            ``profiled_steps``, ``step_ms``, ``phases_ms`` (each of ``PHASES`` and ``other``),
            ``student_forward_ms`` (per micro-batch), ``student_forward_alone_ms``,
            ``student_forward_slowdown`` (``None`` until measured) and ``device``.
        """
        count = len(self._steps)
        means = {
            key: sum(step[key] for step in self._steps) / count if count else None
            for key in (*PHASES, "other", "step")
        }
        per_microbatch = (
            statistics.median(self._student_forward_ms) if self._student_forward_ms else None
        )
        slowdown = None
        if per_microbatch is not None and self._alone_ms:
            slowdown = per_microbatch / self._alone_ms
        return {
            "profiled_steps": count,
            "step_ms": means["step"],
            "phases_ms": {key: means[key] for key in (*PHASES, "other")},
            "student_forward_ms": per_microbatch,
            "student_forward_alone_ms": self._alone_ms,
            "student_forward_slowdown": slowdown,
            "device": "cuda" if self._cuda else "cpu",
        }

    def table(self) -> str:
        """The summary as a text table (mean ms per profiled step and share of the step)."""
        summary = self.summary()
        step = summary["step_ms"] or 0.0
        lines = [
            f"LatencyProfiler: {summary['profiled_steps']} profiled steps ({summary['device']})"
        ]
        lines.append(f"{'phase':<18}{'ms/step':>10}{'share':>8}")
        for phase, value in summary["phases_ms"].items():
            share = value / step if step else 0.0
            lines.append(f"{phase:<18}{value:>10.2f}{share:>8.1%}")
        lines.append(f"{'step':<18}{step:>10.2f}{1:>8.1%}")
        if summary["student_forward_slowdown"] is not None:
            lines.append(
                f"student forward per micro-batch: {summary['student_forward_ms']:.2f} ms beside "
                f"the teacher, {summary['student_forward_alone_ms']:.2f} ms alone "
                f"(slowdown {summary['student_forward_slowdown']:.2f}x)"
            )
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self._steps,
            "student_forward_ms": self._student_forward_ms,
            "alone_ms": self._alone_ms,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = list(state_dict.get("steps", []))
        self._student_forward_ms = list(state_dict.get("student_forward_ms", []))
        self._alone_ms = state_dict.get("alone_ms")


class _RNGStates:
    """torch's CPU/CUDA generators and megatron's named RNG states, saved and restored together."""

    def __init__(self, cpu: torch.Tensor, cuda: Any, tracker: Any) -> None:
        self.cpu, self.cuda, self.tracker = cpu, cuda, tracker

    @classmethod
    def save(cls) -> _RNGStates:
        from megatron.core import tensor_parallel

        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        tracker = tensor_parallel.get_cuda_rng_tracker()
        states = {name: state.clone() for name, state in tracker.get_states().items()}
        return cls(torch.get_rng_state(), cuda, states)

    def restore(self) -> None:
        from megatron.core import tensor_parallel

        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        tensor_parallel.get_cuda_rng_tracker().set_states(self.tracker)
