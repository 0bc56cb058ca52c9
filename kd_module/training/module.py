"""LightningModules: ``DistillationModule`` (student, frozen teacher, KD loss) and ``GPTModule``.

``GPTModule`` trains a megatron GPT with its LM loss alone: it trains teachers and the LM-only
baselines that distillation is compared with. ``DistillationModule`` extends it with the teacher.

Each ``training_step`` is one optimizer step over a global batch: it pulls
``global_batch_size / (micro_batch_size x data_parallel_size)`` micro-batches from the data
iterator, runs megatron's forward-backward schedule with the KD loss, then megatron's optimizer
step and learning-rate schedule.

Logged every step (on the progress bar too): ``kd_loss`` (the objective), ``logits_loss``,
``intermediate_loss``, ``lm_loss``, ``lr``, ``grad_norm``, ``tokens_per_s``,
``consumed_samples``. Logged at each validation: ``val_loss`` (the student's LM loss),
``val_kd_loss`` (its logits + intermediate loss against the teacher) and, measured once,
``teacher_val_loss`` (the teacher's own LM loss on the same batches).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch

from kd_module.distillation.config import DistillConfig, load_distill_config
from kd_module.distillation.model import build_distillation_model, forward_backward
from kd_module.distillation.objectives import REPORT_KEYS, KDObjective, LMObjective, Objective
from kd_module.models.gpt import GPTModelConfig, unwrap
from kd_module.parallel.timing import synchronized_perf_counter
from kd_module.training.optim import (
    MegatronOptimizerAdapter,
    OptimizerConfig,
    build_lr_scheduler,
    build_megatron_optimizer,
)
from kd_module.upstream.modelopt import discard_captured_outputs

logger = logging.getLogger(__name__)

STEP_METRICS = ("lr", "grad_norm", "tokens_per_s", "consumed_samples")
TRAIN_METRICS = REPORT_KEYS + STEP_METRICS
PROGRESS_BAR = ("kd_loss", "lm_loss", "lr", "tokens_per_s")
VAL_METRICS = ("val_loss", "val_kd_loss", "teacher_val_loss")
PER_SAMPLE_KEYS = ("sample_index",)
"""Batch entries of shape [b] (not split over context-parallel ranks)."""


def reseed(strategy: Any) -> None:
    """Seed torch and megatron's RNG states right before building a model.

    Lightning sets up the data module before ``configure_model``; building datasets may use the
    global RNG differently on different ranks (e.g. only rank 0 writes megatron's index cache).
    Seeding here gives every data-parallel replica the same initial weights, whatever ran before.
    """
    from kd_module.parallel import runtime

    runtime.seed_everything(strategy.seed)


class GPTModule(L.LightningModule):
    """A megatron-core GPT trained with its LM loss alone (teachers, and LM-only baselines).

    Args:
        student: the model's architecture.
        student_checkpoint: initialize from these weights (``None``: from scratch).
        student_ckpt_format: ``auto``, ``torch_dist`` or ``torch``.
        optimizer: :class:`OptimizerConfig`.
        student_init_fn: ``fn(model_stage)`` initializing weights (tests, notebooks).
        on_nonfinite: when a loss term is NaN or Inf, ``"stop"`` ends the run with
            :class:`~kd_module.guards.NonFiniteLossError` and ``"skip"`` skips that step's
            update (parameters and learning-rate schedule unchanged; the step still counts).

    Logged: ``lm_loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``consumed_samples`` per step;
    ``val_loss`` per validation.
    """

    def __init__(
        self,
        student: GPTModelConfig,
        student_checkpoint: str | None = None,
        student_ckpt_format: str = "auto",
        optimizer: OptimizerConfig | None = None,
        student_init_fn: Callable[[Any], None] | None = None,
        on_nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        from kd_module.guards import check_on_nonfinite

        problems = check_on_nonfinite(on_nonfinite)
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self.on_nonfinite = on_nonfinite
        self.skipped_steps: list[int] = []
        self.automatic_optimization = False
        self.student_config = student
        self.student_checkpoint = student_checkpoint
        self.student_ckpt_format = student_ckpt_format
        self.optimizer_config = optimizer or OptimizerConfig()
        self.student_init_fn = student_init_fn
        self.module: Any = None
        self.lr_scheduler: Any = None
        self.teacher_val_loss: float | None = None
        self._val_sums: dict[str, torch.Tensor] = {}
        self.step_times: list[float] = []
        self.last_train_metrics: dict[str, float] = {}
        self.last_val_metrics: dict[str, float] = {}
        self.export_dir: str | None = None
        self.export_tokenizer: dict[str, Any] | None = None

    def _student_init(self) -> Callable[[Any], None] | None:
        if self.student_checkpoint is not None:
            from kd_module.checkpoints.model import make_student_init

            return make_student_init(self.student_checkpoint, self.student_ckpt_format)
        return self.student_init_fn

    def check_implementation(self, configs: dict[str, GPTModelConfig | None]) -> None:
        """Refuse what the layer implementation of this run cannot do (before building)."""
        from kd_module.models.gpt import implementation_problems

        layout = self.trainer.strategy.layout
        problems: list[str] = []
        for who, config in configs.items():
            if config is not None:
                problems += implementation_problems(
                    config,
                    layout.context_parallel_size,
                    reset_attention_mask=getattr(self.data, "reset_attention_mask", False),
                    who=who,
                )
        if problems:
            raise ValueError("model config: " + "; ".join(problems))

    def configure_model(self) -> None:
        if self.module is not None:
            return
        from kd_module.models.gpt import build_model

        self.check_implementation({"model": self.student_config})
        strategy = self.trainer.strategy
        reseed(strategy)
        model = build_model(
            self.student_config,
            strategy.layout,
            self.padded_vocab_size(),
            strategy.params_dtype,
        )
        init = self._student_init()
        if init is not None:
            init(model)
        self.module = model

    @property
    def core_model(self) -> Any:
        """The megatron model without megatron's DDP / Float16Module wrappers."""
        return unwrap(self.module)

    # ------------------------------------------------------------------ building
    @property
    def data(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "global_batch_size"):
            raise ValueError(
                "DistillationModule needs a data module with micro_batch_size, global_batch_size "
                "and seq_length (kd_module.data.GPTDataModule); pass datamodule= to Trainer.fit"
            )
        return datamodule

    def padded_vocab_size(self) -> int:
        """The vocabulary both models use: the config's, or the tokenizer's padded for TP."""
        if self.student_config.vocab_size:
            return self.student_config.vocab_size
        from kd_module.data.tokenizers import padded_vocab_size

        tokenizer = self.data.tokenizer.build()
        return padded_vocab_size(
            tokenizer.vocab_size,
            self.student_config.make_vocab_size_divisible_by,
            self.trainer.strategy.layout.tensor_model_parallel_size,
        )

    def wrap_for_training(self, strategy: Any) -> None:
        """Called by MegatronStrategy.setup: megatron DDP (and Float16Module) around the model."""
        self.module = strategy.wrap_model(self.module)

    def configure_optimizers(self) -> Any:
        strategy = self.trainer.strategy
        megatron_optimizer = build_megatron_optimizer(
            self.optimizer_config,
            self.module,
            use_distributed_optimizer=strategy.use_distributed_optimizer,
            params_dtype=strategy.params_dtype,
        )
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else 1
        self.lr_scheduler = build_lr_scheduler(self.optimizer_config, megatron_optimizer, max_steps)
        return MegatronOptimizerAdapter(megatron_optimizer)

    # ------------------------------------------------------------------ steps
    @property
    def training_objective(self) -> Objective:
        """What training optimizes and logs (NeMo's ``training_loss_reduction``)."""
        return LMObjective()

    @property
    def validation_objective(self) -> Objective:
        """What validation measures (NeMo's ``validation_loss_reduction``)."""
        return self.training_objective

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A hook on each micro-batch (on this rank's device) before the context-parallel split."""
        return batch

    def _micro_batches(self, dataloader_iter: Iterator, count: int) -> list[dict[str, Any]]:
        from megatron.core import parallel_state

        batches = []
        for _ in range(count):
            try:
                item = next(dataloader_iter)
            except StopIteration:
                break
            batch = item[0] if isinstance(item, tuple) else item
            batch = {
                key: value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in batch.items()
            }
            batch = self.prepare_batch(batch)
            if parallel_state.get_context_parallel_world_size() > 1:
                from megatron.core.utils import get_batch_on_this_cp_rank

                # Per-sample entries have no sequence dimension to split.
                per_sample = {key: batch.pop(key) for key in PER_SAMPLE_KEYS if key in batch}
                batch = get_batch_on_this_cp_rank(batch)
                batch.update(per_sample)
            batches.append(batch)
        return batches

    @property
    def num_microbatches(self) -> int:
        data, strategy = self.data, self.trainer.strategy
        return strategy.layout.num_microbatches(
            data.global_batch_size, data.micro_batch_size, strategy.world_size
        )

    def training_step(self, dataloader_iter: Iterator) -> None:
        data = self.data
        batches = self._micro_batches(dataloader_iter, self.num_microbatches)
        if not batches:
            return None
        optimizer = self.optimizers()
        # On CUDA the clock is read once the device is idle, at both ends: otherwise it would
        # time kernel launches, and queued work would land in the neighbouring step.
        start = synchronized_perf_counter(self.device)
        self.module.zero_grad_buffer()
        optimizer.zero_grad()
        objective = self.training_objective
        report = forward_backward(
            self.module,
            iter(batches),
            len(batches),
            data.seq_length,
            data.micro_batch_size,
            objective=objective,
        )
        values = objective.reduce_across_ranks(report, self.device)
        if self._update_is_safe(values, optimizer.optimizer, objective.report_keys):
            optimizer.step()
            self.lr_scheduler.step(increment=1)
        else:
            from kd_module.guards import skip_optimizer_update

            with skip_optimizer_update(optimizer.optimizer):
                optimizer.step()
        elapsed = synchronized_perf_counter(self.device) - start
        self.step_times.append(elapsed)
        adapter = optimizer.optimizer
        grad_norm = adapter.last_step.get("grad_norm")
        tokens = len(batches) * data.micro_batch_size * self.trainer.strategy.data_parallel_size
        tokens *= data.seq_length
        metrics = objective.means(values)
        metrics["lr"] = adapter.param_groups[0]["lr"]
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["tokens_per_s"] = tokens / elapsed
        metrics["consumed_samples"] = float((self.global_step) * data.global_batch_size)
        metrics = {key: float(value) for key, value in metrics.items()}
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key in PROGRESS_BAR, batch_size=1)
        self.last_train_metrics = metrics
        return None

    def _update_is_safe(self, values: torch.Tensor, adapter: Any, keys: tuple[str, ...]) -> bool:
        """False when a loss term is NaN/Inf and ``on_nonfinite="skip"``; raises for ``"stop"``.

        ``values`` is the reduced report of ``keys``, identical on every rank: all ranks decide
        alike.
        """
        from lightning.pytorch.utilities import rank_zero_warn

        from kd_module.guards import NonFiniteLossError, nonfinite_message, nonfinite_terms

        terms = {key: float(values[i, 0]) for i, key in enumerate(keys)}
        if not nonfinite_terms(terms):
            return True
        step = self.global_step + 1
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(
                nonfinite_message(step, terms, "stopping the run (on_nonfinite='stop')")
            )
        self.module.zero_grad_buffer()
        adapter.zero_grad()
        self.skipped_steps.append(step)
        rank_zero_warn(
            nonfinite_message(step, terms, "update skipped (on_nonfinite='skip')"),
            category=RuntimeWarning,
        )
        return False

    def on_train_end(self) -> None:
        """Export the trained model as a plain megatron GPT checkpoint (all ranks together)."""
        if self.export_dir is None:
            return
        from kd_module.checkpoints.model import export_student

        # The vocabulary the student was built with, padded from the tokenizer when the config
        # left it unset: the checkpoint must say how many rows it holds to be loaded again.
        config = self.student_config.replace(vocab_size=self.padded_vocab_size())
        export_student(self.module, self.export_dir, config, tokenizer=self.export_tokenizer)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def _validation_report(self, dataloader_iter: Iterator) -> list[dict[str, Any]]:
        """Forward-only pass over one global batch; accumulates its report, returns the batches."""
        data = self.data
        batches = self._micro_batches(dataloader_iter, self.num_microbatches)
        if not batches:
            return batches
        report = forward_backward(
            self.module,
            iter(batches),
            len(batches),
            data.seq_length,
            data.micro_batch_size,
            forward_only=True,
            objective=self.validation_objective,
        )
        for key, value in report.items():
            self._val_sums[key] = self._val_sums.get(key, 0) + value
        return batches

    def validation_step(self, dataloader_iter: Iterator) -> None:
        self._validation_report(dataloader_iter)

    def _validation_means(self) -> dict[str, torch.Tensor]:
        objective = self.validation_objective
        return objective.means(objective.reduce_across_ranks(self._val_sums, self.device))

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        metrics = {"val_loss": float(self._validation_means()["lm_loss"])}
        self.log_dict(metrics, prog_bar=True, batch_size=1)
        self.last_val_metrics = metrics


class DistillationModule(GPTModule):
    """Student + frozen teacher in a ModelOpt DistillationModel, trained with megatron-core.

    Args:
        student: the student's architecture.
        teacher: the teacher's architecture; ``None`` means resolved from
            ``teacher_model_config`` / the checkpoint's ``model_config.yaml`` (NeMo style) over the
            student's arguments, or the student's architecture when neither exists.
        teacher_checkpoint: teacher weights (megatron ``torch_dist`` or legacy ``torch``); ``None``
            leaves the teacher randomly initialized (tests only: a warning says so).
        teacher_ckpt_format: ``auto``, ``torch_dist`` or ``torch``.
        teacher_model_config: path of a NeMo-style ``model_config.yaml`` for the teacher.
        student_checkpoint: initialize the student from these weights (``None``: from scratch).
        student_ckpt_format: ``auto``, ``torch_dist`` or ``torch``.
        distill_config: distillation YAML path, dict or :class:`DistillConfig` (``None``:
            logits-only defaults).
        optimizer: :class:`OptimizerConfig`.
        loss_chunk_size: tokens per chunk of the memory-efficient logits loss.
        student_init_fn: ``fn(student_stage)`` initializing student weights (tests, notebooks).
        teacher_init_fn: ``fn(teacher_stage)`` initializing teacher weights (tests, notebooks).
        on_nonfinite: ``"stop"`` or ``"skip"`` a step whose loss terms are NaN/Inf
            (see :class:`GPTModule`).
        check_teacher_integrity: hash the teacher's weights when built (``teacher_sha256``) and
            raise :class:`~kd_module.guards.TeacherIntegrityError` at the end of training
            if they changed.

    Examples:
        >>> module = DistillationModule(student=GPTModelConfig(num_layers=2),
        ...                             teacher_checkpoint="runs/teacher/checkpoints/last")
        >>> trainer = L.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(),
        ...                     max_steps=30)
        >>> trainer.fit(module, datamodule=GPTDataModule(...))
    """

    def __init__(
        self,
        student: GPTModelConfig,
        teacher: GPTModelConfig | None = None,
        teacher_checkpoint: str | None = None,
        teacher_ckpt_format: str = "auto",
        teacher_model_config: str | None = None,
        student_checkpoint: str | None = None,
        student_ckpt_format: str = "auto",
        distill_config: str | dict | DistillConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        loss_chunk_size: int = 1024,
        student_init_fn: Callable[[Any], None] | None = None,
        teacher_init_fn: Callable[[Any], None] | None = None,
        on_nonfinite: str = "stop",
        check_teacher_integrity: bool = True,
    ) -> None:
        super().__init__(
            student,
            student_checkpoint=student_checkpoint,
            student_ckpt_format=student_ckpt_format,
            optimizer=optimizer,
            student_init_fn=student_init_fn,
            on_nonfinite=on_nonfinite,
        )
        self.check_teacher_integrity = check_teacher_integrity
        self.teacher_sha256: str | None = None
        self._teacher_digests: dict[str, str] = {}
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_ckpt_format = teacher_ckpt_format
        self.distill_config = load_distill_config(distill_config)
        self.loss_chunk_size = loss_chunk_size
        self.teacher_init_fn = teacher_init_fn
        self.teacher_model_config_path = teacher_model_config
        if teacher is None:
            from kd_module.nemo_format.discovery import load_teacher_model_config

            teacher = load_teacher_model_config(
                teacher_model_config, student, teacher_checkpoint
            ).model
        self.teacher_config = teacher
        self._teacher_val_sums: torch.Tensor | None = None
        self._measure_teacher = False

    def configure_model(self) -> None:
        if self.module is not None:
            return
        self.check_implementation({"student": self.student_config, "teacher": self.teacher_config})
        strategy = self.trainer.strategy
        reseed(strategy)
        teacher_loader = self.teacher_init_fn
        if self.teacher_checkpoint is not None:
            from kd_module.checkpoints.model import make_teacher_loader

            teacher_loader = make_teacher_loader(self.teacher_checkpoint, self.teacher_ckpt_format)
        elif teacher_loader is None:
            warnings.warn(
                "DistillationModule: no teacher_checkpoint, the teacher has random weights "
                "(only useful for tests)",
                stacklevel=2,
            )
        student_init = self._student_init()
        vocab = self.padded_vocab_size()
        parts = build_distillation_model(
            self.student_config,
            self.teacher_config,
            self.distill_config,
            strategy.layout,
            vocab_size=vocab,
            params_dtype=strategy.params_dtype,
            teacher_loader=teacher_loader,
            student_init=student_init,
            loss_chunk_size=self.loss_chunk_size,
            shared_vocab_size=self.data.tokenizer.build().vocab_size,
        )
        self.module = parts.model

    def wrap_for_training(self, strategy: Any) -> None:
        """Wrap (which may cast the teacher to bf16), then hash the teacher as it will run."""
        super().wrap_for_training(strategy)
        if self.check_teacher_integrity:
            from kd_module.guards import combined_sha256, teacher_digests

            self._teacher_digests = teacher_digests(self.distillation_model.teacher_model)
            self.teacher_sha256 = combined_sha256(self._teacher_digests)

    def on_train_end(self) -> None:
        """Check the teacher's weights are the ones loaded, then export the student."""
        if self.teacher_sha256 is not None:
            from kd_module.guards import check_teacher_integrity

            check_teacher_integrity(
                self.distillation_model.teacher_model, self._teacher_digests, self.teacher_sha256
            )
        super().on_train_end()

    @property
    def training_objective(self) -> Objective:
        return KDObjective()

    @property
    def distillation_model(self) -> Any:
        """The ModelOpt DistillationModel without megatron's wrappers."""
        return unwrap(self.module)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._measure_teacher = self.teacher_val_loss is None and not self.trainer.sanity_checking
        self._teacher_val_sums = None

    def validation_step(self, dataloader_iter: Iterator) -> None:
        batches = self._validation_report(dataloader_iter)
        if batches and self._measure_teacher:
            teacher_report = self._teacher_forward(batches)
            if "lm_loss" in teacher_report:
                previous = self._teacher_val_sums
                value = teacher_report["lm_loss"]
                self._teacher_val_sums = value if previous is None else previous + value

    def _teacher_forward(self, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The teacher's own LM loss (ModelOpt replaces it by zeros while distilling)."""
        teacher = self.distillation_model.teacher_model
        patched = teacher.__dict__.pop("compute_language_model_loss", None)
        try:
            return forward_backward(
                teacher,
                iter(batches),
                len(batches),
                self.data.seq_length,
                self.data.micro_batch_size,
                forward_only=True,
                objective=LMObjective(),
            )
        finally:
            if patched is not None:
                teacher.compute_language_model_loss = patched
            # ModelOpt's capture hooks stored the teacher's outputs; nothing will consume them.
            discard_captured_outputs(self.distillation_model, student=False)

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        means = self._validation_means()
        metrics = {
            "val_loss": float(means["lm_loss"]),
            "val_kd_loss": float(means["logits_loss"] + means["intermediate_loss"]),
        }
        if self._measure_teacher:
            lm = LMObjective()
            teacher = lm.reduce_across_ranks(
                {"lm_loss": self._teacher_val_sums} if self._teacher_val_sums is not None else {},
                self.device,
            )
            self.teacher_val_loss = float(lm.means(teacher)["lm_loss"])
        if self.teacher_val_loss is not None:
            metrics["teacher_val_loss"] = self.teacher_val_loss
        self.log_dict(metrics, prog_bar=True, batch_size=1)
        self.last_val_metrics = metrics
