"""Offline distillation: teacher top-k cache (layout, resume, manifest) and the offline loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_module.models.gpt import GPTModelConfig

SEQ, VOCAB, K = 8, 64, 5
TEACHER = GPTModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    seq_length=SEQ,
    vocab_size=VOCAB,
    share_embeddings_and_output_weights=False,
)
MANIFEST = {"teacher": "tiny-teacher", "tokenizer": "byte", "dataset": "random", "seq_length": SEQ}
NUM_SAMPLES = 6  # shard_size 4: shard 0 holds samples 0-3, shard 1 holds 4-5 (partial)


def _tokens(sample: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(100 + sample))


DATASET = [{"tokens": _tokens(i), "position_ids": torch.arange(SEQ)} for i in range(NUM_SAMPLES)]


def _teacher(layout=None):
    from kd_module.models.gpt import build_model
    from tests.helpers import init_weights_by_global_key

    model = build_model(TEACHER, layout)
    init_weights_by_global_key(model, seed=3)
    return model.eval()


def _teacher_logits(model, samples) -> torch.Tensor:
    """Teacher logits [s, b, v] of ``samples``, computed directly."""
    tokens = torch.stack([_tokens(i) for i in samples])
    with torch.no_grad():
        return model(tokens, torch.arange(SEQ).expand(len(samples), SEQ), None).transpose(0, 1)


def _cache(model, out_dir, dtype="fp32", **kwargs):
    from kd_module.offline.writer import cache_teacher

    kwargs = {"micro_batch_size": 3, "shard_size": 4, "micro_batches_per_call": 1, **kwargs}
    return cache_teacher(model, DATASET, out_dir, k=K, manifest=MANIFEST, dtype=dtype, **kwargs)


def _cached(cache, samples):
    """Lookup in the student's [s, b] token order."""
    return tuple(t.transpose(0, 1) for t in cache.lookup(samples))


def test_lookup_returns_each_samples_teacher_topk_and_lse(single_rank, tmp_path):
    """lookup(sample indices) gives that sample's teacher top-k, indices and full LSE."""
    from kd_module.offline.reader import TeacherCache

    model = _teacher()
    manifest = _cache(model, tmp_path)
    assert manifest["num_samples"] == 6 and manifest["complete"] is True
    cache = TeacherCache(tmp_path)
    samples = [5, 2, 0]
    values, indices, lse = cache.lookup(samples)
    assert values.shape == (3, SEQ, K) and indices.shape == (3, SEQ, K) and lse.shape == (3, SEQ)
    logits = _teacher_logits(model, samples).transpose(0, 1)  # [b, s, v]
    expected = torch.topk(logits, K, dim=-1)
    torch.testing.assert_close(values, expected.values, rtol=0, atol=0)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sample index 6 outside 0 .. 5"):
        cache.lookup([6])


