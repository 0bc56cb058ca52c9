"""Training guards on real CPU fits: NaN/Inf losses skipped or stopping, teacher integrity."""

from __future__ import annotations

import math

import pytest
import torch

from kd_module.models.gpt import GPTModelConfig

SEQ = 32
STUDENT = GPTModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=512
)
TEACHER = STUDENT.replace(num_layers=3, hidden_size=48)


def _callback(**hooks):
    """A Lightning callback made of the given hook functions."""
    import lightning as L

    return type("Hooks", (L.Callback,), hooks)()


def _fit(callbacks=(), max_steps=5, teacher_seed=2, **module_kwargs):
    """A tiny single-process distillation fit; returns the module."""
    import lightning as L

    from kd_module.data import GPTDataModule
    from kd_module.training.module import DistillationModule
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy
    from tests.helpers import init_weights_by_global_key

    module = DistillationModule(
        STUDENT,
        TEACHER,
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
        student_init_fn=lambda m: init_weights_by_global_key(m, seed=1),
        teacher_init_fn=lambda m: init_weights_by_global_key(m, seed=teacher_seed, std=0.3),
        **module_kwargs,
    )
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=4,
        num_train_samples=max_steps * 4,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=data)
    return module


@pytest.fixture
def poison(monkeypatch):
    """``poison(step, term, value)``: the KD loss balancer returns ``value`` for ``term`` at
    that step (global, 1-based); returns the callback that tells it the current step."""
    from kd_module.distillation.model import KDLossBalancer

    state = {"step": 0, "at": None, "term": None, "value": None}
    real_forward = KDLossBalancer.forward

    def forward(self, loss_dict):
        out = real_forward(self, loss_dict)
        if state["step"] == state["at"]:
            out = dict(out)
            bad = torch.full_like(out[state["term"]], state["value"])
            # Keep the graph: a NaN/Inf that reaches backward poisons the gradients too.
            out[state["term"]] = out[state["term"]] * 0 + bad
        return out

    monkeypatch.setattr(KDLossBalancer, "forward", forward)

    def arm(step, term, value):
        state.update(at=step, term=term, value=value)

        def on_train_batch_start(self, trainer, *rest):
            state["step"] = trainer.global_step + 1

        return _callback(on_train_batch_start=on_train_batch_start)

    return arm


def _snapshots():
    """A callback keeping the student's weights and the logged metrics after every step."""
    weights, metrics = [], []

    def on_train_batch_end(self, trainer, module, *rest):
        student = module.distillation_model
        weights.append(
            {
                name: param.detach().clone()
                for name, param in student.named_parameters()
                if not name.startswith("_teacher_model")
            }
        )
        metrics.append(dict(module.last_train_metrics))

    return _callback(on_train_batch_end=on_train_batch_end), weights, metrics


def test_nonfinite_helpers_name_the_terms():
    """nonfinite_terms / nonfinite_message name exactly the NaN and Inf terms, in order."""
    from kd_module.guards import nonfinite_message, nonfinite_terms

    values = {"kd_loss": math.inf, "logits_loss": 1.5, "intermediate_loss": math.nan, "lm_loss": 2}
    assert nonfinite_terms(values) == ["kd_loss", "intermediate_loss"]
    assert nonfinite_message(7, values, "stopped") == (
        "non-finite loss at step 7: kd_loss=inf, intermediate_loss=nan; stopped"
    )


def test_nan_kd_loss_with_skip_leaves_weights_unchanged_and_training_continues(poison):
    """on_nonfinite='skip': a NaN kd_loss at step 3 (NaN gradients) leaves weights and LR as
    after step 2; steps 4-5 update again with finite losses."""
    trigger = poison(3, "kd_loss", math.nan)
    snapshot, weights, metrics = _snapshots()
    with pytest.warns(RuntimeWarning, match=r"non-finite loss at step 3: kd_loss=nan; update"):
        module = _fit([trigger, snapshot], on_nonfinite="skip")
    assert module.skipped_steps == [3]
    assert len(weights) == 5 and metrics[-1]["consumed_samples"] == 5 * 4
    for name, value in weights[2].items():
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0, msg=name)
    changed = [
        name for name, value in weights[3].items() if not torch.equal(value, weights[2][name])
    ]
    assert changed, "step 4 did not update the student"
    assert all(torch.isfinite(value).all() for value in weights[-1].values())
    assert math.isnan(metrics[2]["kd_loss"])
    assert metrics[2]["lr"] == metrics[1]["lr"]  # the schedule does not advance either
    # Step 4 gets the schedule's 3rd value: cosine from 3e-3 to 3e-4 over steps 2..5, at 1/3.
    assert metrics[3]["lr"] == pytest.approx(3e-4 + 0.5 * (math.cos(math.pi / 3) + 1) * 2.7e-3)
    assert all(math.isfinite(m["kd_loss"]) for i, m in enumerate(metrics) if i != 2)


@pytest.mark.parametrize(
    ("term", "value", "shown"),
    [
        ("intermediate_loss", math.nan, "intermediate_loss=nan"),
        ("lm_loss", math.inf, "lm_loss=inf"),
    ],
)
def test_nonfinite_term_with_stop_ends_the_run_naming_step_and_term(poison, term, value, shown):
    """on_nonfinite='stop' (the default): a NaN/Inf in one term at step 2 raises, naming the step
    and only that term."""
    from kd_module.guards import NonFiniteLossError

    snapshot, weights, _ = _snapshots()
    with pytest.raises(NonFiniteLossError, match=rf"at step 2: {shown}; stopping the run") as err:
        _fit([poison(2, term, value), snapshot])
    assert "kd_loss" not in str(err.value).split(":", 1)[1]  # only the poisoned term is named
    assert len(weights) == 1  # step 1 finished, step 2 raised before its end


