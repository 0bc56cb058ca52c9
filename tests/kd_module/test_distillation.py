"""DistillationModel building and the KD loss: values, frozen teacher, layouts, validation."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kd_module.distillation.config import DistillConfig
from kd_module.models.gpt import GPTModelConfig, ParallelLayout
from tests.helpers import assemble_global, global_shards, run_distributed

SEQ, VOCAB, MICRO_BATCH, MICRO_BATCHES = 16, 128, 2, 2

STUDENT = GPTModelConfig(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    seq_length=SEQ,
    vocab_size=VOCAB,
    share_embeddings_and_output_weights=False,
)
TEACHER = STUDENT.replace(num_layers=4, hidden_size=48, ffn_hidden_size=96)
# Student layer 3 and teacher layer 3 sit on the last stage at PP=2.
LAYOUT_DISTILL = DistillConfig(
    intermediate_layer_pairs=[
        ["decoder.layers.3.input_layernorm", "decoder.layers.3.input_layernorm"],
        ["decoder.final_layernorm", "decoder.final_layernorm", "mse"],
    ],
    skip_lm_loss=False,
    kd_loss_scale=2.0,
    logit_kl_temperature=2.0,
)


def _batches(seed: int = 0, mask_last: int = 3):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
        loss_mask = torch.ones(MICRO_BATCH, SEQ)
        loss_mask[:, SEQ - mask_last :] = 0.0  # masked tokens must not count
        out.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": loss_mask,
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
            }
        )
    return out


def _init_projection(model, seed: int = 11) -> None:
    """Same projection weights at every layout (megatron's RNG use differs between layouts)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.startswith("_loss_modules"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _build(layout, distill=LAYOUT_DISTILL, student=STUDENT, teacher=TEACHER, params_dtype=None):
    from kd_module.distillation.model import build_distillation_model
    from tests.helpers import init_weights_by_global_key

    parts = build_distillation_model(
        student,
        teacher,
        distill,
        layout,
        params_dtype=params_dtype,
        student_init=lambda m: init_weights_by_global_key(m, seed=1),
        teacher_loader=lambda m: init_weights_by_global_key(m, seed=2),
        loss_chunk_size=5,
    )
    _init_projection(parts.model)
    return parts.model


def _layout_step(tp: int, pp: int, sequence_parallel: bool = False) -> dict:
    """One KD forward-backward at (tp, pp[, sp]): loss report and student gradients."""
    from megatron.core import parallel_state

    from kd_module.distillation.model import forward_backward
    from kd_module.parallel import runtime

    runtime.initialize_distributed(tp, pp, seed=5)
    model = _build(ParallelLayout(tp, pp, sequence_parallel=sequence_parallel))
    report = forward_backward(model, iter(_batches()), MICRO_BATCHES, SEQ, MICRO_BATCH)
    if sequence_parallel:
        # What megatron's finalize_model_grads does for sequence-parallel replicated params.
        for param in model.parameters():
            if param.grad is not None and getattr(param, "sequence_parallel", False):
                torch.distributed.all_reduce(
                    param.grad, group=parallel_state.get_tensor_model_parallel_group()
                )
    student_grads = {
        key: value
        for key, value in global_shards(model, "grad").items()
        if not key.startswith("_loss_modules")
    }
    return {"report": report or None, "grads": student_grads}


@pytest.fixture(scope="module")
def reference():
    from kd_module.parallel import runtime

    try:
        return _layout_step(1, 1)
    finally:
        runtime.destroy_distributed()


def _compare(results, reference):
    reports = [r["report"] for r in results if r["report"]]
    assert reports
    for report in reports:
        assert report.keys() == reference["report"].keys()
        for key, value in reference["report"].items():
            torch.testing.assert_close(report[key], value, rtol=1e-5, atol=1e-6, msg=key)
    grads = assemble_global([r["grads"] for r in results])
    expected = assemble_global([reference["grads"]])
    assert grads.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.multirank
@pytest.mark.parametrize(
    ("tp", "pp", "sp"),
    [(2, 1, False), (1, 2, False), (2, 1, True)],
    ids=["tp2", "pp2", "tp2-sequence-parallel"],
)
def test_kd_loss_and_grads_match_single_rank(reference, tp, pp, sp):
    """KD loss terms and student gradients at TP=2, PP=2 and TP=2+SP equal TP=PP=1 (rtol 1e-5)."""
    _compare(run_distributed(_layout_step, 2, tp, pp, sp, timeout=300), reference)


@pytest.mark.multirank
def test_kd_loss_and_grads_tp2_pp2_match_single_rank(reference):
    """KD loss terms and student gradients at TP=2 x PP=2 (4 ranks) equal TP=PP=1."""
    _compare(run_distributed(_layout_step, 4, 2, 2, timeout=360), reference)


# ---------------------------------------------------------------- single-rank behaviour


def _plain_outputs(model, batch):
    """Student and teacher logits and hooked layer outputs, computed without ModelOpt."""
    captured = {}

    def hook(name):
        def save(module, inputs, output):
            captured[name] = output

        return save

    student, teacher = model, model.teacher_model
    handles = [
        student.decoder.final_layernorm.register_forward_hook(hook("student_final")),
        teacher.decoder.final_layernorm.register_forward_hook(hook("teacher_final")),
    ]
    args = (batch["tokens"], batch["position_ids"], None)
    with torch.no_grad(), model.only_student_forward():
        student_logits = type(model).forward(model, *args)
    with torch.no_grad():
        teacher_logits = teacher(*args)
    for handle in handles:
        handle.remove()
    return student_logits, teacher_logits, captured


def _intermediate_criterion(model):
    return next(c for c in model._layers_to_loss.values() if "Logits" not in type(c).__name__)


def test_kd_terms_match_a_hand_computation(single_rank):
    """logits/intermediate/lm/kd terms equal a direct computation with the documented formula."""
    import torch.nn.functional as F

    from kd_module.distillation.losses import reference_logits_kd_loss
    from kd_module.distillation.model import forward_backward

    distill = DistillConfig(
        intermediate_layer_pairs=[["decoder.final_layernorm", "decoder.final_layernorm"]],
        skip_lm_loss=False,
        kd_loss_scale=2.5,
        logit_kl_temperature=1.5,
    )
    model = _build(ParallelLayout(), distill)
    batch = _batches()[0]
    report = forward_backward(model, iter([batch]), 1, SEQ, MICRO_BATCH, forward_only=True)
    mean = {key: (value[0] / value[1]).item() for key, value in report.items()}

    student_logits, teacher_logits, captured = _plain_outputs(model, batch)
    mask = batch["loss_mask"]
    n = mask.sum()
    per_token_kl = reference_logits_kd_loss(
        student_logits.transpose(0, 1), teacher_logits.transpose(0, 1), temperature=1.5
    ).transpose(0, 1)
    logits_loss = (per_token_kl * mask).sum() / n
    projected = _intermediate_criterion(model)._projection(captured["student_final"])
    cosine = 1 - F.cosine_similarity(projected, captured["teacher_final"], dim=-1)
    intermediate = (cosine.transpose(0, 1) * mask).sum() / n
    lm = F.cross_entropy(
        student_logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="none"
    )
    lm_loss = (lm.view(MICRO_BATCH, SEQ) * mask).sum() / n
    assert mean["logits_loss"] == pytest.approx(logits_loss.item(), rel=1e-5)
    assert mean["intermediate_loss"] == pytest.approx(intermediate.item(), rel=1e-5)
    assert mean["lm_loss"] == pytest.approx(lm_loss.item(), rel=1e-5)
    expected_kd = lm_loss + 2.5 * (logits_loss + intermediate)
    assert mean["kd_loss"] == pytest.approx(expected_kd.item(), rel=1e-5)
    assert report["kd_loss"][1].item() == n.item(), "masked tokens must not be counted"


def test_skip_lm_loss_makes_objective_pure_kd(single_rank):
    """skip_lm_loss (default): kd_loss = logits_loss + intermediate_loss; lm_loss still logged."""
    from kd_module.distillation.model import forward_backward

    model = _build(ParallelLayout(), DistillConfig())
    report = forward_backward(model, iter(_batches()), 2, SEQ, MICRO_BATCH, forward_only=True)
    mean = {key: (value[0] / value[1]).item() for key, value in report.items()}
    assert mean["intermediate_loss"] == 0.0
    assert mean["kd_loss"] == pytest.approx(mean["logits_loss"], rel=1e-6)
    assert mean["lm_loss"] > 4.0  # about log(128) for near-random weights


def _lm_loss_call(model, logits, labels):
    """The model's LM loss hook on ``logits``: (loss, largest new buffer in bytes)."""
    from tests.helpers import largest_new_allocation

    return largest_new_allocation(lambda: model.compute_language_model_loss(labels, logits))


def test_logged_lm_loss_reads_the_logits_in_chunks_without_a_copy(single_rank):
    """With the LM loss only logged (skip_lm_loss, training) and under no_grad (validation), the
    hook returns megatron's [b, s] cross entropy (rtol 1e-6), leaves the fp32 logits unchanged
    and never allocates more than one fp32 chunk of them (no full clone)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(SEQ, MICRO_BATCH, VOCAB, generator=generator) * 3.0
    labels = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
    expected = vocab_parallel_cross_entropy(logits.clone(), labels.t().contiguous()).t()
    logits.requires_grad_()  # the output layer's logits, as the hook receives them in training
    chunk_bytes = 5 * VOCAB * 4  # _build's loss_chunk_size, fp32
    logged = _build(ParallelLayout(), DistillConfig(skip_lm_loss=True))
    in_objective = _build(ParallelLayout(), DistillConfig(skip_lm_loss=False))
    logged.train()
    in_objective.eval()
    for case, model, grad in (
        ("training, only logged", logged, True),
        ("no_grad", in_objective, False),
    ):
        before = logits.detach().clone()
        with torch.set_grad_enabled(grad):
            loss, largest = _lm_loss_call(model, logits, labels)
        assert torch.equal(logits.detach(), before), case
        assert loss.shape == (MICRO_BATCH, SEQ) and not loss.requires_grad, case
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0, msg=case)
        assert largest <= chunk_bytes < logits.numel() * 4, (case, largest)


def test_lm_loss_in_the_objective_keeps_megatron_and_its_gradient(single_rank):
    """skip_lm_loss=False, training: the hook is megatron's cross entropy with its gradient, the
    fp32 logits the KD criterion reads stay unchanged."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(SEQ, MICRO_BATCH, VOCAB, generator=generator) * 3.0).requires_grad_()
    labels = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
    model = _build(ParallelLayout(), DistillConfig(skip_lm_loss=False))
    model.train()
    before = logits.detach().clone()
    loss = model.compute_language_model_loss(labels, logits)
    assert torch.equal(logits.detach(), before)
    reference_logits = before.clone().requires_grad_()
    reference = vocab_parallel_cross_entropy(reference_logits.clone(), labels.t().contiguous()).t()
    assert torch.equal(loss, reference)
    weights = torch.rand(MICRO_BATCH, SEQ, generator=generator)
    (loss * weights).sum().backward()
    (reference * weights).sum().backward()
    assert torch.equal(logits.grad, reference_logits.grad)


def test_projection_only_when_hidden_sizes_differ(single_rank):
    """Intermediate pairs get a Linear projection for different widths and Identity otherwise."""
    distill = DistillConfig(
        intermediate_layer_pairs=[["decoder.final_layernorm", "decoder.final_layernorm"]]
    )
    wide = _build(ParallelLayout(), distill)
    criterion = _intermediate_criterion(wide)
    assert isinstance(criterion._projection._fit, torch.nn.Linear)
    assert criterion._projection._fit.weight.shape == (48, 32)
    same = _build(ParallelLayout(), distill, teacher=STUDENT.replace(num_layers=3))
    assert isinstance(_intermediate_criterion(same)._projection._fit, torch.nn.Identity)


def test_teacher_is_frozen_and_bit_identical_after_training(single_rank):
    """Teacher: eval, no grads, not in the optimizer, bit-identical weights after 3 Adam steps."""
    from kd_module.distillation.model import forward_backward

    model = _build(ParallelLayout())
    teacher = model.teacher_model
    before = {k: v.clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert trainable and not any(id(p) in teacher_ids for p in trainable)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    losses = []
    for step in range(3):
        optimizer.zero_grad()
        report = forward_backward(model, iter(_batches(step)), 2, SEQ, MICRO_BATCH)
        optimizer.step()
        losses.append((report["kd_loss"][0] / report["kd_loss"][1]).item())
        assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, before[key]), key
    assert losses[-1] < losses[0]


def test_student_checkpoint_state_hides_teacher(single_rank):
    """The sharded state dict megatron checkpoints holds no teacher tensors."""
    model = _build(ParallelLayout())
    keys = list(model.sharded_state_dict().keys())
    assert keys and not any("teacher" in key for key in keys)
    assert any(key.startswith("decoder.layers.") for key in keys)


# ---------------------------------------------------------------- validation


def test_unknown_module_names_list_close_matches(single_rank):
    """A misspelled intermediate layer is refused with close matches."""
    distill = DistillConfig(
        intermediate_layer_pairs=[["decoder.final_layernorn", "decoder.final_layernorm"]]
    )
    with pytest.raises(
        ValueError,
        match=r"student has no submodule 'decoder\.final_layernorn'.*"
        r"did you mean 'decoder\.final_layernorm'",
    ):
        _build(ParallelLayout(), distill)


def test_logit_layer_missing_on_teacher(single_rank):
    """A logit layer name absent from the teacher is refused naming the teacher."""
    distill = DistillConfig(logit_layers=["output_layer", "output_layers"])
    with pytest.raises(ValueError, match=r"teacher has no submodule 'output_layers'"):
        _build(ParallelLayout(), distill)


def test_intermediate_layer_not_on_last_stage_is_refused(single_rank):
    """With PP=2 an intermediate layer on the first stage is refused before any criterion exists."""
    from kd_module.distillation.model import validate_modules

    distill = DistillConfig(
        intermediate_layer_pairs=[
            ["decoder.layers.0.input_layernorm", "decoder.layers.3.input_layernorm"]
        ]
    )
    model = _build(ParallelLayout(), DistillConfig())
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.input_layernorm"):
        validate_modules(
            distill, model, model.teacher_model, STUDENT, TEACHER, ParallelLayout(1, 2)
        )


def test_vocab_mismatch_names_both_sizes(single_rank):
    """Different teacher and student vocabularies are refused naming both sizes."""
    from kd_module.distillation.model import build_distillation_model

    with pytest.raises(
        ValueError, match=r"teacher vocab_size 256 differs from student vocab_size 128"
    ):
        build_distillation_model(STUDENT, TEACHER.replace(vocab_size=256))


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (
            ParallelLayout(tensor_model_parallel_size=3),
            r"num_attention_heads=4 is not divisible by "
            r"tensor_model_parallel_size=3",
        ),
        (
            ParallelLayout(pipeline_model_parallel_size=3),
            r"num_layers=4 is not divisible by "
            r"pipeline_model_parallel_size=3",
        ),
        (
            ParallelLayout(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
            r"interleaved pipeline parallelism\) is not supported",
        ),
    ],
    ids=["heads-tp", "layers-pp", "interleaved"],
)
def test_layout_problems_are_refused_before_building(layout, message):
    """Layouts the models cannot take are refused before any model is built."""
    from kd_module.distillation.model import build_distillation_model

    with pytest.raises(ValueError, match=message):
        build_distillation_model(STUDENT, TEACHER, layout=layout)