def test_renormalized_offline_loss_equals_online_topk_loss(single_rank, tmp_path):
    """Offline renormalized loss and gradient equal LogitsKDLoss(top_k=k) (fp32 cache, 1e-5)."""
    from kd_module.distillation.losses import LogitsKDLoss, reference_logits_kd_loss
    from kd_module.offline.loss import offline_topk_kd_loss
    from kd_module.offline.reader import TeacherCache

    model = _teacher()
    _cache(model, tmp_path)
    cache = TeacherCache(tmp_path)
    generator = torch.Generator().manual_seed(7)
    for samples in ([4, 0], [1, 5], [2, 3]):
        teacher_logits = _teacher_logits(model, samples)
        student = torch.randn(SEQ, len(samples), VOCAB, generator=generator).requires_grad_()
        offline = offline_topk_kd_loss(student, *_cached(cache, samples), temperature=2.0)
        expected = reference_logits_kd_loss(student, teacher_logits, temperature=2.0, top_k=K)
        torch.testing.assert_close(offline, expected, rtol=1e-5, atol=1e-7)
        assert offline.min() > 0.01  # the student differs from the teacher: a non-trivial loss
        (grad,) = torch.autograd.grad(offline.sum(), student)
        online = LogitsKDLoss(temperature=2.0, top_k=K)(student, teacher_logits)
        (expected_grad,) = torch.autograd.grad(online.sum(), student)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_half_precision_cache_loss_is_close_to_online_loss(
    single_rank, tmp_path, dtype, torch_dtype
):
    """A bf16/fp16 cache stores rounded logits and gives the online top-k loss within 2e-2."""
    from kd_module.distillation.losses import reference_logits_kd_loss
    from kd_module.offline.format import cache_bytes_per_token
    from kd_module.offline.loss import offline_topk_kd_loss
    from kd_module.offline.reader import TeacherCache

    model = _teacher()
    _cache(model, tmp_path, dtype=dtype)
    cache = TeacherCache(tmp_path)
    samples = [1, 4]
    values, indices, lse = _cached(cache, samples)
    assert values.dtype == torch_dtype and indices.dtype == torch.int64
    teacher_logits = _teacher_logits(model, samples)
    torch.testing.assert_close(
        values, torch.topk(teacher_logits, K, dim=-1).values.to(torch_dtype), rtol=0, atol=0
    )
    student = torch.randn(SEQ, 2, VOCAB, generator=torch.Generator().manual_seed(8))
    offline = offline_topk_kd_loss(student, values, indices, lse)
    expected = reference_logits_kd_loss(student, teacher_logits, top_k=K)
    torch.testing.assert_close(offline, expected, rtol=2e-2, atol=1e-3)
    shard = [np.load(path, mmap_mode="r") for path in sorted(tmp_path.glob("shard_00000.*.npy"))]
    fingerprints = 4 * 8  # one int64 per sample
    assert sum(a.nbytes for a in shard) == 4 * SEQ * cache_bytes_per_token(K, dtype) + fingerprints
    assert cache_bytes_per_token(K, dtype) == K * 6 + 4
    assert cache_bytes_per_token(64, "bf16") == 388 and cache_bytes_per_token(64, "fp32") == 516


def test_weights_hash_tracks_parameter_values(single_rank):
    """Same weights give the same hash; one changed value changes it."""
    from kd_module.offline.writer import weights_sha256

    first, second = _teacher(), _teacher()
    assert weights_sha256(first) == weights_sha256(second)
    with torch.no_grad():
        next(second.parameters()).view(-1)[0] += 1e-3
    assert weights_sha256(first) != weights_sha256(second)


def test_manifest_mismatch_is_refused_naming_the_field(single_rank, tmp_path):
    """check_manifest and a restarted cache run with another k name the differing field."""
    from kd_module.offline.reader import TeacherCache
    from kd_module.offline.writer import cache_teacher

    model = _teacher()
    _cache(model, tmp_path)
    cache = TeacherCache(tmp_path)
    cache.check_manifest({**MANIFEST, "k": K, "dtype": "fp32"})
    with pytest.raises(ValueError, match="'teacher' is 'tiny-teacher' in the cache but 'other'"):
        cache.check_manifest({"seq_length": SEQ, "teacher": "other", "k": 3})
    with pytest.raises(ValueError, match="'k' is 5 in the cache but 3 is expected"):
        cache_teacher(model, DATASET, tmp_path, k=3, manifest=MANIFEST)
    with pytest.raises(ValueError, match="'seq_length' is 8 in the cache but 16"):
        cache.check_manifest({"seq_length": 16})


