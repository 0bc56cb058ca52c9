"""The default demo: distillation against an LM-only baseline, offline, on a laptop's CPU.

``make demo`` (``python -m examples.demo``) runs these trainings on the embedded corpus (the
Python standard library's source, byte-tokenized, with held-out files for validation):

1. a small **teacher** trained with the LM loss (once; cached and reused by later runs),
2. a smaller **KD student** distilled from it (logit KL, mixed with the LM loss),
3. the same student architecture trained with the **LM loss alone** on the same tokens, from the
   same initial weights and in the same data order,
4. the same student distilled **offline**: the teacher's top-32 logits are cached once
   (``nemo kd cache-teacher``'s work) and the student trains from the cache, no teacher running,
5. the same student architecture **pruned from the teacher** (Minitron, ``nemo kd prune``'s
   work), scored before training, then distilled on the same tokens.

It prints the held-out loss of each (the mean of its last validations), the share of the
LM-only student's gap to the teacher each KD row closes, tokens/s and wall time, writes
``demo_summary.json`` and ``demo_curves.png`` under ``--out`` and exits non-zero unless the KD
student beats the LM-only student on held-out data and the pruned + KD student closes at least
half the gap.

The tiny architectures and data settings are module constants (``TINY_TEACHER``,
``TINY_STUDENT``, ``TINY_DISTILL``, ``SEQ_LENGTH``, ...) so that recipes can reuse them; importing
this module imports neither torch nor megatron-core.

Examples:
    From a shell::

        make demo
        python -m examples.demo --out runs/demo
        python -m examples.demo --quick --out /tmp/demo

    From Python::

        from examples.demo import main
        exit_code = main(["--quick", "--out", "/tmp/demo"])
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd_module.data.corpus import CACHE_ENV
from kd_module.distillation.config import DistillConfig
from kd_module.models.gpt import GPTModelConfig

SEQ_LENGTH = 128
"""Tokens (bytes) per training sample."""
MICRO_BATCH_SIZE = 16
"""Samples per forward-backward pass."""
GLOBAL_BATCH_SIZE = 16
"""Samples per optimizer step."""
CORPUS_MAX_BYTES = 4_000_000
"""Bytes of standard-library source taken into the embedded corpus."""
CORPUS_VALIDATION_EVERY = 20
"""Every this-many-th source file is held out for validation."""
SEED = 1234
"""Seed of weight initialization (megatron's RNG) and of the data order."""

TINY_TEACHER = GPTModelConfig(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    seq_length=SEQ_LENGTH,
    make_vocab_size_divisible_by=64,
)
"""The demo's teacher: 4 layers, width 128 (0.85 M parameters)."""
TINY_STUDENT = GPTModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=2,
    kv_channels=32,
    ffn_hidden_size=256,
    seq_length=SEQ_LENGTH,
    make_vocab_size_divisible_by=64,
)
"""The demo's student: the teacher's shape at half its depth, width, heads and FFN (2 layers,
width 64, 2 heads of the teacher's 32 channels; 0.13 M parameters), so that it can be pruned from
the teacher as well as trained from scratch."""
TINY_DISTILL = DistillConfig(logit_kl_temperature=1.0, skip_lm_loss=False, kd_loss_scale=5.0)
"""Logit KD (forward KL, temperature 1) at 5x the weight of the student's LM loss (see the
README's demo section for what was tried)."""
PRUNE_CALIBRATION_SAMPLES = 256
"""Train samples the pruning's importance is measured over."""
LAST_VALIDATIONS = 2
"""A run's held-out loss is the mean of its last this many validations."""
TEACHER_OPTIMIZER = {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20, "weight_decay": 0.01}
"""Keyword arguments of :class:`~kd_module.training.optim.OptimizerConfig` for the teacher."""
STUDENT_OPTIMIZER = {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, "weight_decay": 0.01}
"""Keyword arguments of :class:`~kd_module.training.optim.OptimizerConfig` for both students."""

