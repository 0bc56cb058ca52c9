"""A tiny megatron-core GPT on CPU: it trains, and TP/PP layouts agree with TP=PP=1 numerically."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assemble_global, global_shards, run_distributed

SEQ, VOCAB, MICRO_BATCH, MICRO_BATCHES = 16, 128, 2, 2


def _config():
    from kd_module.models.gpt import GPTModelConfig

    # Untied embeddings: with PP>1 the tied copy's gradient is only summed by megatron's DDP
    # finalize step, which the Lightning strategy tests cover.
    return GPTModelConfig(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        seq_length=SEQ,
        vocab_size=VOCAB,
        share_embeddings_and_output_weights=False,
    )


def _batches():
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
        out.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
            }
        )
    return out


def _one_step(tp: int, pp: int) -> dict:
    """Forward-backward of fixed weights and batches at layout (tp, pp): loss and grads."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_module.models.gpt import ParallelLayout, build_model
    from kd_module.parallel import runtime
    from tests.helpers import init_weights_by_global_key

    runtime.initialize_distributed(tp, pp, seed=5)
    model = build_model(_config(), ParallelLayout(tp, pp))
    init_weights_by_global_key(model, seed=3)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(_batches()),
        model=[model],
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    loss = None
    if parallel_state.is_pipeline_last_stage():
        loss = sum(item["loss"] for item in losses) / len(losses)
    return {"loss": loss, "grads": global_shards(model, "grad")}


def _reference():
    from kd_module.parallel import runtime

    try:
        return _one_step(1, 1)
    finally:
        runtime.destroy_distributed()


@pytest.fixture(scope="module")
def reference():
    return _reference()


def _check_against_reference(results, reference, nranks):
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        torch.testing.assert_close(loss, reference["loss"], rtol=1e-5, atol=0)
    grads = assemble_global([r["grads"] for r in results])
    expected = assemble_global([reference["grads"]])
    assert grads.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_tiny_gpt_trains_on_cpu(single_rank):
    """Five Adam steps of a local-spec GPTModel on CPU lower the loss on a fixed batch."""
    from kd_module.models.gpt import build_model

    model = build_model(_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = _batches()[0]
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.multirank
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_rank_layouts_match_single_rank(reference, tp, pp):
    """TP=2 and PP=2 (megatron pipeline schedule) match TP=PP=1 loss and grads (rtol 1e-5)."""
    results = run_distributed(_one_step, 2, tp, pp, timeout=240)
    _check_against_reference(results, reference, 2)


@pytest.mark.multirank
def test_tp2_pp2_on_four_ranks_matches_single_rank(reference):
    """TP=2 x PP=2 on four ranks gives TP=PP=1's loss and gradients."""
    results = run_distributed(_one_step, 4, 2, 2, timeout=300)
    _check_against_reference(results, reference, 4)
