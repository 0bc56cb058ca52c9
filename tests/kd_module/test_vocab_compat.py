"""Teacher and student sharing a tokenizer but padding their embedding tables differently.

The KD loss (online and offline) is taken over the shared real vocabulary ``[0, N)``; padding
columns are left out on both sides. Everything is compared with ``reference_logits_kd_loss`` on
logits sliced to ``[:N]``, and at TP=2 (student and teacher shards that do not line up) with the
same single-rank reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_module.distillation.losses import LOSS_TYPES, LogitsKDLoss, reference_logits_kd_loss
from kd_module.models.gpt import GPTModelConfig
from tests.helpers import run_distributed

RTOL = 1e-5
ATOL = 1e-6
TOP_K = 5
TOKENS = (5, 3)
# Student 48 columns, teacher 64, 40 real tokens: both sides carry padding, of different sizes.
STUDENT_VOCAB, TEACHER_VOCAB, SHARED = 48, 64, 40


def _padded_logits(seed: int, vocab: int, padding_value: float = 8.0) -> torch.Tensor:
    """Random logits whose padding columns (>= SHARED) are large: including them would move
    the loss and the top-k a lot, so a missing mask cannot pass unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*TOKENS, vocab, generator=generator) * 3.0
    logits[..., SHARED:] += padding_value
    return logits


def _loss_and_grad(loss_fn, student, teacher, weights):
    student = student.detach().clone().requires_grad_(True)
    loss = loss_fn(student, teacher)
    (loss * weights).sum().backward()
    return loss.detach(), student.grad


def _weights(seed: int) -> torch.Tensor:
    return torch.rand(TOKENS, generator=torch.Generator().manual_seed(seed)) + 0.5


def _reference(student, teacher, shared, **kwargs):
    """Loss and gradient of the plain reference on the logits cut to [:shared]; the gradient is
    padded with zeros to the student's width."""
    weights = _weights(3)
    leaf = student.detach().clone().requires_grad_(True)
    loss = reference_logits_kd_loss(leaf[..., :shared], teacher[..., :shared], **kwargs)
    (loss * weights).sum().backward()
    return loss.detach(), leaf.grad


# ---------------------------------------------------------------------------- (a) single rank
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("top_k", [None, TOP_K], ids=["dense", "topk"])
@pytest.mark.parametrize(
    ("student_vocab", "teacher_vocab"),
    [(STUDENT_VOCAB, TEACHER_VOCAB), (TEACHER_VOCAB, STUDENT_VOCAB), (STUDENT_VOCAB,) * 2],
    ids=["teacher-wider", "student-wider", "same-padding"],
)
def test_loss_over_the_shared_vocabulary_equals_the_reference(
    loss_type, top_k, student_vocab, teacher_vocab
):
    """LogitsKDLoss(shared_vocab_size=N) on [s, b, Vs] and [s, b, Vt] equals the reference on
    [..., :N] in value and gradient, and the padding columns' gradient is exactly 0."""
    student = _padded_logits(1, student_vocab)
    teacher = _padded_logits(2, teacher_vocab)
    kwargs = dict(loss_type=loss_type, temperature=1.3, jsd_beta=0.4, top_k=top_k)
    loss_fn = LogitsKDLoss(chunk_size=4, shared_vocab_size=SHARED, **kwargs)
    loss, grad = _loss_and_grad(loss_fn, student, teacher, _weights(3))
    ref_loss, ref_grad = _reference(student, teacher, SHARED, **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=ATOL)
    assert torch.count_nonzero(grad[..., SHARED:]) == 0
    # The padding matters: the loss over the whole common width is another number.
    common = min(student_vocab, teacher_vocab)
    unmasked = reference_logits_kd_loss(student[..., :common], teacher[..., :common], **kwargs)
    assert not torch.allclose(loss, unmasked, rtol=1e-3)