SUMMARY_FILE = "demo_summary.json"
PLOT_FILE = "demo_curves.png"
TEACHER_CACHE_PREFIX = "teacher-"
OFFLINE_CACHE_K = 32
"""Top-k logits per token the offline student's teacher cache keeps (fp16 values)."""
OFFLINE_CACHE_DIR = "teacher_cache"
"""The offline student's teacher cache, under ``--out``."""
_TEACHER_FORMAT_VERSION = 1


@dataclass
class DemoSettings:
    """How long each part of the demo trains and how often it validates."""

    teacher_steps: int = 300
    """Optimizer steps of the teacher (first run only; the teacher is cached)."""
    student_steps: int = 150
    """Optimizer steps of each student (the same for the KD and the LM-only student)."""
    val_check_interval: int = 25
    """Validate every this many steps; must divide both step counts."""
    validation_batches: int = 8
    """Global batches of held-out data per validation (the same samples every time)."""
    teacher: GPTModelConfig = dataclasses.field(default_factory=lambda: TINY_TEACHER)
    """The teacher's architecture."""
    student: GPTModelConfig = dataclasses.field(default_factory=lambda: TINY_STUDENT)
    """The students' architecture."""
    corpus_max_bytes: int = CORPUS_MAX_BYTES
    """Bytes of source in the embedded corpus."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("teacher_steps", "student_steps", "val_check_interval", "validation_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not problems:
            for name in ("teacher_steps", "student_steps"):
                if getattr(self, name) % self.val_check_interval:
                    problems.append(
                        f"{name}={getattr(self, name)} is not a multiple of "
                        f"val_check_interval={self.val_check_interval}"
                    )
        if problems:
            raise ValueError("demo settings: " + "; ".join(problems))


FULL = DemoSettings()
"""``make demo``: measured on a 2-core machine at 105 s wall including the teacher's training
(44 s); the KD student closes 20% of the LM-only student's gap to the teacher, the pruned + KD
student 92%."""
QUICK = DemoSettings(
    teacher_steps=4,
    student_steps=4,
    val_check_interval=2,
    validation_batches=1,
    teacher=TINY_TEACHER.replace(num_layers=2, hidden_size=64),
    student=TINY_STUDENT.replace(num_layers=1, hidden_size=32, kv_channels=16, ffn_hidden_size=128),
    corpus_max_bytes=300_000,
)
"""``--quick``: a few steps each, to check that everything runs (no claim about who wins)."""


# ---------------------------------------------------------------- building blocks


def cache_root() -> Path:
    """``$KD_CACHE_DIR``, else ``~/.cache/megatron-kd``."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "megatron-kd"))