def test_mamba_without_kernels_fails_at_configuration():
    """model_type='mamba' on a machine without mamba-ssm/CUDA says what to install."""
    from kd_module.models.gpt import check_mamba_available, mamba_available

    if mamba_available():
        pytest.skip("mamba kernels present")
    with pytest.raises(ValueError, match=r"mamba-ssm and causal-conv1d"):
        check_mamba_available()


def test_transformer_engine_requested_without_it_is_refused():
    """transformer_impl='transformer_engine' without TE+CUDA is a configuration error."""
    from kd_module.models.gpt import uses_transformer_engine

    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    with pytest.raises(ValueError, match=r"needs Transformer Engine and CUDA"):
        uses_transformer_engine(STUDENT.replace(transformer_impl="transformer_engine"))
    assert uses_transformer_engine(STUDENT) is False  # auto falls back to the local spec


# Names valid under both layer specs: with Transformer Engine, input_layernorm and
# pre_mlp_layernorm are fused into linear_qkv / linear_fc1 (IdentityOp modules).
SPEC_NEUTRAL_DISTILL = DistillConfig(
    intermediate_layer_pairs=[
        ["decoder.layers.3", "decoder.layers.3"],
        ["decoder.final_layernorm", "decoder.final_layernorm", "mse"],
    ],
    skip_lm_loss=False,
    kd_loss_scale=2.0,
    logit_kl_temperature=2.0,
)


