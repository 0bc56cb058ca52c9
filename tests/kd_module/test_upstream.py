"""The adapters in kd_module.upstream against the installed Lightning, ModelOpt and megatron-core.

Each test pins down the upstream behaviour one adapter relies on, with a real Trainer, a real
``DistillationModel`` or megatron's own RNG tracker getter; a failure names the adapter and the
upstream release it was written for, so an upgrade shows at once which workaround to revisit.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy

from kd_module.distillation.config import DistillConfig
from kd_module.models.gpt import GPTModelConfig, ParallelLayout
from kd_module.upstream import (
    LIGHTNING_VERSION,
    MEGATRON_CORE_VERSION,
    MODELOPT_VERSION,
    lightning,
    megatron,
    modelopt,
)

SEQ, VOCAB, MICRO_BATCH = 8, 64, 2


def _lightning(adapter: str) -> str:
    return f"kd_module.upstream.lightning.{adapter} (written for lightning {LIGHTNING_VERSION})"


def _modelopt(adapter: str) -> str:
    return f"kd_module.upstream.modelopt.{adapter} (written for nvidia-modelopt {MODELOPT_VERSION})"


def _megatron(adapter: str) -> str:
    version = MEGATRON_CORE_VERSION
    return f"kd_module.upstream.megatron.{adapter} (written for megatron-core {version})"


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_versions_named_by_the_adapters_are_the_installed_ones():
    """The adapters were written for exactly the upstream releases installed here."""
    import megatron.core
    import modelopt

    installed = {
        "lightning": (L.__version__, LIGHTNING_VERSION),
        "nvidia-modelopt": (modelopt.__version__, MODELOPT_VERSION),
        "megatron-core": (megatron.core.__version__, MEGATRON_CORE_VERSION),
    }
    for name, (found, written_for) in installed.items():
        assert found == written_for, (
            f"kd_module.upstream was written for {name} {written_for}, {found} is installed: "
            "check every adapter of this upstream (tests/kd_module/test_upstream.py) and update "
            "the version it names"
        )


# ---------------------------------------------------------------- Lightning


def test_attached_trainer_is_none_before_and_the_trainer_after_attaching():
    """attached_trainer answers None where LightningModule.trainer would raise."""
    module = BoringModel()
    with pytest.raises(RuntimeError, match="not attached"):
        module.trainer  # noqa: B018  (the public property refuses; the adapter must not)
    assert lightning.attached_trainer(module) is None, _lightning("attached_trainer")
    trainer = _trainer()
    module.trainer = trainer
    assert lightning.attached_trainer(module) is trainer, (
        _lightning("attached_trainer") + ": LightningModule._trainer no longer holds the Trainer"
    )


def test_disable_distributed_sampler_stops_lightning_injecting_one():
    """The flag disable_distributed_sampler clears is the one Lightning's data connector reads."""
    trainer = _trainer(devices=2, strategy="ddp", use_distributed_sampler=True)
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2)
    requires = trainer._data_connector._requires_distributed_sampler
    assert requires(loader), (
        _lightning("disable_distributed_sampler")
        + ": a 2-device DDP Trainer no longer asks for a DistributedSampler; is the flag moved?"
    )
    lightning.disable_distributed_sampler(trainer)
    assert not requires(loader), (
        _lightning("disable_distributed_sampler")
        + ": Lightning still injects a DistributedSampler after the flag is cleared"
    )


def test_clear_launcher_leaves_the_strategy_without_a_launcher():
    """A DDP strategy gets a launcher from _configure_launcher; clear_launcher removes it."""
    called = []

    class Recording(DDPStrategy):
        def _configure_launcher(self) -> None:
            called.append(True)
            super()._configure_launcher()

    strategy = Recording()
    _trainer(devices=2, strategy=strategy)
    assert called, (
        _lightning("clear_launcher")
        + ": the Trainer no longer calls Strategy._configure_launcher, which "
        "MegatronStrategy overrides"
    )
    assert strategy.launcher is not None, _lightning("clear_launcher")
    lightning.clear_launcher(strategy)
    assert strategy.launcher is None, (
        _lightning("clear_launcher") + ": Strategy.launcher no longer reads Strategy._launcher"
    )


def test_callback_state_key_tells_instances_apart_by_their_arguments():
    """callback_state_key is the class name plus the arguments, as Lightning's own callbacks use."""

    class Counting(L.Callback):
        pass

    first = lightning.callback_state_key(Counting(), window=3)
    assert first == lightning.callback_state_key(Counting(), window=3), (
        _lightning("callback_state_key") + ": the key is not a function of the arguments"
    )
    assert first != lightning.callback_state_key(Counting(), window=4), (
        _lightning("callback_state_key") + ": two argument sets share a key"
    )
    assert "Counting" in first, _lightning("callback_state_key") + f": {first!r}"


def test_checkpoint_step_and_save_now_follow_modelcheckpoint(tmp_path):
    """last_checkpoint_step tracks the scheduled saves; save_checkpoint_now adds one, with last."""
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=2,
        save_top_k=2,
        monitor="step",
        mode="max",
        save_last="link",
        save_on_train_epoch_end=False,
    )
    assert lightning.last_checkpoint_step(checkpoint) == 0, _lightning("last_checkpoint_step")
    trainer = _trainer(
        max_steps=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint]
    )
    trainer.fit(BoringModel())
    assert lightning.last_checkpoint_step(checkpoint) == 2, (
        _lightning("last_checkpoint_step")
        + ": ModelCheckpoint._last_global_step_saved is not the step of the last save"
    )
    lightning.save_checkpoint_now(checkpoint, trainer)
    saved = sorted(os.listdir(tmp_path))
    assert saved == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"], (
        _lightning("save_checkpoint_now") + f": expected step=2, step=3 and last, found {saved}"
    )
    assert os.path.realpath(tmp_path / "last.ckpt") == str(tmp_path / "step=3.ckpt"), (
        _lightning("save_checkpoint_now") + ": last does not link the new save"
    )
    assert lightning.last_checkpoint_step(checkpoint) == 3, _lightning("save_checkpoint_now")


