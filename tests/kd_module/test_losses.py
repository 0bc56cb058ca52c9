"""Tests for the chunked, TP-aware logits KD losses in kd_module.distillation.losses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from modelopt.torch.distill.plugins.megatron import LogitsKLLoss, TopKLogitsKLLoss

from kd_module.distillation.losses import (
    LOSS_TYPES,
    KDLogitsCriterion,
    LogitsKDLoss,
    LossWeights,
    reference_logits_kd_loss,
    vocab_parallel_cross_entropy_no_grad,
)
from tests.helpers import largest_new_allocation, run_distributed

RTOL = 1e-5
ATOL = 1e-6
TOP_K = 5


def _logits(seed: int, shape: tuple[int, ...] = (5, 3, 40), scale: float = 3.0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator) * scale
    teacher = torch.randn(shape, generator=generator) * scale
    return student, teacher


def _loss_and_grad(loss_fn, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor):
    student = student.detach().clone().requires_grad_(True)
    loss = loss_fn(student, teacher)
    (loss * weights).sum().backward()
    return loss.detach(), student.grad


def _weights(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5


def _projection_inputs(seed: int, tokens: tuple[int, int] = (5, 3), hidden: int = 16) -> dict:
    """Student and teacher output-layer inputs (teacher 1.5x wider), weights and labels."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "student_hidden": torch.randn(*tokens, hidden, generator=generator),
        "student_weight": torch.randn(40, hidden, generator=generator) * 0.5,
        "teacher_hidden": torch.randn(*tokens, hidden * 3 // 2, generator=generator),
        "teacher_weight": torch.randn(40, hidden * 3 // 2, generator=generator) * 0.5,
        "labels": torch.randint(0, 40, tokens, generator=generator),
    }


BACKWARDS = ("recomputed", "precomputed", "unexpected-weights")
"""How the fused pass gets its gradients: no :class:`LossWeights` (backward recomputes the
projections); weights the objective then follows up to a constant (forward computes them); weights
the objective does not follow (backward notices and recomputes)."""


def _fused_and_reference(
    inputs: dict, weights, shard=None, with_lm_loss=True, backward="recomputed", **loss_kwargs
):
    """(kd, lm, grad_hidden, grad_weight) of the fused path and of projections + references.

    The fused path sees this rank's vocabulary ``shard`` of both weights; the reference projects
    with the full weights, then takes :func:`reference_logits_kd_loss` and torch's cross
    entropy. Both backpropagate ``sum(weights * kd) + sum(lm_weights * lm)``: with
    ``lm_weights = 0.7 * weights``, all times 0.25, when ``backward="precomputed"`` (the fused
    pass is told the weights up to that constant), else with ``lm_weights = weights.flip(0)``
    (``"unexpected-weights"`` tells the fused pass uniform weights instead). Asserts the
    fused backward took the expected way.
    """
    precomputed = backward == "precomputed"
    lm_weights = 0.7 * weights if precomputed else weights.flip(0)
    factor = 0.25 if precomputed else 1.0
    labels = inputs["labels"] if with_lm_loss else None
    local = slice(None) if shard is None else shard
    results = []
    for fused in (True, False):
        h = inputs["student_hidden"].detach().clone().requires_grad_(True)
        w = inputs["student_weight"].detach().clone().requires_grad_(True)
        teacher_hidden, teacher_weight = inputs["teacher_hidden"], inputs["teacher_weight"]
        if fused:
            loss_fn = LogitsKDLoss(chunk_size=4, **loss_kwargs)
            told = None
            if backward != "recomputed":
                tokens = weights if precomputed else torch.ones_like(weights)
                told = LossWeights(tokens, kd=1.0, lm=0.7 if with_lm_loss else 0.0)
            kd, lm = loss_fn.forward_from_hidden(
                h, w[local], teacher_hidden, teacher_weight[local], labels, loss_weights=told
            )
        else:
            # Projections in the inputs' dtype, losses in fp32, as the unfused model does.
            logits = (h @ w.t()).float()
            kd = reference_logits_kd_loss(
                logits, (teacher_hidden @ teacher_weight.t()).float(), **loss_kwargs
            )
            lm = None
            if with_lm_loss:
                flat = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
                )
                lm = flat.reshape(labels.shape)
        total = (kd * weights).sum() + (0.0 if lm is None else (lm * lm_weights).sum())
        (total * factor).backward()
        lm_value = torch.zeros(0) if lm is None else lm.detach()
        results.append((kd.detach(), lm_value, h.grad, w.grad[local]))
    expected_way = "precomputed" if precomputed else "recomputed"
    assert loss_fn.fused_backwards == {expected_way: 1}, (backward, loss_fn.fused_backwards)
    return results