@contextlib.contextmanager
def _tf32_off():
    """fp32 matmuls and convolutions in full fp32 on CUDA (TF32 would differ from the CPU)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def _mean_report(model, device) -> dict[str, float]:
    """One KD forward-backward on ``_batches()`` on ``device``: each term's per-token mean."""
    from kd_module.distillation.model import forward_backward

    batches = [{k: v.to(device) for k, v in b.items()} for b in _batches()]
    report = forward_backward(model, iter(batches), MICRO_BATCHES, SEQ, MICRO_BATCH)
    return {key: (value[0] / value[1]).item() for key, value in report.items()}


@pytest.mark.gpu
def test_transformer_engine_spec_distills_on_gpu(single_rank):
    """With TE, transformer_impl='transformer_engine' builds TE layers whose KD terms (logits and
    two intermediate pairs) equal the local spec's on the same weights (fp32, TF32 off)."""
    pytest.importorskip("transformer_engine")
    means = {}
    with _tf32_off():
        for impl in ("transformer_engine", "local"):
            student = STUDENT.replace(transformer_impl=impl)
            teacher = TEACHER.replace(transformer_impl=impl)
            # Same weights on both specs: checkpoint keys are the TE spec's in both.
            model = _build(ParallelLayout(), SPEC_NEUTRAL_DISTILL, student=student, teacher=teacher)
            names = {type(m).__name__ for m in model.modules()}
            assert any(name.startswith("TE") for name in names) == (impl != "local"), names
            means[impl] = _mean_report(model, "cuda")
    assert means["local"]["intermediate_loss"] > 0
    assert means["transformer_engine"].keys() == means["local"].keys()
    for key, value in means["local"].items():
        assert means["transformer_engine"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.gpu
@pytest.mark.parametrize("logit_loss_impl", ["chunked", "fused"])
def test_kd_losses_on_gpu_match_cpu(logit_loss_impl):
    """The same weights and batches give the same kd/logits/intermediate/lm losses on CUDA and on
    the CPU in one process (local spec, fp32, TF32 off, rtol 1e-4), with the chunked logits loss
    and with the fused one (projections inside the loss, gradients computed in its forward)."""
    from kd_module.parallel import runtime

    student = STUDENT.replace(transformer_impl="local")
    teacher = TEACHER.replace(transformer_impl="local")
    distill = DistillConfig(
        intermediate_layer_pairs=[["decoder.layers.3", "decoder.layers.3"]],
        skip_lm_loss=False,
        kd_loss_scale=2.0,
        logit_kl_temperature=2.0,
        logit_loss_impl=logit_loss_impl,
    )
    means = {}
    with _tf32_off():
        for device in ("cpu", "cuda"):
            runtime.initialize_distributed(seed=5, device=device)
            try:
                assert runtime.uses_cuda() == (device == "cuda")
                model = _build(ParallelLayout(), distill, student=student, teacher=teacher)
                assert next(model.parameters()).device.type == device
                means[device] = _mean_report(model, device)
            finally:
                runtime.destroy_distributed()
    assert {"kd_loss", "logits_loss", "intermediate_loss", "lm_loss"} <= means["cpu"].keys()
    assert means["cpu"]["intermediate_loss"] > 0
    for key, value in means["cpu"].items():
        # abs: logits_loss is small (a KL of close distributions), its last bits are rounding.
        assert means["cuda"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.gpu
def test_mamba_hybrid_student_distills_on_gpu(single_rank):
    """A hybrid Mamba student distills from a GPT teacher on GPU (needs mamba-ssm)."""
    from kd_module.distillation.model import build_distillation_model, forward_backward
    from kd_module.models.gpt import mamba_available

    if not mamba_available():
        pytest.skip("mamba-ssm kernels not installed")
    student = STUDENT.replace(
        model_type="mamba",
        hybrid_override_pattern="M*M-",
        position_embedding_type="none",
        hidden_size=64,
        # 2 x 64 / head dim 64 = 2 SSM heads: megatron needs heads % groups == 0 (default 8).
        extra={"mamba_num_groups": 2},
    )
    parts = build_distillation_model(student, TEACHER, params_dtype=torch.bfloat16)
    batches = [{k: v.cuda() for k, v in b.items()} for b in _batches()]
    report = forward_backward(parts.model, iter(batches), 2, SEQ, MICRO_BATCH)
    assert torch.isfinite(report["kd_loss"]).all()


def _context_parallel_step(cp: int) -> dict:
    """One bf16 KD forward-backward with the TE spec at context-parallel size ``cp`` (GPU ranks).

    TE's context-parallel attention runs on its flash or fused backends only: bf16, and a head
    dim they support (64 here; the module's models have 8 and 12).
    """
    from megatron.core import parallel_state

    from kd_module.distillation.model import forward_backward
    from kd_module.parallel import runtime

    runtime.initialize_distributed(context_parallel_size=cp, seed=5, device="cuda")
    te = {"transformer_impl": "transformer_engine", "position_embedding_type": "rope"}
    student = STUDENT.replace(hidden_size=128, num_attention_heads=2, ffn_hidden_size=256, **te)
    teacher = TEACHER.replace(hidden_size=256, num_attention_heads=4, ffn_hidden_size=512, **te)
    model = _build(
        ParallelLayout(context_parallel_size=cp),
        SPEC_NEUTRAL_DISTILL,
        student=student,
        teacher=teacher,
        params_dtype=torch.bfloat16,
    )
    batches = []
    for batch in _batches():
        batch = {key: value.cuda() for key, value in batch.items()}  # LOCAL_RANK's GPU
        if cp > 1:
            from megatron.core.utils import get_batch_on_this_cp_rank

            batch = get_batch_on_this_cp_rank(batch)
        batches.append(batch)
    report = forward_backward(model, iter(batches), MICRO_BATCHES, SEQ, MICRO_BATCH)
    means = {}
    for key, value in report.items():
        value = value.clone()
        torch.distributed.all_reduce(value, group=parallel_state.get_context_parallel_group())
        means[key] = (value[0] / value[1]).cpu()
    return {"means": means}


@pytest.mark.gpu
@pytest.mark.multirank
def test_context_parallel_kd_loss_matches_cp1():
    """CP=2 (TE attention, 2 GPUs, bf16) gives the same KD loss terms as CP=1 (bf16 tolerance)."""
    pytest.importorskip("transformer_engine")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cp2 = run_distributed(_context_parallel_step, 2, 2, timeout=400)
    cp1 = run_distributed(_context_parallel_step, 1, 1, timeout=400)
    reference = cp1[0]["means"]
    for result in cp2:
        for key, value in reference.items():
            torch.testing.assert_close(result["means"][key], value, rtol=2e-2, atol=1e-3, msg=key)