@pytest.mark.parametrize("micro_batches_per_call", [1, 2])
def test_interrupted_cache_run_resumes_to_identical_files(
    single_rank, tmp_path, micro_batches_per_call
):
    """A run killed after shard 0 reruns only shard 1 on restart; files are byte-identical."""
    model = _teacher()
    kwargs = {"dtype": "bf16", "micro_batches_per_call": micro_batches_per_call}
    _cache(model, tmp_path / "clean", **kwargs)

    def crash(shard: int) -> None:
        raise RuntimeError(f"killed after shard {shard}")

    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed after shard 0"):
        _cache(model, resumed, on_shard_done=crash, **kwargs)
    assert json.loads((resumed / "manifest.json").read_text())["complete"] is False
    assert not (resumed / "shard_00001.done").exists()
    # A half-written shard 1 from the killed run is rewritten, not trusted.
    np.save(resumed / "shard_00001.lse.npy", np.zeros((2, SEQ), np.float32))
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    _cache(model, resumed, **kwargs)
    handle.remove()
    assert len(calls) == 1  # shard 1 (samples 4, 5) is one micro-batch of 3, padded
    clean_files = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert clean_files == sorted(p.name for p in resumed.iterdir())
    assert len(clean_files) == 11  # manifest + 2 shards x (values, indices, lse, tokens, done)
    for name in clean_files:
        assert (resumed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_micro_batch_size_and_grouping_do_not_change_the_cache(single_rank, tmp_path):
    """Micro-batches of 1 and of 3 (padded) cache the same rows, to float rounding."""
    from kd_module.offline.reader import TeacherCache

    model = _teacher()
    _cache(model, tmp_path / "mbs1", micro_batch_size=1, micro_batches_per_call=4)
    _cache(model, tmp_path / "mbs3")
    for one, three in zip(
        TeacherCache(tmp_path / "mbs1").lookup(range(6)),
        TeacherCache(tmp_path / "mbs3").lookup(range(6)),
        strict=True,
    ):
        torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)


def test_check_tokens_refuses_other_data(single_rank, tmp_path):
    """Tokens of sample 2 pass; the tokens of another sample under index 2 are named."""
    from kd_module.offline.reader import TeacherCache

    _cache(_teacher(), tmp_path)
    cache = TeacherCache(tmp_path)
    cache.check_tokens([2, 5], torch.stack([_tokens(2), _tokens(5)]))
    with pytest.raises(ValueError, match="the tokens of sample 2 differ"):
        cache.check_tokens([5, 2], torch.stack([_tokens(5), _tokens(3)]))


def test_tail_mode_matches_a_hand_computation():
    """Tail bucket: teacher (.5, .25 | tail .25) vs uniform student (.25, .25 | .5) is ln2 / 4."""
    from kd_module.offline.loss import offline_topk_kd_loss

    teacher = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    student = torch.zeros(1, 1, 4)
    values, indices = torch.topk(teacher, 2)
    loss = offline_topk_kd_loss(
        student, values.view(1, 1, 2), indices.view(1, 1, 2), torch.zeros(1, 1), mode="tail"
    )
    torch.testing.assert_close(loss, torch.full((1, 1), math.log(2) / 4), rtol=1e-6, atol=1e-7)


