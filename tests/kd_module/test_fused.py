"""The fused logits loss in the model (``logit_loss_impl: fused``) against the unfused path.

Both output projections run inside the chunked loss and the LM cross entropy comes from the same
pass, which also computes the student's projection gradients (backward only scales them); every
reported term and every student gradient must equal the ``chunked`` path's (logits,
then the chunked loss) at TP=1, TP=2, TP=2 with sequence parallelism and PP=2, for each
divergence, with top-k, with and without ``skip_lm_loss``, and with tied embeddings.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kd_module.distillation.config import DistillConfig
from kd_module.models.gpt import ParallelLayout
from tests.helpers import assemble_global, global_shards, run_distributed
from tests.kd_module.test_distillation import (
    LAYOUT_DISTILL,
    MICRO_BATCH,
    MICRO_BATCHES,
    SEQ,
    STUDENT,
    _batches,
    _build,
)

RTOL, ATOL = 1e-5, 1e-6
LOSS_VARIANTS = [
    {"logit_loss": "forward_kl"},
    {"logit_loss": "reverse_kl"},
    {"logit_loss": "jsd", "jsd_beta": 0.3},
    {"logit_loss": "forward_kl", "logit_kl_topk": 5},
]
"""Each divergence on the full vocabulary, and forward KL on the teacher's top-5."""
VARIANTS = [{**loss, "skip_lm_loss": skip} for loss in LOSS_VARIANTS for skip in (True, False)]


def _step(layout: ParallelLayout, distill: DistillConfig, student=STUDENT) -> dict:
    """One KD forward-backward: the report, the student's gradients, what the output layers
    returned (``"logits"`` or ``"OutputLayerInput"``), and how the fused backwards went."""
    from megatron.core import parallel_state

    from kd_module.distillation.model import forward_backward

    model = _build(layout, distill=distill, student=student)
    returned = set()
    for module in (model, model.teacher_model):
        if hasattr(module, "output_layer"):
            module.output_layer.register_forward_hook(
                lambda _m, _i, out: returned.add(
                    "logits" if isinstance(out[0], torch.Tensor) else type(out[0]).__name__
                )
            )
    report = forward_backward(model, iter(_batches()), MICRO_BATCHES, SEQ, MICRO_BATCH)
    if layout.sequence_parallel:
        # What megatron's finalize_model_grads does for sequence-parallel replicated params.
        for param in model.parameters():
            if param.grad is not None and getattr(param, "sequence_parallel", False):
                torch.distributed.all_reduce(
                    param.grad, group=parallel_state.get_tensor_model_parallel_group()
                )
    grads = {
        key: value
        for key, value in global_shards(model, "grad").items()
        if not key.startswith("_loss_modules")
    }
    fusion = getattr(model, "_fusion", None)
    backwards = dict(fusion.loss.fused_backwards) if fusion is not None else {}
    return {"report": report or None, "grads": grads, "returned": returned, "backwards": backwards}


def _fused_and_chunked(layout: ParallelLayout, variants: list[dict], student=STUDENT) -> list:
    """For each variant, the fused step's and the chunked step's results, on this rank."""
    out = []
    for variant in variants:
        pair = []
        for impl in ("fused", "chunked"):
            distill = dataclasses.replace(LAYOUT_DISTILL, logit_loss_impl=impl, **variant)
            pair.append(_step(layout, distill, student))
        out.append(pair)
    return out


def _assert_equal(per_rank_fused: list[dict], per_rank_chunked: list[dict], label: str) -> None:
    """Reports (last stage) and assembled global gradients equal, rtol 1e-5."""
    for fused, chunked in zip(per_rank_fused, per_rank_chunked, strict=True):
        if chunked["report"] is None:
            assert fused["report"] is None
            continue
        assert fused["returned"] == {"OutputLayerInput"}, label  # no logits were made
        assert chunked["returned"] == {"logits"}, label
        # Each micro-batch's projection gradients came from the forward: no recomputation.
        assert fused["backwards"] == {"precomputed": MICRO_BATCHES}, label
        assert fused["report"].keys() == chunked["report"].keys()
        for key, value in chunked["report"].items():
            torch.testing.assert_close(
                fused["report"][key], value, rtol=RTOL, atol=ATOL, msg=f"{label} {key}"
            )
    grads = assemble_global([r["grads"] for r in per_rank_fused])
    expected = assemble_global([r["grads"] for r in per_rank_chunked])
    assert grads.keys() == expected.keys() and expected, label
    for key in expected:
        torch.testing.assert_close(
            grads[key], expected[key], rtol=RTOL, atol=ATOL, msg=f"{label} {key}"
        )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_fused_equals_chunked_single_rank(single_rank, tied) -> None:
    """At TP=1 the fused path's terms and gradients equal the chunked path's for every
    divergence, top-k, with and without skip_lm_loss (tied: the embedding gets the grad)."""
    student = STUDENT.replace(share_embeddings_and_output_weights=tied)
    variants = VARIANTS if not tied else [VARIANTS[1], VARIANTS[6]]
    for variant, (fused, chunked) in zip(
        variants, _fused_and_chunked(ParallelLayout(), variants, student), strict=True
    ):
        _assert_equal([fused], [chunked], str(variant))