def test_no_cut_keeps_the_previous_path_bit_for_bit():
    """shared_vocab_size equal to both padded sizes gives exactly the loss and gradient of
    shared_vocab_size=None (today's path)."""
    student = _padded_logits(4, STUDENT_VOCAB)
    teacher = _padded_logits(5, STUDENT_VOCAB)
    for top_k in (None, TOP_K):
        plain = _loss_and_grad(LogitsKDLoss(top_k=top_k), student, teacher, _weights(3))
        same = _loss_and_grad(
            LogitsKDLoss(top_k=top_k, shared_vocab_size=STUDENT_VOCAB),
            student,
            teacher,
            _weights(3),
        )
        assert torch.equal(plain[0], same[0]) and torch.equal(plain[1], same[1])


def test_loss_refuses_a_padded_vocabulary_smaller_than_the_shared_one():
    """A teacher narrower than shared_vocab_size, different widths without one, and top_k
    above it are refused naming the values."""
    student = _padded_logits(1, STUDENT_VOCAB)
    with pytest.raises(ValueError, match=r"shared_vocab_size=50 is larger than .* teacher's 40"):
        LogitsKDLoss(shared_vocab_size=50)(student, student[..., :40])
    with pytest.raises(ValueError, match=r"student vocabulary 48 and teacher vocabulary 64 differ"):
        LogitsKDLoss()(student, _padded_logits(2, TEACHER_VOCAB))
    with pytest.raises(ValueError, match=r"top_k=41 is larger than the shared vocabulary"):
        LogitsKDLoss(top_k=41, shared_vocab_size=SHARED)


# ------------------------------------------------------------------------ (c) offline, 1 rank
def test_cache_writer_never_picks_padding_and_its_lse_is_over_the_shared_vocabulary():
    """teacher_logits_topk(shared_vocab_size=N) returns indices < N even where the padding
    columns hold the largest logits, and the log-sum-exp of [:N]."""
    from kd_module.offline.writer import teacher_logits_topk

    teacher = _padded_logits(2, TEACHER_VOCAB, padding_value=50.0)
    values, indices, lse = teacher_logits_topk(teacher, TOP_K, shared_vocab_size=SHARED)
    assert int(indices.max()) < SHARED
    expected_values, expected_indices = torch.topk(teacher[..., :SHARED], TOP_K, dim=-1)
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)
    torch.testing.assert_close(lse, torch.logsumexp(teacher[..., :SHARED], dim=-1))
    _, unmasked_indices, _ = teacher_logits_topk(teacher, TOP_K)
    assert int(unmasked_indices.max()) >= SHARED  # the case is one a missing mask would fail


def _tail_reference(student, teacher, shared, k):
    """Tail-mode loss in float64 from logits cut to [:shared] (the offline loss's definition)."""
    student = student[..., :shared].double()
    teacher = teacher[..., :shared].double()
    log_p = torch.log_softmax(teacher, dim=-1)
    log_q = torch.log_softmax(student, dim=-1)
    index = torch.topk(teacher, k, dim=-1).indices
    top_p, top_log_p = log_p.gather(-1, index).exp(), log_p.gather(-1, index)
    top_log_q = log_q.gather(-1, index)
    tail_p = 1 - top_p.sum(-1)
    tail_q = 1 - top_log_q.exp().sum(-1)
    top = (top_p * (top_log_p - top_log_q)).sum(-1)
    return top + tail_p * (torch.log(tail_p) - torch.log(tail_q))


@pytest.mark.parametrize("mode", ["renormalized", "tail"])
def test_offline_loss_ignores_student_padding(mode):
    """offline_topk_kd_loss(shared_vocab_size=N) against a cache written with N equals the
    reference on [:N]; padding columns of the student get no gradient."""
    from kd_module.offline.loss import offline_topk_kd_loss
    from kd_module.offline.writer import teacher_logits_topk

    student = _padded_logits(1, STUDENT_VOCAB)
    teacher = _padded_logits(2, TEACHER_VOCAB)
    values, indices, lse = teacher_logits_topk(teacher, TOP_K, shared_vocab_size=SHARED)

    def loss_fn(s, _):
        return offline_topk_kd_loss(
            s, values, indices, lse, mode=mode, chunk_size=4, shared_vocab_size=SHARED
        )

    loss, grad = _loss_and_grad(loss_fn, student, None, _weights(3))
    if mode == "renormalized":
        ref_loss, ref_grad = _reference(student, teacher, SHARED, top_k=TOP_K)
    else:
        leaf = student.detach().clone().requires_grad_(True)
        ref = _tail_reference(leaf, teacher, SHARED, TOP_K)
        (ref * _weights(3)).sum().backward()
        ref_loss, ref_grad = ref.detach().float(), leaf.grad
        unmasked = offline_topk_kd_loss(student, values, indices, lse, mode=mode)
        assert not torch.allclose(unmasked, ref_loss, rtol=1e-3)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(grad[..., SHARED:]) == 0


