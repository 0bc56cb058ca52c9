"""GPU-path defects reproduced on the CPU: process groups, devices, dtypes, refusals.

Each test pins a defect a review of the CUDA paths found (issue 15) that can be shown without a
GPU: the CUDA path's process groups and Lightning's device contexts can be built here, and a
machine "with CUDA" is simulated in a subprocess by making ``torch.cuda.is_available()`` report
True (a CPU run must then never touch CUDA, which this torch build does not have: any call that
does fails loudly). The GPU itself is the only thing simulated.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from kd_module.models.gpt import GPTModelConfig, ParallelLayout

SEQ = 32
STUDENT = GPTModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=320
)
TEACHER = STUDENT.replace(num_layers=4, hidden_size=64, ffn_hidden_size=128)


# ---------------------------------------------------------------------- 1. optimizer on CUDA
def test_optimizer_builds_when_gloo_groups_are_absent_as_on_cuda(single_rank, monkeypatch):
    """A CUDA run creates no megatron gloo groups; the optimizer must not ask for them (before
    the fix: AssertionError 'Intra partial data parallel group is not initialized')."""
    from megatron.core import parallel_state

    from kd_module.models.gpt import build_model
    from kd_module.parallel import runtime
    from kd_module.training.optim import OptimizerConfig, build_megatron_optimizer
    from kd_module.training.strategy import MegatronStrategy

    # Rebuild megatron's groups the way initialize_distributed does for device="cuda".
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
    monkeypatch.setattr(runtime, "_gloo_process_groups", False, raising=False)
    runtime.seed_everything(3)
    with pytest.raises(AssertionError, match="not initialized"):
        parallel_state.get_data_parallel_group_gloo()
    model = MegatronStrategy().wrap_model(build_model(STUDENT))
    optimizer = build_megatron_optimizer(OptimizerConfig(lr=1e-2), model)
    before = [p.detach().clone() for p in model.parameters()]
    for param in model.parameters():
        param.main_grad.fill_(0.5)
    update_successful, grad_norm, _ = optimizer.step()
    assert update_successful and grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_cpu_runs_create_gloo_groups_and_say_so(single_rank):
    """The runtime records whether it created megatron's gloo groups (CPU runs do)."""
    from megatron.core import parallel_state

    from kd_module.parallel import runtime

    assert runtime.gloo_process_groups() is True
    assert parallel_state.get_data_parallel_group_gloo() is not None
    assert runtime.run_device() == torch.device("cpu") and not runtime.uses_cuda()