def test_teacher_sha256_is_recorded_and_identifies_the_teacher():
    """A normal fit records a 64-hex teacher_sha256 that still matches the teacher at the end;
    a teacher with other weights gets another hash."""
    from kd_module.guards import combined_sha256, teacher_digests

    first = _fit(max_steps=2)
    other = _fit(max_steps=2, teacher_seed=5)
    assert len(first.teacher_sha256) == 64 and int(first.teacher_sha256, 16) >= 0
    teacher = first.distillation_model.teacher_model
    assert combined_sha256(teacher_digests(teacher)) == first.teacher_sha256
    assert first.teacher_sha256 != other.teacher_sha256


def _reference_sha256(tensor: torch.Tensor) -> str:
    """The digest's definition: ``dtype|shape|`` then the tensor's bytes in row-major order."""
    import hashlib

    data = tensor.detach().cpu().contiguous()
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode() + raw).hexdigest()


def test_tensor_sha256_keeps_its_definition_and_known_digests():
    """Digests equal ``sha256(dtype|shape| + bytes)`` for several dtypes, an empty, a scalar and
    a transposed tensor, and two digests recorded with the previous implementation."""
    from kd_module.guards import tensor_sha256

    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(5, 7, generator=generator),
        torch.randn(3, 4, generator=generator).bfloat16(),
        torch.randint(0, 100, (9,), generator=generator),
        torch.zeros(0, 3),
        torch.tensor(2.5),
        torch.randn(4, 6, generator=generator).t(),
    ]
    for tensor in tensors:
        assert tensor_sha256(tensor) == _reference_sha256(tensor), (tensor.dtype, tensor.shape)
    assert tensor_sha256(torch.arange(6, dtype=torch.float32).reshape(2, 3)) == (
        "6fa8cc27caf0bad3be1d4a001ed46270dd716ac45cd3c727ad441966fc7cb742"
    )
    assert tensor_sha256(torch.arange(6, dtype=torch.bfloat16).reshape(3, 2).t()) == (
        "819db36a47684a3bfd4eb77dfeda937693b7e012e82beb947bd589ecf910a548"
    )


def test_streaming_through_a_small_host_buffer_gives_the_same_digest():
    """The device path (bytes copied through a reused host buffer) gives the whole-tensor digest
    for buffer sizes that do and do not divide the tensor's bytes (exercised with CPU tensors:
    the copy loop is the same for any source device)."""
    import hashlib

    from kd_module.guards import _update_through_host

    tensor = torch.randn(10, 13, generator=torch.Generator().manual_seed(1))
    raw = tensor.view(-1).view(torch.uint8)
    whole = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    for size in (1, 7, 64, raw.numel(), raw.numel() + 5):
        digest = hashlib.sha256()
        _update_through_host(digest, raw, torch.empty(size, dtype=torch.uint8))
        assert digest.hexdigest() == whole, size


def test_hashing_a_cpu_tensor_makes_no_host_copy():
    """Hashing a 32 MB CPU tensor allocates under 1 MB of Python memory (the previous version
    copied it with ``.numpy().tobytes()``); teacher_digests likewise."""
    import tracemalloc

    from kd_module.guards import teacher_digests, tensor_sha256

    tensor = torch.ones(8 * 1024 * 1024)
    model = torch.nn.Linear(2048, 4096)
    tracemalloc.start()
    try:
        tensor_sha256(tensor)
        teacher_digests(model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


@pytest.mark.gpu
def test_hashing_a_cuda_tensor_streams_through_one_bounded_buffer(monkeypatch):
    """A CUDA tensor's digest equals its CPU copy's; its bytes go through one host buffer of at
    most chunk_bytes, shared across teacher_digests' tensors, and no host copy of the tensor."""
    import tracemalloc

    from kd_module import guards as reliability

    sizes = []
    make_buffer = reliability._host_buffer

    def recording_buffer(size, device):
        sizes.append(size)
        return make_buffer(size, device)

    monkeypatch.setattr(reliability, "_host_buffer", recording_buffer)
    chunk_bytes = 1024 * 1024
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 1024)).cuda()
    tracemalloc.start()
    try:
        on_gpu = reliability.teacher_digests(model, chunk_bytes=chunk_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [chunk_bytes]
    assert peak < chunk_bytes
    assert on_gpu == reliability.teacher_digests(model.cpu())


def test_teacher_modified_mid_run_fails_the_integrity_check():
    """A callback adding 1e-3 to one teacher weight at step 2 makes the end-of-training check
    raise TeacherIntegrityError naming the tensor."""
    from kd_module.guards import TeacherIntegrityError

    def on_train_batch_end(self, trainer, module, *rest):
        if trainer.global_step == 2:
            teacher = module.distillation_model.teacher_model
            with torch.no_grad():
                teacher.decoder.layers[1].mlp.linear_fc1.weight[0, 0] += 1e-3

    with pytest.raises(
        TeacherIntegrityError,
        match=r"teacher integrity: the frozen teacher's weights changed during training .*"
        r"changed: decoder\.layers\.1\.mlp\.linear_fc1\.weight$",
    ):
        _fit([_callback(on_train_batch_end=on_train_batch_end)], max_steps=3)


def test_summary_json_holds_teacher_sha256_and_skipped_steps(tmp_path):
    """distill() writes teacher_sha256 (64 hex digits) and skipped_steps into summary.json."""
    import json

    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.training.strategy import MegatronStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = GPTDataModule(
        mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=4, num_train_samples=8
    )
    distill(STUDENT, data, trainer, teacher=TEACHER, log_dir=str(tmp_path), export=False, name="s")
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert len(summary["teacher_sha256"]) == 64
    assert summary["skipped_steps"] == []