# --------------------------------------------------------------------------------- (b) TP=2
def tp2_vocab_checks() -> dict:
    """One TP=2 rank: online losses and the offline writer and loss on this rank's shards of a
    student (48 columns) and a teacher (64) that do not line up, next to single-rank references.

    ``SHARED=40``: student rank 1 holds [24, 48), 16 real columns; with ``N=20`` it holds none.
    """
    from megatron.core import parallel_state

    from kd_module.offline.loss import offline_topk_kd_loss
    from kd_module.offline.writer import teacher_logits_topk
    from kd_module.parallel.runtime import initialize_distributed

    initialize_distributed(tensor_model_parallel_size=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    student = _padded_logits(1, STUDENT_VOCAB)
    teacher = _padded_logits(2, TEACHER_VOCAB)
    s_shard = slice(rank * STUDENT_VOCAB // 2, (rank + 1) * STUDENT_VOCAB // 2)
    t_shard = slice(rank * TEACHER_VOCAB // 2, (rank + 1) * TEACHER_VOCAB // 2)
    results = {}
    for shared in (SHARED, 20):
        for loss_type in LOSS_TYPES:
            for top_k in (None, TOP_K):
                kwargs = dict(loss_type=loss_type, temperature=1.3, jsd_beta=0.4, top_k=top_k)
                loss_fn = LogitsKDLoss(chunk_size=4, shared_vocab_size=shared, **kwargs)
                loss, grad = _loss_and_grad(
                    loss_fn, student[..., s_shard], teacher[..., t_shard], _weights(3)
                )
                ref_loss, ref_grad = _reference(student, teacher, shared, **kwargs)
                results[(shared, loss_type, top_k)] = (loss, grad, ref_loss, ref_grad[..., s_shard])
        values, indices, lse = teacher_logits_topk(
            teacher[..., t_shard], TOP_K, shared_vocab_size=shared
        )
        single = torch.topk(teacher[..., :shared], TOP_K, dim=-1)
        results[(shared, "writer", None)] = (
            values,
            indices.float(),
            lse,
            single.values,
            single.indices.float(),
            torch.logsumexp(teacher[..., :shared], dim=-1),
        )

        def offline(s, _, v=values, i=indices, lse=lse, shared=shared):
            return offline_topk_kd_loss(
                s, v, i, lse, mode="tail", chunk_size=4, shared_vocab_size=shared
            )

        loss, grad = _loss_and_grad(offline, student[..., s_shard], None, _weights(3))
        leaf = student.detach().clone().requires_grad_(True)
        ref = _tail_reference(leaf, teacher, shared, TOP_K)
        (ref * _weights(3)).sum().backward()
        results[(shared, "offline-tail", None)] = (
            loss,
            grad,
            ref.detach().float(),
            leaf.grad[..., s_shard],
        )
    return results


@pytest.mark.multirank
@pytest.mark.timeout(240)
def test_tensor_parallel_shards_that_do_not_line_up_match_the_reference():
    """At TP=2 with student and teacher shards of different widths, every online loss (dense,
    top-k), the cache writer and the offline tail loss equal the single-rank reference on
    [:N], also with N such that one rank holds only padding; padding gradients are 0."""
    ranks = run_distributed(tp2_vocab_checks, 2, timeout=200)
    for rank, rank_results in enumerate(ranks):
        assert len(rank_results) == 2 * (2 * len(LOSS_TYPES) + 2)
        for key, values in rank_results.items():
            half = len(values) // 2
            for ours, reference in zip(values[:half], values[half:], strict=True):
                torch.testing.assert_close(
                    ours.float(), reference.float(), rtol=1e-5, atol=1e-5, msg=str(key)
                )
            if key[1] != "writer":
                grad = values[1]
                shard_start = rank * STUDENT_VOCAB // 2
                padding = grad[..., max(key[0] - shard_start, 0) :]
                assert torch.count_nonzero(padding) == 0, key
    for key in ranks[0]:
        assert torch.equal(ranks[0][key][0], ranks[1][key][0]), key


# ---------------------------------------------------------------------------------- (e) errors
SEQ = 32
BYTE_TOKENS = 258  # the byte tokenizer: 256 bytes, <eod>, <pad>
STUDENT = GPTModelConfig(
    num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=320
)
TEACHER = STUDENT.replace(num_layers=2, hidden_size=48, vocab_size=384)


def test_build_refuses_a_teacher_smaller_than_the_tokenizer(single_rank):
    """A teacher padded below the tokenizer's size is refused naming both, before building;
    different paddings without a shared vocabulary are refused naming both sizes."""
    from kd_module.distillation.model import build_distillation_model

    with pytest.raises(
        ValueError, match=r"teacher's padded vocab_size 256 is smaller than the tokenizer's 258"
    ):
        build_distillation_model(
            STUDENT, TEACHER.replace(vocab_size=256), shared_vocab_size=BYTE_TOKENS
        )
    with pytest.raises(ValueError, match=r"teacher vocab_size 384 differs from student .* 320"):
        build_distillation_model(STUDENT, TEACHER)


def test_tokenizer_size_mismatch_names_both_tokenizers():
    """A teacher tokenizer section with another vocab_size than the data tokenizer's is refused
    naming both tokenizers and both sizes."""
    from kd_module.data.tokenizers import TokenizerConfig
    from kd_module.rules import tokenizer_problems

    teacher = {"library": "byte", "type": "teacher-bytes", "vocab_size": 300}
    (problem,) = tokenizer_problems(TokenizerConfig(), teacher, BYTE_TOKENS)
    assert "teacher-bytes has vocab_size=300" in problem
    assert "data's tokenizer byte has vocab_size=258" in problem
    assert tokenizer_problems(TokenizerConfig(), {**teacher, "vocab_size": 258}, 258) == []


def test_distill_refuses_a_teacher_smaller_than_the_tokenizer_before_building(tmp_path):
    """distill() reports a teacher vocab_size below the data tokenizer's size in its one
    message, before any model is built."""
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.specs import RunConfig, TeacherSpec
    from kd_module.training.strategy import MegatronStrategy

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, strategy=MegatronStrategy()
    )
    data = GPTDataModule(mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=2)
    with pytest.raises(ValueError, match=r"vocab_size 256 is smaller than the tokenizer's 258"):
        distill(
            STUDENT,
            data,
            trainer,
            teacher=TeacherSpec(config=TEACHER.replace(vocab_size=256)),
            job=RunConfig(log_dir=str(tmp_path)),
        )
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------- (d) end to end, Trainer
def test_shrunk_padded_vocab_pair_distills_through_the_trainer():
    """A teacher padded to 384 and a student padded to 320 (byte tokenizer, 258 tokens) train
    through Lightning; the logged step-0 KD loss equals the reference computed from the two
    models' logits cut to [:258], on the micro-batches of that step."""
    import lightning as L

    from kd_module.data import GPTDataModule
    from kd_module.models.gpt import unwrap
    from kd_module.training.module import DistillationModule
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy
    from tests.helpers import init_weights_by_global_key

    expected = {}

    class Recording(DistillationModule):
        """Computes the step-0 reference from the models as they are before the first update."""

        def _micro_batches(self, dataloader_iter, count):
            batches = super()._micro_batches(dataloader_iter, count)
            if not expected:
                expected.update(_step_reference(unwrap(self.module), batches))
            return batches

    module = Recording(
        STUDENT,
        TEACHER,
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1),
        student_init_fn=lambda m: init_weights_by_global_key(m, seed=1),
        teacher_init_fn=lambda m: init_weights_by_global_key(m, seed=2, std=0.3),
    )
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=4,
        num_train_samples=12,
        num_val_samples=4,
    )
    steps = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Recorder()],
    )
    trainer.fit(module, datamodule=data)
    core = unwrap(module.module)
    assert core.embedding.word_embeddings.weight.shape[0] == 320
    assert core.teacher_model.embedding.word_embeddings.weight.shape[0] == 384
    assert len(steps) == 3 and all(math.isfinite(step["kd_loss"]) for step in steps)
    assert steps[0]["logits_loss"] == pytest.approx(expected["masked"], rel=1e-5)
    assert steps[0]["kd_loss"] == pytest.approx(expected["masked"], rel=1e-5)
    assert steps[0]["logits_loss"] != pytest.approx(expected["unmasked"], rel=1e-3)