def test_tail_mode_with_the_whole_vocabulary_is_the_full_kl():
    """With k = vocab the tail is empty and the tail loss and gradient equal the full forward KL."""
    from kd_module.distillation.losses import reference_logits_kd_loss
    from kd_module.offline.loss import offline_topk_kd_loss

    generator = torch.Generator().manual_seed(4)
    teacher = torch.randn(3, 2, 16, generator=generator) * 3
    student = (torch.randn(3, 2, 16, generator=generator) * 3).requires_grad_()
    values, indices = torch.topk(teacher, 16, dim=-1)
    loss = offline_topk_kd_loss(
        student, values, indices, torch.logsumexp(teacher, dim=-1), mode="tail"
    )
    expected = reference_logits_kd_loss(student, teacher)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(loss.sum(), student)[0]
    expected_grad = torch.autograd.grad(expected.sum(), student)[0]
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def _tail_reference(student, teacher, k):
    """The tail-mode loss computed plainly in float64 from the full teacher logits."""
    student, teacher = student.double(), teacher.double()
    values, indices = torch.topk(teacher, k, dim=-1)
    p_all, log_q_all = torch.softmax(teacher, -1), torch.log_softmax(student, -1)
    p = torch.gather(p_all, -1, indices)
    log_q = torch.gather(log_q_all, -1, indices)
    top = (p * (torch.log(p) - log_q)).sum(-1)
    in_top = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, indices, True)
    log_q_tail = torch.logsumexp(log_q_all.masked_fill(in_top, float("-inf")), -1)
    p_tail = 1 - p.sum(-1)
    return top + p_tail * (torch.log(p_tail) - log_q_tail)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_tail_mode_equals_a_float64_reference_for_any_chunk_size(chunk_size):
    """Loss and gradient of the chunked tail mode equal a plain float64 computation."""
    from kd_module.offline.loss import offline_topk_kd_loss

    generator = torch.Generator().manual_seed(6)
    teacher = torch.randn(4, 3, 40, generator=generator) * 2
    student = (torch.randn(4, 3, 40, generator=generator) * 2).requires_grad_()
    values, indices = torch.topk(teacher, 6, dim=-1)
    lse = torch.logsumexp(teacher, dim=-1)
    loss = offline_topk_kd_loss(student, values, indices, lse, mode="tail", chunk_size=chunk_size)
    expected = _tail_reference(student, teacher, 6)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_tail_mode_is_exact_when_the_students_tail_is_tiny():
    """A student with ~1e-12 mass outside the top-k: log q_tail is not lost to 1 - sum(q)."""
    from kd_module.offline.loss import offline_topk_kd_loss

    teacher = torch.tensor([[[4.0, 3.0, 0.0, 0.0, 0.0, 0.0]]])
    student = torch.tensor([[[14.0, 14.0, -14.0, -14.0, -14.0, -14.0]]])
    values, indices = torch.topk(teacher, 2, dim=-1)
    loss = offline_topk_kd_loss(student, values, indices, torch.logsumexp(teacher, -1), mode="tail")
    expected = _tail_reference(student, teacher, 2)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert expected.item() > 0.5  # dominated by the tail term: p_tail log(p_tail / 2e-12)


def test_tail_mode_is_between_renormalized_topk_and_full_kl_in_a_case():
    """Tail loss is a lower bound of the full KL, with the teacher's tail mass now counted."""
    from kd_module.distillation.losses import reference_logits_kd_loss
    from kd_module.offline.loss import offline_topk_kd_loss

    generator = torch.Generator().manual_seed(5)
    teacher = torch.randn(4, 3, 32, generator=generator) * 2
    student = torch.randn(4, 3, 32, generator=generator) * 2
    values, indices = torch.topk(teacher, 4, dim=-1)
    tail = offline_topk_kd_loss(
        student, values, indices, torch.logsumexp(teacher, dim=-1), mode="tail"
    )
    full = reference_logits_kd_loss(student, teacher)
    assert torch.all(tail <= full + 1e-6)
    assert torch.all(tail > 0)


def test_offline_loss_refuses_bad_arguments():
    """Temperature != 1 in tail mode, an unknown mode and mismatched shapes are named."""
    from kd_module.offline.loss import offline_topk_kd_loss

    student = torch.zeros(2, 1, 8)
    values, indices, lse = torch.zeros(2, 1, 3), torch.zeros(2, 1, 3, dtype=torch.long), None
    with pytest.raises(ValueError, match="temperature=2.0 needs mode='renormalized'"):
        offline_topk_kd_loss(student, values, indices, torch.zeros(2, 1), 2.0, mode="tail")
    with pytest.raises(ValueError, match="mode='exact' is not one of renormalized, tail"):
        offline_topk_kd_loss(student, values, indices, lse, mode="exact")
    with pytest.raises(ValueError, match=r"values \(1, 2, 3\) and indices"):
        offline_topk_kd_loss(student, values.view(1, 2, 3), indices, lse)