@pytest.mark.parametrize("top_k", [None, TOP_K])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference_loss_and_gradient(loss_type: str, top_k: int | None) -> None:
    """Loss and student gradient equal autograd of the fp32 reference for every loss type."""
    student, teacher = _logits(0)
    weights = _weights(1, student.shape[:-1])
    kwargs = dict(loss_type=loss_type, temperature=1.7, jsd_beta=0.3, top_k=top_k)
    ours = _loss_and_grad(LogitsKDLoss(chunk_size=4, **kwargs), student, teacher, weights)
    ref = _loss_and_grad(
        lambda s, t: reference_logits_kd_loss(s, t, **kwargs), student, teacher, weights
    )
    assert ours[0].dtype == torch.float32 and ours[0].shape == (5, 3)
    assert ours[0].min() > 0
    torch.testing.assert_close(ours[0], ref[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours[1], ref[1], rtol=RTOL, atol=ATOL)
    if top_k is not None:
        # Only the teacher's top-k entries of each token receive gradient.
        assert ((ours[1] != 0).sum(dim=-1) <= top_k).all()


def test_hand_computed_values_on_three_entry_vocabulary() -> None:
    """p_t = (1/2, 1/4, 1/4), p_s uniform: forward KL = ln(9/8)/2, reverse KL = ln(32/27)/3."""
    teacher = torch.tensor([0.5, 0.25, 0.25]).log().reshape(1, 1, 3)
    student = torch.zeros(1, 1, 3)
    forward = LogitsKDLoss("forward_kl")(student, teacher)
    reverse = LogitsKDLoss("reverse_kl")(student, teacher)
    assert forward.item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-6)
    assert reverse.item() == pytest.approx(math.log(32 / 27) / 3, rel=1e-6)
    # JSD with m = (5/12, 7/24, 7/24) at beta = 1/2.
    p, q, m = [0.5, 0.25, 0.25], [1 / 3] * 3, [5 / 12, 7 / 24, 7 / 24]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m, strict=True))
    jsd += 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m, strict=True))
    assert LogitsKDLoss("jsd")(student, teacher).item() == pytest.approx(jsd, rel=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_temperature_divides_logits(loss_type: str) -> None:
    """Temperature T equals T=1 on logits / T, with a 1/T gradient factor; higher T, lower loss."""
    student, teacher = _logits(2)
    weights = torch.ones(student.shape[:-1])
    hot = _loss_and_grad(LogitsKDLoss(loss_type, temperature=4.0), student, teacher, weights)
    cold = _loss_and_grad(LogitsKDLoss(loss_type), student / 4.0, teacher / 4.0, weights)
    torch.testing.assert_close(hot[0], cold[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(hot[1], cold[1] / 4.0, rtol=RTOL, atol=ATOL)
    plain = LogitsKDLoss(loss_type)(student, teacher)
    assert (hot[0] < plain).all()


@pytest.mark.parametrize("top_k", [None, TOP_K])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunk_size_does_not_change_results(loss_type: str, top_k: int | None) -> None:
    """Chunks of 4 (not dividing 15 tokens), 1 and 1024 give the same loss and gradient.

    Same up to the last bit: vectorized exp/log kernels may round a row differently by its length.
    """
    student, teacher = _logits(3)
    weights = _weights(4, student.shape[:-1])
    results = [
        _loss_and_grad(
            LogitsKDLoss(loss_type, top_k=top_k, chunk_size=chunk), student, teacher, weights
        )
        for chunk in (4, 1, 1024)
    ]
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_inputs_agree_with_fp32_reference(loss_type: str) -> None:
    """bf16 logits: fp32 loss exact on the rounded inputs, bf16 gradient within bf16 rounding."""
    student, teacher = _logits(5, shape=(6, 2, 300))
    weights = torch.ones(student.shape[:-1])
    student_bf16, teacher_bf16 = student.bfloat16(), teacher.bfloat16()
    loss, grad = _loss_and_grad(
        LogitsKDLoss(loss_type, chunk_size=5), student_bf16, teacher_bf16, weights
    )
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16

    def reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return reference_logits_kd_loss(s, t, loss_type)

    rounded = _loss_and_grad(reference, student_bf16.float(), teacher_bf16.float(), weights)
    torch.testing.assert_close(loss, rounded[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad.float(), rounded[1], rtol=2**-8, atol=1e-7)
    # Against the unrounded fp32 logits, only the input rounding separates the losses.
    exact_loss = reference(student, teacher)
    torch.testing.assert_close(loss, exact_loss.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("with_lm_loss", [True, False], ids=["lm-loss", "no-lm-loss"])
@pytest.mark.parametrize("top_k", [None, TOP_K])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_projections_match_projections_then_reference(
    loss_type: str, top_k: int | None, with_lm_loss: bool, backward: str
) -> None:
    """forward_from_hidden (both projections inside the loss, LM cross entropy from the same
    pass) equals the projections then the references: both losses, hidden and weight grads,
    whether its forward computed the gradients or its backward recomputed the projections."""
    inputs = _projection_inputs(13)
    weights = _weights(14, inputs["labels"].shape)
    kwargs = dict(loss_type=loss_type, temperature=1.3, jsd_beta=0.4, top_k=top_k)
    fused, reference = _fused_and_reference(
        inputs, weights, with_lm_loss=with_lm_loss, backward=backward, **kwargs
    )
    for ours, theirs in zip(fused, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("backward", ["precomputed", "recomputed"])
@pytest.mark.parametrize("top_k", [None, TOP_K])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_projections_in_bf16_match_bf16_projections_then_reference(
    loss_type: str, top_k: int | None, backward: str
) -> None:
    """bf16 hidden states and weights (a bf16 model's output layers): the fused pass's fp32
    losses equal the fp32 references on the bf16 projections (rtol 1e-5), and its bf16 hidden
    and weight gradients are within one bf16 rounding of the largest reference gradient, whether
    the forward computed them or the backward recomputed the projections."""
    inputs = {
        key: value.bfloat16() if value.is_floating_point() else value
        for key, value in _projection_inputs(21, tokens=(6, 2), hidden=32).items()
    }
    weights = _weights(22, inputs["labels"].shape)
    fused, reference = _fused_and_reference(
        inputs, weights, backward=backward, loss_type=loss_type, top_k=top_k
    )
    for ours, theirs in zip(fused[:2], reference[:2], strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-5)
    for ours, theirs in zip(fused[2:], reference[2:], strict=True):
        assert ours.dtype == torch.bfloat16
        scale = theirs.float().abs().max()
        assert (ours.float() - theirs.float()).abs().max() <= 2**-7 * scale, (ours, theirs)


def test_fused_projections_check_inputs() -> None:
    """forward_from_hidden names every shape problem at once; empty input gives empty losses."""
    inputs = _projection_inputs(13)
    loss_fn = LogitsKDLoss()
    with pytest.raises(ValueError, match=r"student hidden .* weight .*; .*labels \(4, 3\)"):
        loss_fn.forward_from_hidden(
            inputs["student_hidden"],
            inputs["student_weight"][:, :8],
            inputs["teacher_hidden"],
            inputs["teacher_weight"],
            inputs["labels"][:4],
        )
    with pytest.raises(ValueError, match=r"top_k=41 is larger than the vocabulary \(40\)"):
        LogitsKDLoss(top_k=41).forward_from_hidden(**inputs)
    with pytest.raises(ValueError, match=r"shared_vocab_size is not supported"):
        LogitsKDLoss(shared_vocab_size=30).forward_from_hidden(**inputs)
    with pytest.raises(
        ValueError, match=r"loss_weights.tokens \(3, 5\) are not the hidden states' tokens"
    ):
        loss_fn.forward_from_hidden(**inputs, loss_weights=LossWeights(torch.ones(3, 5)))
    no_labels = {**inputs, "labels": None}
    with pytest.raises(ValueError, match=r"loss_weights.lm=1.0 weights an LM loss but labels"):
        loss_fn.forward_from_hidden(**no_labels, loss_weights=LossWeights(torch.ones(5, 3), lm=1.0))
    empty = {key: value[:0] if "weight" not in key else value for key, value in inputs.items()}
    empty["student_hidden"].requires_grad_(True)
    kd, lm = loss_fn.forward_from_hidden(**empty)
    assert kd.shape == lm.shape == (0, 3)


def _modelopt_config() -> SimpleNamespace:
    # ModelOpt's logits losses only read ``tensor_model_parallel_size`` from the config.
    return SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False)


@pytest.mark.parametrize("top_k", [None, TOP_K])
def test_forward_kl_equals_modelopt(top_k: int | None) -> None:
    """forward_kl equals ModelOpt's LogitsKLLoss, and with top_k its TopKLogitsKLLoss."""
    student, teacher = _logits(6)
    weights = _weights(7, student.shape[:-1])
    if top_k is None:
        modelopt_loss = LogitsKLLoss(_modelopt_config(), temperature=2.0)
    else:
        modelopt_loss = TopKLogitsKLLoss(_modelopt_config(), temperature=2.0, top_k=top_k)
    ours = _loss_and_grad(
        LogitsKDLoss("forward_kl", temperature=2.0, top_k=top_k), student, teacher, weights
    )
    theirs = _loss_and_grad(
        lambda s, t: modelopt_loss(s, t)[0].transpose(0, 1), student, teacher, weights
    )
    torch.testing.assert_close(ours[0], theirs[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours[1], theirs[1], rtol=RTOL, atol=ATOL)


def test_criterion_adapter_returns_modelopt_triple() -> None:
    """The adapter unpacks (logits, bias), detaches the teacher, returns (loss[b, s], F, F)."""
    student, teacher = _logits(8)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    criterion = KDLogitsCriterion(_modelopt_config(), LogitsKDLoss("reverse_kl"))
    loss, tp_reduce, sequence_parallel = criterion((student, None), (teacher, None))
    assert "Logits" in type(criterion).__name__
    assert (tp_reduce, sequence_parallel) == (False, False)
    expected = reference_logits_kd_loss(student, teacher, "reverse_kl").transpose(0, 1)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    loss.sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_empty_input_gives_empty_loss_and_gradient() -> None:
    """Zero tokens: an empty [s, b] loss, and backward gives an all-zero gradient of input shape."""
    for top_k in (None, 2):
        student = torch.zeros(0, 2, 10, requires_grad=True)
        loss = LogitsKDLoss(top_k=top_k)(student, torch.zeros(0, 2, 10))
        assert loss.shape == (0, 2) and loss.dtype == torch.float32
        loss.sum().backward()
        assert student.grad.shape == (0, 2, 10)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_non_finite_logit_only_poisons_its_token(loss_type: str) -> None:
    """A NaN logit makes that token's loss and gradient NaN; other tokens match the reference."""
    student, teacher = _logits(9)
    teacher[2, 1, 7] = float("nan")
    weights = torch.ones(student.shape[:-1])
    loss, grad = _loss_and_grad(LogitsKDLoss(loss_type, chunk_size=4), student, teacher, weights)
    assert loss[2, 1].isnan() and grad[2, 1].isnan().all()
    keep = torch.ones(student.shape[:-1], dtype=torch.bool)
    keep[2, 1] = False
    ref_loss, ref_grad = _loss_and_grad(
        lambda s, t: reference_logits_kd_loss(s, t, loss_type), student, teacher, weights
    )
    torch.testing.assert_close(loss[keep], ref_loss[keep], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad[keep], ref_grad[keep], rtol=RTOL, atol=ATOL)


def test_minus_inf_teacher_entry_has_zero_probability() -> None:
    """A -inf teacher logit is a zero-probability entry in forward KL, not a NaN."""
    student, teacher = _logits(10)
    teacher[:, :, 3] = float("-inf")
    weights = torch.ones(student.shape[:-1])
    loss, grad = _loss_and_grad(LogitsKDLoss("forward_kl"), student, teacher, weights)
    finite_teacher = teacher.clone()
    finite_teacher[:, :, 3] = -1e30
    ref_loss, ref_grad = _loss_and_grad(
        lambda s, t: reference_logits_kd_loss(s, t), student, finite_teacher, weights
    )
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "kl"}, r"loss_type='kl' is not one of forward_kl, reverse_kl, jsd"),
        ({"temperature": 0.0}, r"temperature=0.0 must be a number > 0"),
        ({"jsd_beta": 1.0}, r"jsd_beta=1.0 must be a number with 0 < jsd_beta < 1"),
        ({"top_k": 0}, r"top_k=0 must be a positive int or None"),
        ({"top_k": 2.5}, r"top_k=2.5 must be a positive int or None"),
        ({"chunk_size": -1}, r"chunk_size=-1 must be a positive int"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, message: str) -> None:
    """Each invalid constructor argument is named in the ValueError."""
    with pytest.raises(ValueError, match=message):
        LogitsKDLoss(**kwargs)


def test_all_problems_reported_at_once_and_forward_checks() -> None:
    """Several bad arguments give one error naming each; bad shapes and top_k > vocab raise."""
    with pytest.raises(ValueError, match=r"loss_type='x'.*temperature=-1"):
        LogitsKDLoss(loss_type="x", temperature=-1)
    with pytest.raises(ValueError, match=r"same shape"):
        LogitsKDLoss()(torch.zeros(2, 1, 4), torch.zeros(2, 1, 5))
    with pytest.raises(ValueError, match=r"top_k=5 is larger than the vocabulary \(4\)"):
        LogitsKDLoss(top_k=5)(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))


# ---------------------------------------------------------------- LM cross entropy (no grad)


def _megatron_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """megatron's vocab_parallel_cross_entropy, on a copy (it overwrites fp32 logits)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.clone(), target)


def _cross_entropy_inputs(seed: int, shape: tuple[int, ...] = (7, 3, 40)) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator) * 4.0
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    return logits, target


def test_cross_entropy_no_grad_equals_megatron_and_a_hand_computation(single_rank) -> None:
    """fp32 and bf16 values equal megatron's vocab_parallel_cross_entropy (TP=1, rtol 1e-6); a
    uniform row gives log(vocab); no autograd graph."""
    logits, target = _cross_entropy_inputs(30)
    logits.requires_grad_(True)
    loss = vocab_parallel_cross_entropy_no_grad(logits, target, chunk_size=4)
    assert loss.dtype == torch.float32 and loss.shape == target.shape and not loss.requires_grad
    torch.testing.assert_close(
        loss, _megatron_cross_entropy(logits.detach(), target), rtol=1e-6, atol=0
    )
    half = logits.detach().bfloat16()
    torch.testing.assert_close(
        vocab_parallel_cross_entropy_no_grad(half, target, chunk_size=5),
        _megatron_cross_entropy(half, target),
        rtol=1e-6,
        atol=0,
    )
    uniform = torch.zeros(2, 1, 8)
    hand = vocab_parallel_cross_entropy_no_grad(uniform, torch.tensor([[3], [7]]))
    torch.testing.assert_close(hand, torch.full((2, 1), math.log(8.0)), rtol=1e-6, atol=0)


def test_cross_entropy_no_grad_leaves_logits_alone_and_copies_one_chunk() -> None:
    """The logits are unchanged afterwards, and the largest buffer made is one fp32 chunk, not a
    copy of the logits (megatron's cross entropy on a clone makes one)."""
    logits, target = _cross_entropy_inputs(31, shape=(64, 2, 50))
    before = logits.clone()
    chunk_size = 8
    loss, largest = largest_new_allocation(
        lambda: vocab_parallel_cross_entropy_no_grad(logits, target, chunk_size=chunk_size)
    )
    assert torch.equal(logits, before)
    assert largest <= chunk_size * 50 * 4
    reference = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 50), target.reshape(-1), reduction="none"
    ).reshape(target.shape)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    _, clone_largest = largest_new_allocation(lambda: logits.clone())
    assert clone_largest == logits.numel() * 4 > chunk_size * 50 * 4  # what the bound rules out


def test_cross_entropy_no_grad_checks_shapes_and_empty_input() -> None:
    """A target that is not the logits' token shape is refused; no tokens give an empty loss."""
    with pytest.raises(ValueError, match=r"target must be the logits' shape"):
        vocab_parallel_cross_entropy_no_grad(torch.zeros(4, 2, 8), torch.zeros(2, 4).long())
    empty = vocab_parallel_cross_entropy_no_grad(torch.zeros(0, 2, 8), torch.zeros(0, 2).long())
    assert empty.shape == (0, 2)


def tp2_rank_checks() -> dict:
    """One TP=2 rank: each loss on this rank's vocab shard, next to the full-vocab reference."""
    from kd_module.parallel.runtime import initialize_distributed

    initialize_distributed(tensor_model_parallel_size=2)
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    student, teacher = _logits(11, shape=(5, 3, 40))
    weights = _weights(12, student.shape[:-1])
    shard = slice(rank * 20, (rank + 1) * 20)
    results = {}
    for loss_type in LOSS_TYPES:
        for top_k in (None, TOP_K, 30):
            kwargs = dict(loss_type=loss_type, temperature=1.3, jsd_beta=0.4, top_k=top_k)
            loss, grad = _loss_and_grad(
                LogitsKDLoss(chunk_size=4, **kwargs),
                student[..., shard],
                teacher[..., shard],
                weights,
            )
            ref_loss, ref_grad = _loss_and_grad(
                lambda s, t, kw=kwargs: reference_logits_kd_loss(s, t, **kw),
                student,
                teacher,
                weights,
            )
            results[(loss_type, top_k)] = (loss, grad, ref_loss, ref_grad[..., shard])
        for top_k in (None, TOP_K):
            kwargs = dict(loss_type=loss_type, temperature=1.3, jsd_beta=0.4, top_k=top_k)
            for backward in ("recomputed", "precomputed"):
                fused, reference = _fused_and_reference(
                    _projection_inputs(13), weights, shard=shard, backward=backward, **kwargs
                )
                results[(loss_type, "fused", top_k, backward)] = (*fused, *reference)
    # The logged LM loss: this rank's shard against megatron's TP=2 cross entropy on the shard.
    logits, target = _cross_entropy_inputs(14)
    logits_shard = logits[..., shard].contiguous()
    before = logits_shard.clone()
    ours = vocab_parallel_cross_entropy_no_grad(logits_shard, target, chunk_size=4)
    assert torch.equal(logits_shard, before)
    results[("cross_entropy", "megatron")] = (ours, _megatron_cross_entropy(logits_shard, target))
    return results


@pytest.mark.multirank
@pytest.mark.timeout(240)
def test_tensor_parallel_matches_single_rank_reference() -> None:
    """At TP=2 each loss (top-k, k above a shard, both projections fused with the LM loss, with
    and without top-k, gradients recomputed in backward or computed in forward) equals the TP=1
    reference, and the no-grad LM cross entropy equals megatron's TP=2
    vocab_parallel_cross_entropy."""
    ranks = run_distributed(tp2_rank_checks, 2, timeout=200)
    for rank_results in ranks:
        assert len(rank_results) == 22
        for key, values in rank_results.items():
            half = len(values) // 2
            atol = 1e-5 if key[1] == "fused" else ATOL  # fused: matmul summation order differs
            rtol = RTOL
            if key[0] == "cross_entropy":  # the same steps as megatron's: fp32-close
                rtol, atol = 1e-6, 0.0
            for ours, reference in zip(values[:half], values[half:], strict=True):
                torch.testing.assert_close(ours, reference, rtol=rtol, atol=atol, msg=str(key))
    for key in ranks[0]:
        assert torch.equal(ranks[0][key][0], ranks[1][key][0]), key