def _step_reference(model, batches) -> dict:
    """Mean over the step's loss-masked tokens of the reference KD loss on logits cut to the
    tokenizer's 258 entries, and (to show the cut matters) on the common 320 columns."""
    sums = {"masked": 0.0, "unmasked": 0.0}
    count = 0.0
    for batch in batches:
        args = (batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        with torch.no_grad(), model.only_student_forward():
            student = type(model).forward(model, *args)
        with torch.no_grad():
            teacher = model.teacher_model(*args)
        mask = batch["loss_mask"].float()
        for key, width in (("masked", BYTE_TOKENS), ("unmasked", 320)):
            per_token = reference_logits_kd_loss(student[..., :width], teacher[..., :width])
            sums[key] += float((per_token * mask).sum())
        count += float(mask.sum())
    return {key: value / count for key, value in sums.items()}


def test_teacher_cache_job_excludes_padding_rows(tmp_path):
    """build_teacher_cache(exclude_padded_vocab=True) for a teacher padded to 384 (byte
    tokenizer, 258 tokens) stores no index >= 258 and records shared_vocab_size; the same
    teacher cached without it does pick padding rows (so the check can fail)."""
    import numpy as np

    from kd_module.data import GPTDataModule
    from kd_module.offline.job import build_teacher_cache
    from kd_module.specs import TeacherSpec
    from tests.helpers import init_weights_by_global_key

    def cache(out_dir, **kwargs):
        data = GPTDataModule(
            mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=2, num_train_samples=4
        )
        manifest = build_teacher_cache(
            data,
            str(out_dir),
            TeacherSpec(config=TEACHER),
            k=16,
            dtype="fp32",
            accelerator="cpu",
            precision="fp32",
            teacher_init_fn=lambda m: init_weights_by_global_key(m, seed=2, std=0.3),
            **kwargs,
        )
        indices = np.concatenate([np.load(p) for p in sorted(out_dir.glob("*indices.npy"))])
        return manifest, indices

    manifest, indices = cache(tmp_path / "shared", exclude_padded_vocab=True)
    assert manifest["shared_vocab_size"] == BYTE_TOKENS
    assert indices.size and int(indices.max()) < BYTE_TOKENS
    # A student padded to 320 (< the teacher's 384) trains from it over the 258 shared entries.
    from kd_module.offline.module import OfflineDistillationModule

    module = OfflineDistillationModule(STUDENT, str(tmp_path / "shared"))
    assert module.training_objective.shared_vocab_size == BYTE_TOKENS
    data = GPTDataModule(
        mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=2, num_train_samples=4
    )
    assert module.data_problems(data, max_steps=2) == []
    small = OfflineDistillationModule(STUDENT.replace(vocab_size=256), str(tmp_path / "shared"))
    (problem,) = small.data_problems(data, max_steps=2)
    assert "student vocab_size=256 is smaller than the cached teacher's shared_vocab_size 258" in (
        problem
    )
    manifest, indices = cache(tmp_path / "padded")
    assert "shared_vocab_size" not in manifest
    assert int(indices.max()) >= BYTE_TOKENS