LAYOUTS = [(2, 1, False), (2, 1, True), (1, 2, False)]
"""(TP, PP, sequence_parallel) of the two-rank comparison."""


def layouts_rank(layouts: list[tuple], variants: list[dict]) -> dict:
    """One of two ranks: every layout in turn, fused and chunked for every variant."""
    from kd_module.parallel import runtime

    results = {}
    for tp, pp, sp in layouts:
        runtime.initialize_distributed(tp, pp, seed=5)
        layout = ParallelLayout(tp, pp, sequence_parallel=sp)
        results[(tp, pp, sp)] = _fused_and_chunked(layout, variants)
    return results


@pytest.mark.multirank
@pytest.mark.timeout(420)
def test_fused_equals_chunked_tp2_sp_pp2() -> None:
    """At TP=2, TP=2 with sequence parallelism and PP=2 (two ranks) the fused path's terms and
    gradients equal the chunked path's, for every divergence, top-k, with and without
    skip_lm_loss."""
    ranks = run_distributed(layouts_rank, 2, LAYOUTS, VARIANTS, timeout=400)
    for layout in LAYOUTS:
        for index, variant in enumerate(VARIANTS):
            fused = [rank[layout][index][0] for rank in ranks]
            chunked = [rank[layout][index][1] for rank in ranks]
            _assert_equal(fused, chunked, f"{layout} {variant}")


def test_modelopt_impl_equals_chunked_for_forward_kl(single_rank) -> None:
    """logit_loss_impl: modelopt (ModelOpt's LogitsKLLoss on the logits) reports the same terms
    as the chunked loss, forward KL."""
    variant = {"logit_loss": "forward_kl", "skip_lm_loss": False}
    reports = []
    for impl in ("modelopt", "chunked"):
        distill = dataclasses.replace(LAYOUT_DISTILL, logit_loss_impl=impl, **variant)
        result = _step(ParallelLayout(), distill)
        assert result["returned"] == {"logits"}
        reports.append(result["report"])
    for key, value in reports[1].items():
        torch.testing.assert_close(reports[0][key], value, rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"logit_loss_impl": "fusd"},
            r"logit_loss_impl='fusd' is not one of auto, fused, chunked, modelopt "
            r"\(did you mean 'fused'\?\)",
        ),
        (
            {"logit_loss_impl": "modelopt", "logit_loss": "jsd"},
            r"logit_loss_impl='modelopt' computes forward_kl only, not logit_loss='jsd'",
        ),
        (
            {"logit_loss_impl": "fused", "logit_layers": ["decoder.final_layernorm"] * 2},
            r"logit_loss_impl='fused' needs logit_layers=\['output_layer', 'output_layer'\]",
        ),
    ],
)
def test_bad_logit_loss_impl_is_refused(fields, message) -> None:
    """A bad logit_loss_impl, or one the other keys rule out, is one clear config error."""
    with pytest.raises(ValueError, match=message):
        DistillConfig.from_dict(fields)


def test_auto_resolution_and_padding_refusal() -> None:
    """auto is fused for the output layers with equal paddings from a 32768-entry vocabulary,
    chunked otherwise; fused and modelopt are refused for differently padded vocabularies."""
    from kd_module.distillation.model import resolve_logit_loss_impl

    assert resolve_logit_loss_impl(DistillConfig(), None, 131072) == "fused"
    assert resolve_logit_loss_impl(DistillConfig(), None, 32768) == "fused"
    assert resolve_logit_loss_impl(DistillConfig(), None, 32640) == "chunked"
    assert resolve_logit_loss_impl(DistillConfig(), 151665, 152064) == "chunked"
    other_layers = DistillConfig(logit_layers=["decoder.final_layernorm"] * 2)
    assert resolve_logit_loss_impl(other_layers, None, 131072) == "chunked"
    assert resolve_logit_loss_impl(DistillConfig(logit_loss_impl="fused"), None, 128) == "fused"
    for impl in ("fused", "modelopt"):
        with pytest.raises(ValueError, match=rf"logit_loss_impl='{impl}' needs .* padded alike"):
            resolve_logit_loss_impl(DistillConfig(logit_loss_impl=impl), 151665)