def teacher_cache_key(settings: DemoSettings, corpus: dict[str, Any]) -> str:
    """A digest of everything the cached teacher's weights and recorded curve depend on."""
    key = {
        "version": _TEACHER_FORMAT_VERSION,
        "teacher": dataclasses.asdict(settings.teacher),
        "optimizer": TEACHER_OPTIMIZER,
        "steps": settings.teacher_steps,
        "val_check_interval": settings.val_check_interval,
        "validation_batches": settings.validation_batches,
        "seq_length": SEQ_LENGTH,
        "micro_batch_size": MICRO_BATCH_SIZE,
        "global_batch_size": GLOBAL_BATCH_SIZE,
        "seed": SEED,
        "corpus": os.path.basename(corpus["directory"]),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _data_module(corpus: dict[str, Any], steps: int, validation_batches: int) -> Any:
    from kd_module.data import GPTDataModule

    return GPTDataModule(
        paths={"train": corpus["train_prefix"], "validation": corpus["validation_prefix"]},
        seq_length=SEQ_LENGTH,
        micro_batch_size=MICRO_BATCH_SIZE,
        global_batch_size=GLOBAL_BATCH_SIZE,
        seed=SEED,
        num_train_samples=steps * GLOBAL_BATCH_SIZE,
        num_val_samples=validation_batches * GLOBAL_BATCH_SIZE,
    )


def _trainable_parameters(module: Any) -> list[Any]:
    """The parameters being trained (for the KD student: the student's, not the teacher's)."""
    return [p for p in module.core_model.parameters() if p.requires_grad]


def _recorder(label: str) -> Any:
    """A callback keeping (and printing) the validation curve, and a fingerprint of the initial
    weights."""
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.curve: list[list[float]] = []
            self.initial_weights_sum: float | None = None

        def on_train_start(self, trainer: Any, module: Any) -> None:
            total = sum(float(p.double().sum()) for p in _trainable_parameters(module))
            self.initial_weights_sum = total

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
                loss = float(trainer.callback_metrics["val_loss"])
                self.curve.append([trainer.global_step, loss])
                print(
                    f"  {label}: step {trainer.global_step}/{trainer.max_steps}, "
                    f"held-out loss {loss:.4f}",
                    flush=True,
                )

    return Recorder()


def _checkpoint_saver(path: Path, config: GPTModelConfig) -> Any:
    """A callback saving the trained model while megatron's process group still exists."""
    import lightning as L

    from kd_module.checkpoints.model import save_model_checkpoint

    class SaveAtTrainEnd(L.Callback):
        def on_train_end(self, trainer: Any, module: Any) -> None:
            save_model_checkpoint(module.core_model, path, model_config=config)

    return SaveAtTrainEnd()


def _fit(
    module: Any,
    steps: int,
    settings: DemoSettings,
    corpus: dict[str, Any],
    run_dir: Path,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Fit ``module`` for ``steps`` on the corpus; returns what the summary reports of it."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from kd_module.training.strategy import MegatronStrategy

    recorder = _recorder(run_dir.name)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(seed=SEED),
        max_steps=steps,
        logger=CSVLogger(save_dir=str(run_dir.parent), name=run_dir.name, version=""),
        log_every_n_steps=max(1, settings.val_check_interval // 5),
        enable_checkpointing=False,
        enable_progress_bar=sys.stdout.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=settings.validation_batches,
        val_check_interval=settings.val_check_interval,
        callbacks=[recorder, *(callbacks or [])],
        default_root_dir=str(run_dir),
    )
    data = _data_module(corpus, steps, settings.validation_batches)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    # The first step pays for lazy initialization; report the steady state.
    times = module.step_times[1:] if len(module.step_times) > 1 else module.step_times
    tokens_per_step = GLOBAL_BATCH_SIZE * SEQ_LENGTH
    return {
        "val_loss": module.last_val_metrics.get("val_loss"),
        "parameters": sum(p.numel() for p in _trainable_parameters(module)),
        "steps": trainer.global_step,
        "tokens": trainer.global_step * tokens_per_step,
        "tokens_per_s": tokens_per_step * len(times) / sum(times) if times else None,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "curve": recorder.curve,
        "initial_weights_sum": recorder.initial_weights_sum,
        "log_dir": str(run_dir),
    }


def teacher_cache_dir(settings: DemoSettings, corpus: dict[str, Any]) -> Path:
    """``<cache root>/teacher-<digest of the teacher's config, training and corpus>``."""
    name = TEACHER_CACHE_PREFIX + teacher_cache_key(settings, corpus)
    return cache_root().expanduser().absolute() / name


def obtain_teacher(
    settings: DemoSettings, corpus: dict[str, Any], work_dir: Path
) -> dict[str, Any]:
    """The cached teacher for these settings, trained (and cached) first when there is none.

    Args:
        settings: the demo's settings.
        corpus: :func:`~kd_module.data.corpus.embedded_corpus`'s result.
        work_dir: where the teacher's training logs go when it is trained.

    Returns:
        ``{"checkpoint", "cached", "val_loss", "parameters", "steps", "tokens", "tokens_per_s",
        "wall_s", "curve", ...}``; the numbers are those of the teacher's (first) training.
    """
    from kd_module.training.module import GPTModule
    from kd_module.training.optim import OptimizerConfig

    directory = teacher_cache_dir(settings, corpus)
    record_path = directory / "teacher.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return {**record, "checkpoint": str(directory / "checkpoint"), "cached": True}

    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    module = GPTModule(settings.teacher, optimizer=OptimizerConfig(**TEACHER_OPTIMIZER))
    saver = _checkpoint_saver(staging / "checkpoint", settings.teacher)
    record = _fit(module, settings.teacher_steps, settings, corpus, work_dir / "teacher", [saver])
    record["config"] = dataclasses.asdict(settings.teacher)
    (staging / "teacher.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    # Publish the whole directory at once: a teacher.json means a complete checkpoint.
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return {**record, "checkpoint": str(directory / "checkpoint"), "cached": False}


def train_student(
    settings: DemoSettings,
    corpus: dict[str, Any],
    run_dir: Path,
    teacher_checkpoint: str | None,
    student_checkpoint: str | None = None,
) -> dict[str, Any]:
    """Train the student, distilled from ``teacher_checkpoint`` or LM-only when it is ``None``.

    Every variant reads the same samples in the same order; from scratch, they start from the
    same weights (megatron's seeded initialization builds the student first), else from
    ``student_checkpoint`` (the pruned teacher).

    Returns:
        ``{"val_loss", "parameters", "steps", "tokens", "tokens_per_s", "wall_s", "curve",
        "initial_weights_sum", "log_dir"}`` and, for the KD student, ``teacher_val_loss`` (the
        teacher on the same held-out batches).
    """
    from kd_module.training.module import DistillationModule, GPTModule
    from kd_module.training.optim import OptimizerConfig

    optimizer = OptimizerConfig(**STUDENT_OPTIMIZER)
    if teacher_checkpoint is None:
        module = GPTModule(
            settings.student, optimizer=optimizer, student_checkpoint=student_checkpoint
        )
    else:
        module = DistillationModule(
            settings.student,
            settings.teacher,
            teacher_checkpoint=teacher_checkpoint,
            student_checkpoint=student_checkpoint,
            distill_config=TINY_DISTILL,
            optimizer=optimizer,
        )
    record = _fit(module, settings.student_steps, settings, corpus, run_dir)
    if teacher_checkpoint is not None:
        record["teacher_val_loss"] = module.teacher_val_loss
    return record


def prune_student(
    settings: DemoSettings, corpus: dict[str, Any], out: Path, teacher_checkpoint: str
) -> dict[str, Any]:
    """Prune the teacher to the student's architecture (:func:`kd_module.pruning.job.prune`,
    calibrated on the students' first training samples) and measure it before any training.

    Returns:
        ``{"checkpoint", "val_loss", "parameters", "steps": 0, "tokens": 0, "wall_s",
        "pruning"}`` (``pruning``: the report, kept layers and heads included).
    """
    import lightning as L

    from kd_module.pruning.job import prune
    from kd_module.specs import TeacherSpec
    from kd_module.training.module import GPTModule
    from kd_module.training.strategy import MegatronStrategy

    checkpoint = out / "pruned_student_checkpoint"
    start = time.perf_counter()
    report = prune(
        _data_module(corpus, settings.student_steps, settings.validation_batches),
        str(checkpoint),
        teacher=TeacherSpec(checkpoint=teacher_checkpoint, config=settings.teacher),
        target=settings.student,
        calibration_samples=PRUNE_CALIBRATION_SAMPLES,
        seed=SEED,
    )
    module = GPTModule(settings.student, student_checkpoint=str(checkpoint))
    L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(seed=SEED),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=settings.validation_batches,
    ).validate(
        module, datamodule=_data_module(corpus, settings.student_steps, settings.validation_batches)
    )
    loss = module.last_val_metrics.get("val_loss")
    print(f"  pruned_student: before training, held-out loss {loss:.4f}", flush=True)
    return {
        "checkpoint": str(checkpoint),
        "val_loss": loss,
        "curve": [[0, loss]],
        "parameters": report["pruned"]["parameters"],
        "steps": 0,
        "tokens": 0,
        "tokens_per_s": None,
        "wall_s": time.perf_counter() - start,
        "pruning": report,
    }


def held_out_loss(run: dict[str, Any]) -> float:
    """The mean of a run's last :data:`LAST_VALIDATIONS` validations (one noisy point is not a
    result), or its only one."""
    losses = [loss for _, loss in run["curve"][-LAST_VALIDATIONS:]] or [run["val_loss"]]
    return sum(losses) / len(losses)


def gap_closed(summary: dict[str, Any], name: str) -> float:
    """``(lm_only - run) / (lm_only - teacher)``: the share of the LM-only student's gap to the
    teacher that the run ``name`` closes."""
    lm_only = summary["lm_only_student_val_loss"]
    gap = lm_only - summary["teacher_val_loss"]
    return (lm_only - summary[f"{name}_val_loss"]) / gap if gap else float("nan")


def train_offline_student(
    settings: DemoSettings, corpus: dict[str, Any], out: Path, teacher_checkpoint: str
) -> dict[str, Any]:
    """Cache the teacher's top-k logits over the students' data, then distill from the cache.

    The student starts from the same weights and reads the same samples as the other two; the
    loss is :data:`TINY_DISTILL`'s with the cache's tail mode instead of the full-vocabulary KL.

    Returns:
        What :func:`train_student` returns, plus ``cache_s`` (building the cache) and
        ``cache_bytes_per_token``.
    """
    from kd_module.offline.format import cache_bytes_per_token
    from kd_module.offline.job import build_teacher_cache
    from kd_module.offline.module import OfflineDistillationModule
    from kd_module.specs import TeacherSpec
    from kd_module.training.optim import OptimizerConfig

    cache_dir = out / OFFLINE_CACHE_DIR
    shutil.rmtree(cache_dir, ignore_errors=True)  # the students' data may have changed
    data = _data_module(corpus, settings.student_steps, settings.validation_batches)
    start = time.perf_counter()
    build_teacher_cache(
        data,
        str(cache_dir),
        TeacherSpec(checkpoint=teacher_checkpoint, config=settings.teacher),
        k=OFFLINE_CACHE_K,
        dtype="fp16",
        accelerator="cpu",
        precision="fp32",
        seed=SEED,
    )
    cache_s = time.perf_counter() - start
    module = OfflineDistillationModule(
        settings.student,
        str(cache_dir),
        distill_config=TINY_DISTILL,
        offline_loss_mode="tail",
        optimizer=OptimizerConfig(**STUDENT_OPTIMIZER),
    )
    record = _fit(module, settings.student_steps, settings, corpus, out / "offline_kd_student")
    record["cache_s"] = cache_s
    record["cache_bytes_per_token"] = cache_bytes_per_token(OFFLINE_CACHE_K, "fp16")
    return record


# ---------------------------------------------------------------- reporting


RUN_LABELS = (
    ("teacher", "teacher"),
    ("LM-only student", "lm_only_student"),
    ("KD student", "kd_student"),
    ("KD student, offline", "offline_kd_student"),
    ("pruned, not trained", "pruned_student"),
    ("pruned + KD student", "pruned_kd_student"),
)
"""Table labels of the runs, in order (the offline student's wall time excludes caching)."""


def format_table(summary: dict[str, Any]) -> str:
    """The held-out losses, tokens/s and wall time of the runs as a text table."""
    rows = [("model", "params", "val loss", "gap closed", "tokens", "tokens/s", "wall s")]
    for label, name in RUN_LABELS:
        if name not in summary["runs"]:
            continue
        run = summary["runs"][name]
        tokens_per_s = run.get("tokens_per_s")
        rows.append(
            (
                label + (" (cached)" if run.get("cached") else ""),
                f"{run['parameters']:,}",
                f"{summary[f'{name}_val_loss']:.4f}",
                f"{summary['gap_closed'][name]:.0%}" if name in summary["gap_closed"] else "-",
                f"{run['tokens']:,}",
                f"{tokens_per_s:,.0f}" if tokens_per_s else "-",
                f"{run['wall_s']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


PRUNED_GAP_TARGET = 0.5
"""``make demo`` fails unless the pruned + KD student closes at least this share of the gap."""


def verdict(summary: dict[str, Any]) -> tuple[bool, str]:
    """Whether the KD student beats the LM-only student and the pruned + KD student closes at
    least :data:`PRUNED_GAP_TARGET` of the gap to the teacher, with a sentence."""
    kd, lm_only = summary["kd_student_val_loss"], summary["lm_only_student_val_loss"]
    pruned = summary["gap_closed"]["pruned_kd_student"]
    problems = []
    if kd >= lm_only:
        problems.append(
            f"the KD student ({kd:.4f}) does not beat the LM-only student ({lm_only:.4f})"
        )
    if not pruned >= PRUNED_GAP_TARGET:
        problems.append(
            f"the pruned + KD student closes {pruned:.0%} of the gap to the teacher, less than "
            f"{PRUNED_GAP_TARGET:.0%}"
        )
    if problems:
        return False, "verdict: FAIL, " + "; ".join(problems) + " on held-out data"
    return True, (
        f"verdict: the KD student beats the LM-only student by {lm_only - kd:.4f} nats/byte "
        f"({summary['gap_closed']['kd_student']:.0%} of the gap to the teacher); pruned + KD "
        f"closes {pruned:.0%} of it (target {PRUNED_GAP_TARGET:.0%})"
    )


def plot_curves(summary: dict[str, Any], path: Path) -> bool:
    """Validation loss against training tokens for the three runs; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = GLOBAL_BATCH_SIZE * SEQ_LENGTH
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, label in (
        ("teacher", "teacher (LM loss)"),
        ("kd_student", "KD student"),
        ("lm_only_student", "LM-only student"),
        ("offline_kd_student", "KD student, offline (teacher cache)"),
        ("pruned_student", "pruned, not trained"),
        ("pruned_kd_student", "pruned + KD student"),
    ):
        curve = summary["runs"].get(name, {}).get("curve")
        if curve:
            axes.plot(
                [step * tokens_per_step for step, _ in curve],
                [loss for _, loss in curve],
                marker="o",
                label=label,
            )
    axes.set_xlabel("training tokens")
    axes.set_ylabel("held-out loss (nats/byte)")
    axes.set_title("Embedded corpus: validation loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description=(
            "Train a small teacher on the embedded corpus (once, cached), distill a smaller "
            "student from it, train the same student with the LM loss alone on the same tokens, "
            "and compare their held-out loss."
        ),
    )
    parser.add_argument(
        "--out", default="runs/demo", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps each: check that everything runs"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps of each student")
    parser.add_argument("--teacher-steps", type=int, help="optimizer steps of the teacher")
    parser.add_argument("--val-check-interval", type=int, help="validate every this many steps")
    parser.add_argument(
        "--verbose", action="store_true", help="show library warnings and Lightning's messages"
    )
    return parser.parse_args(argv)


def _quiet() -> None:
    """Hide the libraries' warnings about CPU fallbacks and experimental Lightning features."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; override after)

    warnings.simplefilter("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when the KD student beats the LM-only student (1 otherwise).

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    args = parse_args(argv)
    start = time.perf_counter()
    if not args.verbose:
        _quiet()
    base = QUICK if args.quick else FULL
    changes = {
        name: value
        for name, value in (
            ("student_steps", args.steps),
            ("teacher_steps", args.teacher_steps),
            ("val_check_interval", args.val_check_interval),
        )
        if value is not None
    }
    settings = dataclasses.replace(base, **changes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from kd_module.data.corpus import embedded_corpus

    corpus_start = time.perf_counter()
    corpus = embedded_corpus(
        max_bytes=settings.corpus_max_bytes, validation_every=CORPUS_VALIDATION_EVERY
    )
    corpus_s = time.perf_counter() - corpus_start
    print(
        f"demo: corpus {corpus['files']} files, {corpus['train_tokens']:,} training and "
        f"{corpus['validation_tokens']:,} held-out tokens in {corpus['directory']} "
        f"({'cached' if corpus['cached'] else f'tokenized in {corpus_s:.0f} s'})",
        flush=True,
    )
    teacher = obtain_teacher(settings, corpus, out)
    print(
        f"demo: teacher {'reused from' if teacher['cached'] else 'trained and cached in'} "
        f"{teacher['checkpoint']}",
        flush=True,
    )
    print("demo: distilling the student", flush=True)
    kd = train_student(settings, corpus, out / "kd_student", teacher["checkpoint"])
    print("demo: training the same student with the LM loss alone", flush=True)
    lm_only = train_student(settings, corpus, out / "lm_only_student", None)
    print("demo: caching the teacher's top-k logits, then distilling from the cache", flush=True)
    offline = train_offline_student(settings, corpus, out, teacher["checkpoint"])
    print("demo: pruning the teacher to the student's architecture (Minitron)", flush=True)
    pruned = prune_student(settings, corpus, out, teacher["checkpoint"])
    print("demo: distilling the pruned student", flush=True)
    pruned_kd = train_student(
        settings, corpus, out / "pruned_kd_student", teacher["checkpoint"], pruned["checkpoint"]
    )

    runs = {
        "teacher": teacher,
        "kd_student": kd,
        "lm_only_student": lm_only,
        "offline_kd_student": offline,
        "pruned_student": pruned,
        "pruned_kd_student": pruned_kd,
    }
    summary: dict[str, Any] = {
        # The teacher on the students' held-out batches, from the KD run.
        "teacher_val_loss": kd.get("teacher_val_loss") or teacher["val_loss"],
        **{f"{name}_val_loss": held_out_loss(runs[name]) for name in runs if name != "teacher"},
        "held_out_loss": f"mean of the last {LAST_VALIDATIONS} validations",
        "tokens": kd["tokens"],
        "wall_s": None,
        "corpus_wall_s": corpus_s,
        "quick": args.quick,
        "runs": runs,
        "configs": {
            "settings": dataclasses.asdict(settings),
            "distill": TINY_DISTILL.to_dict(),
            "prune_calibration_samples": PRUNE_CALIBRATION_SAMPLES,
            "teacher_optimizer": TEACHER_OPTIMIZER,
            "student_optimizer": STUDENT_OPTIMIZER,
            "data": {
                "seq_length": SEQ_LENGTH,
                "micro_batch_size": MICRO_BATCH_SIZE,
                "global_batch_size": GLOBAL_BATCH_SIZE,
                "corpus_validation_every": CORPUS_VALIDATION_EVERY,
                "corpus": {k: v for k, v in corpus.items() if k != "cached"},
                "seed": SEED,
            },
        },
    }
    summary["kd_wins"] = summary["kd_student_val_loss"] < summary["lm_only_student_val_loss"]
    summary["margin"] = summary["lm_only_student_val_loss"] - summary["kd_student_val_loss"]
    summary["gap_closed"] = {
        name: gap_closed(summary, name)
        for name in ("kd_student", "offline_kd_student", "pruned_student", "pruned_kd_student")
    }
    summary["kd_gap_closed"] = {
        name: summary["gap_closed"][name]
        for name in ("kd_student", "offline_kd_student", "pruned_kd_student")
    }
    plotted = plot_curves(summary, out / PLOT_FILE)
    summary["wall_s"] = time.perf_counter() - start
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")

    ok, message = verdict(summary)
    print()
    print(format_table(summary))
    print()
    print(
        f"offline: teacher cache of {offline['cache_bytes_per_token']} bytes/token built in "
        f"{offline['cache_s']:.1f} s ({out / OFFLINE_CACHE_DIR})"
    )
    print(f"total wall time {summary['wall_s']:.1f} s; summary: {out / SUMMARY_FILE}")
    print(f"plot: {out / PLOT_FILE}" if plotted else "plot skipped: matplotlib is not installed")
    if args.quick:
        print(f"{message} (--quick: a smoke test, not a claim)")
        return 0
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