# ---------------------------------------------------------------- ModelOpt


@pytest.fixture
def distillation_model(single_rank):
    """A tiny real DistillationModel with one intermediate pair through a projection."""
    from kd_module.distillation.model import build_distillation_model

    student = GPTModelConfig(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        seq_length=SEQ,
        vocab_size=VOCAB,
        share_embeddings_and_output_weights=False,
    )
    teacher = student.replace(hidden_size=24, ffn_hidden_size=48)
    distill = DistillConfig(
        intermediate_layer_pairs=[["decoder.final_layernorm", "decoder.final_layernorm"]]
    )
    return build_distillation_model(student, teacher, distill, ParallelLayout()).model


def _captured(model) -> tuple[list[str], list[str]]:
    """What each pair's layers hold: ``None``, ``missing`` or the type of the stored output."""

    def held(layer) -> str:
        if not hasattr(layer, "_intermediate_output"):
            return "missing"
        output = layer._intermediate_output
        return "None" if output is None else type(output).__name__

    pairs = list(model._layers_to_loss)
    return [held(s) for s, _ in pairs], [held(t) for _, t in pairs]


def test_discard_captured_outputs_clears_what_the_capture_hooks_stored(distillation_model):
    """A training forward stores every pair's outputs; the adapter clears the chosen side."""
    model = distillation_model
    model.train()
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    with torch.no_grad():
        model(tokens, positions, None)
    student, teacher = _captured(model)
    assert len(student) == 2 and not {"None", "missing"} & set(student + teacher), (
        _modelopt("discard_captured_outputs")
        + ": DistillationModel._layers_to_loss or the layers' _intermediate_output no longer "
        f"hold the captured outputs (student {student}, teacher {teacher})"
    )
    modelopt.discard_captured_outputs(model, student=False)
    student, teacher = _captured(model)
    assert teacher == ["None", "None"], _modelopt("discard_captured_outputs") + f": {teacher}"
    assert "None" not in student, (
        _modelopt("discard_captured_outputs") + ": student=False cleared the student"
    )
    modelopt.discard_captured_outputs(model)
    student, teacher = _captured(model)
    assert student + teacher == ["None"] * 4, _modelopt("discard_captured_outputs")


def test_hidden_state_dict_prefixes_are_the_teacher_and_loss_modules(distillation_model):
    """The prefixes name the submodules hide_teacher_model / hide_loss_modules take away."""
    model = distillation_model
    prefixes = modelopt.hidden_state_dict_prefixes()
    children = dict(model.named_children())
    assert set(prefixes) <= set(children), (
        _modelopt("hidden_state_dict_prefixes")
        + f": {prefixes} are not all submodules of DistillationModel ({sorted(children)})"
    )
    teacher_prefix, loss_prefix = prefixes
    assert children[teacher_prefix] is model.teacher_model, _modelopt("hidden_state_dict_prefixes")
    assert len(children[loss_prefix]) == 1, (
        _modelopt("hidden_state_dict_prefixes") + ": the projection is not a loss module"
    )
    names = [name for name, _ in model.named_parameters()]
    assert all(any(name.startswith(prefix) for name in names) for prefix in prefixes), (
        _modelopt("hidden_state_dict_prefixes") + ": no parameters under one of the prefixes"
    )
    with model.hide_teacher_model(), model.hide_loss_modules():
        hidden = model.state_dict().keys()
    assert not any(key.startswith(prefixes) for key in hidden), (
        _modelopt("hidden_state_dict_prefixes")
        + ": hide_teacher_model / hide_loss_modules leave keys under the prefixes"
    )


# ---------------------------------------------------------------- megatron-core


def test_swap_rng_tracker_is_what_megatron_hands_its_layers(single_rank):
    """megatron's public get_cuda_rng_tracker returns the tracker swap_rng_tracker installs."""
    from megatron.core import tensor_parallel

    installed = megatron.rng_tracker()
    assert installed is not None and tensor_parallel.get_cuda_rng_tracker() is installed, (
        _megatron("rng_tracker") + ": the private global is not the tracker megatron uses"
    )
    sentinel = object()
    previous = megatron.swap_rng_tracker(sentinel)
    try:
        assert previous == (installed, True), _megatron("swap_rng_tracker")
        assert megatron.rng_tracker() is sentinel, _megatron("rng_tracker")
        assert tensor_parallel.get_cuda_rng_tracker() is sentinel, (
            _megatron("swap_rng_tracker")
            + ": get_cuda_rng_tracker no longer returns _CUDA_RNG_STATE_TRACKER once "
            "_CUDA_RNG_STATE_TRACKER_INITIALIZED is set"
        )
    finally:
        megatron.swap_rng_tracker(*previous)
    assert tensor_parallel.get_cuda_rng_tracker() is installed, _megatron("swap_rng_tracker")


def test_the_adapters_import_no_upstream_package():
    """Importing kd_module.upstream loads neither Lightning, ModelOpt nor megatron."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import kd_module.upstream.lightning, kd_module.upstream.modelopt\n"
        "import kd_module.upstream.megatron\n"
        "heavy = [m for m in ('torch', 'lightning', 'megatron', 'modelopt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