# ---------------------------------------------------------------------- 3. devices
_CPU_RUN_ON_A_GPU_MACHINE = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import torch
    # A machine with one GPU, as far as every torch.cuda.is_available() caller can tell.
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    import lightning as L
    from kd_module.parallel import runtime
    from kd_module.offline.job import build_teacher_cache
    from kd_module.data import GPTDataModule
    from kd_module.models.gpt import GPTModelConfig
    from kd_module.training.module import DistillationModule
    from kd_module.training.strategy import MegatronStrategy
    from tests.helpers import init_weights_by_global_key

    student = GPTModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                             seq_length=32, vocab_size=320)
    teacher = student.replace(num_layers=2, hidden_size=64)
    data = lambda: GPTDataModule(mock=True, seq_length=32, micro_batch_size=2,
                                 global_batch_size=4, num_train_samples=12)
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            from megatron.core.pipeline_parallel import schedules
            seen["backend"] = torch.distributed.get_backend()
            seen["bridged"] = schedules.torch is not torch
            seen["uses_cuda"] = runtime.uses_cuda()
            seen["devices"] = sorted({str(p.device) for p in module.parameters()})
            seen["root_device"] = str(trainer.strategy.root_device)
            seen["kd_loss"] = float(trainer.callback_metrics["kd_loss"])

    module = DistillationModule(
        student, teacher,
        student_init_fn=lambda m: init_weights_by_global_key(m, seed=1),
        teacher_init_fn=lambda m: init_weights_by_global_key(m, seed=2),
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(), max_steps=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Probe()])
    trainer.fit(module, datamodule=data())

    out = tempfile.mkdtemp()
    build_teacher_cache(data(), out, teacher=teacher, k=4, num_samples=8, accelerator="cpu",
                        precision="fp32", teacher_init_fn=lambda m: init_weights_by_global_key(m))
    seen["cache_complete"] = json.load(open(os.path.join(out, "manifest.json")))["complete"]

    try:
        L.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(precision="bf16"),
                  max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False).fit(
            DistillationModule(student, teacher, teacher_init_fn=lambda m: None),
            datamodule=data())
        seen["bf16_on_cpu"] = "accepted"
    except ValueError as error:
        seen["bf16_on_cpu"] = str(error)
    print("RESULT " + json.dumps(seen))
    """
)


def test_cpu_accelerator_runs_on_cpu_on_a_machine_with_cuda():
    """accelerator='cpu' on a machine with CUDA: gloo, the CPU bridges, parameters on the CPU,
    a teacher cache with accelerator='cpu', and bf16 refused for the CPU accelerator (before the
    fix the strategy's root device was CUDA whenever CUDA existed)."""
    result = subprocess.run(
        [sys.executable, "-c", _CPU_RUN_ON_A_GPU_MACHINE],
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout[-3000:], result.stderr[-5000:])
    import json

    seen = json.loads(lines[-1].removeprefix("RESULT "))
    assert seen["backend"] == "gloo"
    assert seen["bridged"] is True
    assert seen["uses_cuda"] is False
    assert seen["devices"] == ["cpu"]
    assert seen["root_device"] == "cpu"
    assert 0 < seen["kd_loss"] < 20
    assert seen["cache_complete"] is True
    assert "precision='bf16' needs accelerator='gpu'" in seen["bf16_on_cpu"]


def test_device_argument_is_checked():
    """initialize_distributed's device: CUDA refused where there is none, unknown types named."""
    from kd_module.parallel import runtime

    with pytest.raises(ValueError, match=r"device='tpu' is not a device|'tpu' is not supported"):
        runtime.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available"):
            runtime.resolve_device("cuda")
    assert runtime.resolve_device("cpu") == torch.device("cpu")


def test_bridges_come_off_for_a_cuda_run_and_back_on_for_a_cpu_run(single_rank):
    """remove_cpu_bridges restores megatron as shipped (module globals, code objects, the RNG
    tracker); install_cpu_bridges puts them back: a CUDA run after a CPU one sees plain megatron."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    from kd_module.parallel import runtime

    assert runtime.bridges_installed() and schedules.torch is not torch
    clip_code = clip_grads.clip_grad_by_total_norm_fp32.__code__
    try:
        assert runtime.remove_cpu_bridges() is True
        assert schedules.torch is torch
        assert "torch.cuda.FloatTensor" in repr(
            clip_grads.clip_grad_by_total_norm_fp32.__code__.co_consts
        )
        assert "cuda" in LanguageModule.setup_embeddings_and_output_layer.__code__.co_names
        assert not isinstance(mp_random._CUDA_RNG_STATE_TRACKER, runtime.CpuRNGStatesTracker)
        assert runtime.remove_cpu_bridges() is False
    finally:
        assert runtime.install_cpu_bridges() is True
    assert schedules.torch is not torch
    assert "torch.FloatTensor" in repr(clip_grads.clip_grad_by_total_norm_fp32.__code__.co_consts)
    assert clip_grads.clip_grad_by_total_norm_fp32.__code__ is not clip_code
    runtime.seed_everything(1234)  # the fixture's teardown resets the (new) CPU tracker


# ---------------------------------------------------------------------- 4. after the model
def test_projection_layer_takes_the_students_dtype(single_rank):
    """ModelOpt's projection (student width 32 -> teacher 64) is made after the student; with
    bf16 parameters it was left in fp32 and the first intermediate loss failed on the dtype
    (outside Lightning, where no Float16Module casts the whole model afterwards)."""
    from kd_module.distillation.config import DistillConfig
    from kd_module.distillation.model import build_distillation_model

    distill = DistillConfig(
        intermediate_layer_pairs=[["decoder.final_layernorm", "decoder.final_layernorm"]]
    )
    parts = build_distillation_model(
        STUDENT, TEACHER, distill, params_dtype=torch.bfloat16, vocab_size=256
    )
    projections = [m for m in parts.model.modules() if type(m).__name__ == "ProjectionLayer"]
    assert len(projections) == 1
    weight = projections[0]._fit.weight
    assert weight.dtype == torch.bfloat16
    assert weight.device == next(parts.model.parameters()).device
    student_hidden = torch.randn(SEQ, 2, 32, dtype=torch.bfloat16)
    assert projections[0](student_hidden).shape == (SEQ, 2, 64)


def test_bf16_models_are_bf16_throughout_without_float16module(single_rank):
    """megatron builds the learned position embedding in fp32 whatever params_dtype says and
    relies on Float16Module to cast it; models used without that wrapper (the bf16 teacher cache)
    fed fp32 activations into bf16 layers and failed at the first norm. A bf16 KD step with an
    intermediate pair now runs on the CPU, every floating tensor in bf16."""
    from kd_module.distillation.config import DistillConfig
    from kd_module.distillation.model import build_distillation_model, forward_backward
    from kd_module.models.gpt import build_model

    model = build_model(STUDENT, params_dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes
    distill = DistillConfig(
        intermediate_layer_pairs=[["decoder.layers.1", "decoder.layers.3"]], skip_lm_loss=False
    )
    parts = build_distillation_model(
        STUDENT, TEACHER, distill, params_dtype=torch.bfloat16, vocab_size=256
    )
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, SEQ + 1), generator=generator)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(2, SEQ),
        "position_ids": torch.arange(SEQ).expand(2, SEQ),
    }
    report = forward_backward(parts.model, iter([batch]), 1, SEQ, 2)
    means = {key: float(value[0] / value[1]) for key, value in report.items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in means.values()), means
    assert means["intermediate_loss"] > 0 and means["lm_loss"] > 0


def test_projection_init_does_not_depend_on_the_default_device(single_rank):
    """The projection is initialized on the CPU even under a default-device context (Lightning
    builds models under torch.device('cuda')), so every device starts from the same weights."""
    from kd_module.distillation.model import _projection_layer
    from kd_module.models.gpt import build_model

    student = build_model(STUDENT)
    teacher = build_model(TEACHER)
    torch.manual_seed(11)
    plain = _projection_layer(student, teacher)._fit.weight.detach().clone()
    torch.manual_seed(11)
    with torch.device("meta"):
        in_context = _projection_layer(student, teacher)._fit.weight
    assert in_context.device.type == "cpu"
    torch.testing.assert_close(in_context, plain, rtol=0, atol=0)


def test_cpu_generators_work_under_a_default_device_context(single_rank):
    """init_weights_by_global_key and the cache's token fingerprint draw from CPU generators;
    under a default-device context (Lightning's torch.device('cuda'); 'meta' here) they must
    still draw on the CPU and give the same numbers."""
    from kd_module.models.gpt import build_model
    from kd_module.offline import format as offline
    from tests.helpers import init_weights_by_global_key

    tokens = torch.randint(0, 256, (2, 48))
    offline._FINGERPRINT_WEIGHTS.pop(48, None)
    with torch.device("meta"):
        inside = offline.token_fingerprint(tokens)
    assert offline._FINGERPRINT_WEIGHTS[48].device.type == "cpu"
    offline._FINGERPRINT_WEIGHTS.pop(48, None)
    torch.testing.assert_close(inside, offline.token_fingerprint(tokens), rtol=0, atol=0)

    model = build_model(STUDENT)
    init_weights_by_global_key(model, seed=4)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.device("meta"):
        init_weights_by_global_key(model, seed=4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=0, msg=name)


def test_teardown_leaves_the_model_where_it_is():
    """Lightning's default teardown moves the LightningModule to the CPU (splitting a GPU model
    from megatron's grad buffers and main params); MegatronStrategy's does not move it."""
    import lightning as L

    from kd_module.data import GPTDataModule
    from kd_module.training.module import DistillationModule
    from kd_module.training.strategy import MegatronStrategy

    module = DistillationModule(STUDENT, TEACHER, teacher_init_fn=lambda m: None)
    moved = []
    module.cpu = lambda: moved.append("cpu")  # what Lightning's Strategy.teardown calls
    data = GPTDataModule(
        mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=2, num_train_samples=2
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    assert moved == []
    from kd_module.parallel import runtime

    assert not runtime.is_initialized()  # megatron's state is still released


# ---------------------------------------------------------------------- 2. identity modules
def test_distilling_an_identity_module_is_refused(single_rank):
    """Under the TE spec input_layernorm is an IdentityOp (the norm is fused into linear_qkv):
    a pair naming it would distill the raw residual stream. Any name resolving to an identity is
    refused, naming a module that computes something instead."""
    from kd_module.distillation.config import DistillConfig
    from kd_module.distillation.model import build_distillation_model

    # The local spec's q_layernorm is an IdentityOp without qk_layernorm.
    distill = DistillConfig(
        intermediate_layer_pairs=[
            ["decoder.layers.1.self_attention.q_layernorm", "decoder.layers.3.input_layernorm"]
        ]
    )
    with pytest.raises(
        ValueError,
        match=r"student submodule 'decoder\.layers\.1\.self_attention"
        r"\.q_layernorm' is an identity \(IdentityOp\).*'decoder\.layers\.1' or "
        r"'decoder\.final_layernorm'",
    ):
        build_distillation_model(STUDENT, TEACHER, distill, vocab_size=256)


def test_te_shaped_layer_with_identity_input_layernorm_is_refused(single_rank):
    """A layer shaped like megatron's TE spec (input_layernorm = IdentityOp, the norm fused
    elsewhere) built on the CPU: naming its input_layernorm is refused, its layer output is not."""
    from megatron.core.transformer.identity_op import IdentityOp

    from kd_module.distillation.config import check_module_names
    from kd_module.models.gpt import build_model

    model = build_model(STUDENT)
    layer = model.decoder.layers[0]
    layer.input_layernorm = IdentityOp()
    problems = check_module_names(
        model, ["decoder.layers.0.input_layernorm", "decoder.layers.0"], "teacher"
    )
    assert len(problems) == 1
    assert problems[0].startswith(
        "teacher submodule 'decoder.layers.0.input_layernorm' is an identity (IdentityOp)"
    )
    assert "fuses the input / pre-MLP layernorm into linear_qkv / linear_fc1" in problems[0]


# ---------------------------------------------------------------------- 5. refusals
def test_context_parallel_without_te_attention_is_refused_before_building(single_rank):
    """CP > 1 needs TE attention (megatron's local attention asserts CP == 1 when built)."""
    from kd_module.distillation.model import build_distillation_model

    with pytest.raises(
        ValueError,
        match=r"student: context_parallel_size=2 needs Transformer "
        r"Engine attention.*teacher: context_parallel_size=2",
    ):
        build_distillation_model(
            STUDENT, TEACHER, layout=ParallelLayout(context_parallel_size=2), vocab_size=256
        )


def test_reset_attention_mask_under_te_is_refused(monkeypatch):
    """TE's causal attention ignores a per-document mask: refused when the model resolves to TE
    (TE's presence is the one thing simulated; the decision is ours)."""
    from kd_module.models import gpt as models

    monkeypatch.setattr(models, "transformer_engine_installed", lambda: True)
    problems = models.implementation_problems(
        STUDENT, reset_attention_mask=True, cuda=True, who="student"
    )
    assert len(problems) == 1 and problems[0].startswith(
        "student: reset_attention_mask=True under Transformer Engine"
    )
    assert models.implementation_problems(STUDENT, reset_attention_mask=True, cuda=False) == []
    local = STUDENT.replace(transformer_impl="local")
    assert models.implementation_problems(local, reset_attention_mask=True, cuda=True) == []
    assert models.implementation_problems(STUDENT, context_parallel_size=2, cuda=True) == []


def test_mamba_shapes_megatron_would_assert_on_are_refused():
    """Mamba heads (2 x hidden / head dim) not divisible by mamba_num_groups (8 by default):
    megatron asserts when it builds the layer; the config says so up front."""
    with pytest.raises(
        ValueError,
        match=r"mamba: 2 SSM heads .* not divisible by "
        r"mamba_num_groups=8",
    ):
        STUDENT.replace(model_type="mamba", hidden_size=64)
    config = STUDENT.replace(model_type="mamba", hidden_size=64, extra={"mamba_num_groups": 2})
    assert config.mamba_heads_and_groups() == (2, 2)
    assert "mamba heads=2 and mamba_num_groups=2 must both be divisible by " in " ".join(
        config.layout_problems(tensor_model_parallel_size=4)
    )
    with pytest.raises(ValueError, match=r"2 x hidden_size=96 is not divisible by mamba_head_dim"):
        STUDENT.replace(model_type="mamba", hidden_size=48)


def test_mamba_needs_cuda_te_and_kernels():
    """The Mamba refusal names everything missing, including TE (megatron's Mamba spec is TE)."""
    from kd_module.models.gpt import implementation_problems, mamba_problems

    problems = mamba_problems(cuda=False)
    assert len(problems) == 1 and "missing: a CUDA run" in problems[0]
    config = STUDENT.replace(model_type="mamba", hidden_size=64, extra={"mamba_num_groups": 2})
    assert implementation_problems(config, cuda=False, who="student")[0].startswith(
        "student: model_type='mamba' needs CUDA, Transformer Engine"
    )


def test_distill_refuses_context_parallel_without_te_up_front(tmp_path):
    """distill() names the CP problem with the other input problems, before building."""
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.training.strategy import MegatronStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=MegatronStrategy(context_parallel_size=2),
        max_steps=1,
        logger=False,
    )
    data = GPTDataModule(mock=True, seq_length=SEQ, micro_batch_size=1, global_batch_size=1)
    with pytest.raises(
        ValueError,
        match=r"^distill: .*student: context_parallel_size=2 needs "
        r"Transformer Engine",
    ):
        distill(STUDENT, data, trainer, teacher=TEACHER, log_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())