def test_cache_teacher_refuses_bad_arguments(tmp_path):
    """k, dtype, shard_size and num_samples are validated together; reserved keys are refused."""
    from kd_module.offline.writer import cache_teacher

    with pytest.raises(ValueError, match=r"k=0 .*shard_size=-1.*dtype='int8'.*num_samples=7 is"):
        cache_teacher(
            None, DATASET, tmp_path, k=0, manifest={}, dtype="int8", shard_size=-1, num_samples=7
        )
    with pytest.raises(ValueError, match=r"manifest keys \['k'\] are set by cache_teacher"):
        cache_teacher(None, DATASET, Path(tmp_path), k=2, manifest={"k": 2})
    assert not list(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------- tensor parallel


def _layouts_cache_and_losses(out_dir: str) -> dict:
    """2 ranks: cache at TP=2, PP=2 and DP=2; TP=2 offline losses and gradients on each shard."""
    from kd_module.models.gpt import ParallelLayout
    from kd_module.offline.loss import offline_topk_kd_loss
    from kd_module.offline.reader import TeacherCache
    from kd_module.parallel import runtime

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
    for name, tp, pp in (("pp2", 1, 2), ("dp2", 1, 1), ("tp2", 2, 1)):
        runtime.initialize_distributed(tp, pp, seed=5)
        layout = ParallelLayout(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        _cache(_teacher(layout), f"{out_dir}/{name}", micro_batches_per_call=2)
    rank = torch.distributed.get_rank()
    cache = TeacherCache(f"{out_dir}/tp2")
    student = torch.randn(SEQ, 2, VOCAB, generator=torch.Generator().manual_seed(9))
    shard = student[..., rank * VOCAB // 2 : (rank + 1) * VOCAB // 2].clone().requires_grad_()
    result = {}
    for mode in ("renormalized", "tail"):
        loss = offline_topk_kd_loss(shard, *_cached(cache, [3, 4]), mode=mode)
        (grad,) = torch.autograd.grad(loss.sum(), shard)
        result[mode] = (loss.detach(), grad)
    runtime.destroy_distributed()
    return result


@pytest.mark.multirank
def test_tp2_pp2_dp2_caches_and_tp2_offline_loss_match_single_rank(single_rank, tmp_path):
    """TP=2 and PP=2 teachers cache the TP=1 top-k and LSE, DP=2 the identical bytes; TP=2
    offline losses and gradients equal TP=1."""
    from kd_module.offline.loss import offline_topk_kd_loss
    from kd_module.offline.reader import TeacherCache
    from tests.helpers import run_distributed

    results = run_distributed(_layouts_cache_and_losses, 2, str(tmp_path), timeout=300)
    _cache(_teacher(), tmp_path / "tp1", micro_batches_per_call=2)
    tp1 = TeacherCache(tmp_path / "tp1")
    for name in ("tp2", "pp2"):
        other = TeacherCache(tmp_path / name)
        for one, two in zip(tp1.lookup(range(6)), other.lookup(range(6)), strict=True):
            torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5, msg=name)
    files = sorted(p.name for p in (tmp_path / "tp1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "dp2").iterdir())
    for name in files:  # each replica wrote its own shard, identical to one rank's
        assert (tmp_path / "dp2" / name).read_bytes() == (tmp_path / "tp1" / name).read_bytes()
    student = torch.randn(SEQ, 2, VOCAB, generator=torch.Generator().manual_seed(9))
    student.requires_grad_()
    for mode in ("renormalized", "tail"):
        loss = offline_topk_kd_loss(student, *_cached(tp1, [3, 4]), mode=mode)
        (grad,) = torch.autograd.grad(loss.sum(), student)
        for result in results:
            torch.testing.assert_close(result[mode][0], loss.detach(), rtol=1e-5, atol=1e-6)
        tp_grad = torch.cat([result[mode][1] for result in results], dim=-1)
        torch.testing.assert_close(tp_grad, grad, rtol=1e-5, atol=1e-6, msg=mode)
