"""Training a student from a teacher cache: :class:`OfflineDistillationModule`.

The teacher is replaced by a cache written by :func:`kd_module.offline.writer.cache_teacher` (``nemo
kd
cache-teacher``): no teacher is built, loaded or run. Each training micro-batch carries the
dataset's ``sample_index``; on the last pipeline stage the cached top-k logits, indices and
log-sum-exp of those samples are read from the memory-mapped shards (after checking that the
tokens are the ones the teacher saw) and the student's logits are compared with them.

Objective per token (:class:`~kd_module.offline.objective.OfflineKDObjective`), as online::

    logits_t = offline_topk_kd_loss(student, cache, mode)   forward KL against the cached top-k
    loss_t   = logits_t                                     if skip_lm_loss
             = lm_t + kd_loss_scale * logits_t              otherwise

Logged as online: ``kd_loss``, ``logits_loss``, ``intermediate_loss`` (always 0: the cache
holds no activations), ``lm_loss``, and ``val_loss`` at validation (the validation split is not
cached, so there is no ``val_kd_loss`` or ``teacher_val_loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kd_module.distillation.config import DistillConfig, load_distill_config
from kd_module.distillation.objectives import LMObjective
from kd_module.models.gpt import GPTModelConfig
from kd_module.offline.loss import OFFLINE_LOSS_MODES
from kd_module.offline.objective import OfflineKDObjective
from kd_module.offline.reader import TeacherCache
from kd_module.training.module import GPTModule
from kd_module.training.optim import OptimizerConfig

CACHE_KEYS = ("teacher_values", "teacher_indices", "teacher_lse")
"""Batch entries the cache adds, ``[b, s, k]``, ``[b, s, k]`` and ``[b, s]``."""


def _cached_vocab(manifest: dict[str, Any]) -> tuple[int, str] | None:
    """The vocabulary the cache's entries live in, and its name: the shared (real) vocabulary
    when the cache was written with one (the student may pad differently), else the teacher's
    padded vocabulary."""
    if manifest.get("shared_vocab_size") is not None:
        return int(manifest["shared_vocab_size"]), "shared_vocab_size"
    if manifest.get("vocab_size") is not None:
        return int(manifest["vocab_size"]), "vocab_size"
    return None


def offline_config_problems(distill: DistillConfig, mode: str) -> list[str]:
    """What an offline run cannot do with this distillation config and loss mode."""
    problems = []
    if mode not in OFFLINE_LOSS_MODES:
        problems.append(f"offline_loss_mode={mode!r} is not one of {', '.join(OFFLINE_LOSS_MODES)}")
    if distill.intermediate_layer_pairs:
        problems.append(
            "distill config: intermediate_layer_pairs need the teacher's activations, which a "
            "teacher cache does not hold; remove them or distill online (teacher_checkpoint)"
        )
    if distill.logit_loss != "forward_kl":
        problems.append(
            f"distill config: logit_loss={distill.logit_loss!r} is not available from a "
            "teacher cache; use 'forward_kl'"
        )
    if mode == "tail" and distill.logit_kl_temperature != 1.0:
        problems.append(
            f"distill config: logit_kl_temperature={distill.logit_kl_temperature} needs "
            "offline_loss_mode='renormalized'; the cache's log-sum-exp is of the raw logits"
        )
    return problems


class OfflineDistillationModule(GPTModule):
    """A student distilled from a teacher cache instead of a running teacher.

    Args:
        student: the student's architecture.
        teacher_cache: directory written by ``nemo kd cache-teacher``
            (:func:`kd_module.offline.writer.cache_teacher`).
        distill_config: distillation YAML path, dict or :class:`DistillConfig`: its
            ``logit_kl_temperature``, ``logit_kl_topk`` (at most the cached k; the cached k
            when unset), ``kd_loss_scale`` and ``skip_lm_loss`` apply; intermediate pairs and
            losses other than ``forward_kl`` are refused.
        offline_loss_mode: ``"tail"`` (the teacher's probability outside the top-k kept as one
            bucket; temperature 1) or ``"renormalized"`` (both distributions renormalized over
            the teacher's top-k: equal to online ``logit_kl_topk`` distillation).
        student_checkpoint: initialize the student from these weights (``None``: from scratch).
        student_ckpt_format: ``auto``, ``torch_dist`` or ``torch``.
        optimizer: :class:`OptimizerConfig`.
        student_init_fn: ``fn(student_stage)`` initializing weights (tests, notebooks).
        on_nonfinite: ``"stop"`` or ``"skip"`` a step whose loss terms are NaN/Inf.

    Raises:
        ValueError: naming every problem: no or incomplete cache, a top-k larger than the
            cached one, a distillation config a cache cannot serve.

    Examples:
        >>> module = OfflineDistillationModule(GPTModelConfig(num_layers=2), "/data/cache")
        >>> trainer.fit(module, datamodule=data)  # data: the GPTDataModule the cache was made of
    """

    def __init__(
        self,
        student: GPTModelConfig,
        teacher_cache: str,
        distill_config: str | dict | DistillConfig | None = None,
        offline_loss_mode: str = "tail",
        student_checkpoint: str | None = None,
        student_ckpt_format: str = "auto",
        optimizer: OptimizerConfig | None = None,
        student_init_fn: Callable[[Any], None] | None = None,
        on_nonfinite: str = "stop",
    ) -> None:
        super().__init__(
            student,
            student_checkpoint=student_checkpoint,
            student_ckpt_format=student_ckpt_format,
            optimizer=optimizer,
            student_init_fn=student_init_fn,
            on_nonfinite=on_nonfinite,
        )
        self.distill_config = load_distill_config(distill_config)
        self.offline_loss_mode = offline_loss_mode
        self.teacher_cache = str(teacher_cache)
        # What a DistillationModule has, for the shared input checks and summary.
        self.teacher_config = None
        self.teacher_checkpoint = None
        self.teacher_ckpt_format = "auto"
        problems = offline_config_problems(self.distill_config, offline_loss_mode)
        try:
            cache = TeacherCache(teacher_cache)
        except ValueError as error:
            problems.append(str(error))
            cache = None
        if cache is not None and not cache.manifest.get("complete"):
            problems.append(
                f"teacher cache {teacher_cache} is incomplete; run `nemo kd cache-teacher` again "
                "to finish it"
            )
        if cache is not None:
            cached_k = cache.manifest["k"]
            top_k = self.distill_config.logit_kl_topk or cached_k
            if top_k > cached_k:
                problems.append(
                    f"distill config: logit_kl_topk={top_k} is larger than the k={cached_k} "
                    f"the teacher cache {teacher_cache} holds"
                )
            self.top_k = top_k
        if problems:
            raise ValueError("offline distillation: " + "; ".join(problems))
        self.cache: TeacherCache = cache  # its shards are memory-mapped on first lookup

    @property
    def training_objective(self) -> OfflineKDObjective:
        return OfflineKDObjective.from_config(
            self.distill_config,
            self.offline_loss_mode,
            shared_vocab_size=self.cache.manifest.get("shared_vocab_size"),
        )

    @property
    def validation_objective(self) -> LMObjective:
        """The student's LM loss: the validation split is not in the cache."""
        return LMObjective()

    def data_problems(self, data: Any, max_steps: int | None) -> list[str]:
        """Whether ``data`` is what the cache was made of; fixes its number of train samples.

        megatron's sample order depends on how many samples the dataset is built for, so an
        unset ``data.num_train_samples`` becomes the cache's ``num_samples``.
        """
        from kd_module.offline.format import dataset_manifest

        manifest = self.cache.manifest
        if data.num_train_samples is None:
            data.num_train_samples = manifest["num_samples"]
        expected = {
            "tokenizer": data.tokenizer.to_dict(),
            "dataset": dataset_manifest(data, data.num_train_samples),
            "seq_length": data.seq_length,
        }
        try:
            self.cache.check_manifest(expected)
        except ValueError as error:
            return [str(error)]
        problems = []
        needed = data.consumed_samples + (max_steps or 0) * data.global_batch_size
        if needed > manifest["num_samples"]:
            problems.append(
                f"trainer.max_steps={max_steps} x global_batch_size={data.global_batch_size} "
                f"needs {needed} train samples but the teacher cache {self.teacher_cache} holds "
                f"{manifest['num_samples']}; cache more or train fewer steps"
            )
        cached_vocab, vocab = _cached_vocab(manifest), self.student_config.vocab_size
        if cached_vocab is not None and vocab and vocab < cached_vocab[0]:
            problems.append(
                f"vocabulary: student vocab_size={vocab} is smaller than the cached teacher's "
                f"{cached_vocab[1]} {cached_vocab[0]}"
            )
        return problems

    def configure_model(self) -> None:
        """Build the student; refuse a vocabulary smaller than the cached teacher's."""
        vocab = self.padded_vocab_size()
        cached = _cached_vocab(self.cache.manifest)
        if cached is not None and vocab < cached[0]:
            raise ValueError(
                f"offline distillation: the student's (padded) vocab_size {vocab} is smaller "
                f"than the cached teacher's {cached[1]} {cached[0]} (teacher cache "
                f"{self.teacher_cache})"
            )
        super().configure_model()

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Training micro-batches on the last stage get the cached teacher rows of their samples."""
        from megatron.core import parallel_state

        if not self.trainer.training or not parallel_state.is_pipeline_last_stage():
            return batch
        if "sample_index" not in batch:
            raise ValueError(
                "offline distillation: batches carry no 'sample_index'; use "
                "kd_module.data.GPTDataModule (its batches name each row's dataset sample)"
            )
        sample_index = batch["sample_index"].cpu()
        self.cache.check_tokens(sample_index, batch["tokens"])
        values, indices, lse = self.cache.lookup(sample_index)
        batch = dict(batch)
        batch["teacher_values"] = values[..., : self.top_k].to(self.device)
        batch["teacher_indices"] = indices[..., : self.top_k].to(self.device)
        batch["teacher_lse"] = lse.to(self.device)
        return batch
