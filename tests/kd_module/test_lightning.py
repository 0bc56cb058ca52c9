"""Lightning integration: MegatronStrategy + DistillationModule fits, layouts, summary.json."""

from __future__ import annotations

import json

import pytest
import torch

from kd_module.models.gpt import GPTModelConfig
from kd_module.specs import RunConfig, TeacherSpec
from tests.helpers import run_distributed

SEQ = 32
STUDENT = GPTModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=512
)
TEACHER = STUDENT.replace(num_layers=4, hidden_size=64, ffn_hidden_size=128)


class _Recorder:
    """Collects logged metrics after every training step (a plain Lightning callback)."""

    def __new__(cls):
        import lightning as L

        class Recorder(L.Callback):
            def __init__(self):
                self.steps = []

            def on_train_batch_end(self, trainer, *args):
                self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

        return Recorder()


def _fit(
    devices=1,
    tp=1,
    pp=1,
    micro_batch_size=2,
    global_batch_size=4,
    max_steps=6,
    val_check_interval=None,
    sequence_parallel=False,
    use_distributed_optimizer=False,
    root_dir=None,
    accelerator="cpu",
    precision="fp32",
    callbacks=(),
):
    """One fit of a tiny pair on mock data; returns per-step metrics and final metrics."""
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
        teacher_init_fn=lambda m: init_weights_by_global_key(m, seed=2, std=0.3),
    )
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        num_train_samples=max_steps * global_batch_size,
        num_val_samples=2 * global_batch_size,
    )
    recorder = _Recorder()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=MegatronStrategy(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=sequence_parallel,
            use_distributed_optimizer=use_distributed_optimizer,
            precision=precision,
        ),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2 if val_check_interval else 0,
        val_check_interval=val_check_interval,
        callbacks=[recorder, *callbacks],
        default_root_dir=root_dir,
    )
    trainer.fit(module, datamodule=data)
    return {
        "steps": recorder.steps,
        "train": module.last_train_metrics,
        "val": getattr(module, "last_val_metrics", None),
    }


def _curve(result, key="kd_loss"):
    return torch.tensor([step[key] for step in result["steps"]], dtype=torch.float64)


@pytest.fixture(scope="module")
def reference():
    """The single-process curve every layout is compared with."""
    return _fit()


def test_single_process_fit_lowers_kd_loss_and_logs_everything():
    """30 steps in one process: kd_loss falls, every documented metric is logged."""
    from kd_module.training.module import TRAIN_METRICS, VAL_METRICS

    result = _fit(max_steps=30, val_check_interval=15)
    curve = _curve(result)
    assert len(curve) == 30
    assert curve[-5:].mean() < 0.7 * curve[:5].mean(), curve
    assert set(TRAIN_METRICS) <= set(result["steps"][-1]), result["steps"][-1].keys()
    assert set(VAL_METRICS) <= set(result["val"])
    assert result["train"]["consumed_samples"] == 30 * 4
    assert result["val"]["teacher_val_loss"] > 0
    assert result["train"]["lr"] == pytest.approx(3e-4)  # cosine decayed to min_lr


def test_fit_twice_in_one_process_is_reproducible(reference):
    """A second Trainer.fit in the same process works and repeats the first exactly."""
    again = _fit()
    torch.testing.assert_close(_curve(again), _curve(reference), rtol=0, atol=0)


def _layout_fit(tp, pp, micro_batch_size=2, sequence_parallel=False, distributed_optimizer=False):
    import os

    devices = int(os.environ["WORLD_SIZE"])
    return _fit(
        devices=devices,
        tp=tp,
        pp=pp,
        micro_batch_size=micro_batch_size,
        sequence_parallel=sequence_parallel,
        use_distributed_optimizer=distributed_optimizer,
    )


def _assert_same_curve(results, reference, rtol=1e-4):
    for result in results:
        for key in ("kd_loss", "logits_loss", "lm_loss", "grad_norm"):
            torch.testing.assert_close(
                _curve(result, key), _curve(reference, key), rtol=rtol, atol=1e-6, msg=key
            )


@pytest.mark.multirank
@pytest.mark.parametrize(
    ("tp", "pp", "micro_batch_size", "sequence_parallel"),
    [(1, 1, 1, False), (2, 1, 2, True), (1, 2, 2, False)],
    ids=["dp2-micro1", "tp2-sp", "pp2"],
)
def test_two_rank_fits_match_single_process(reference, tp, pp, micro_batch_size, sequence_parallel):
    """DP=2 (micro-batch 1), TP=2 (+SP) and PP=2 fits give the single-process loss curve.

    The single-process reference uses micro-batch 2 with 2 micro-batches per step: DP=2 with
    micro-batch 1 covers the same global batch of 4 samples.
    """
    results = run_distributed(
        _layout_fit, 2, tp, pp, micro_batch_size, sequence_parallel, timeout=400
    )
    _assert_same_curve(results, reference)


@pytest.mark.multirank
def test_tp2_pp2_fit_on_four_ranks_matches_single_process(reference):
    """A 4-rank TP=2 x PP=2 fit gives the single-process loss curve."""
    results = run_distributed(_layout_fit, 4, 2, 2, timeout=500)
    _assert_same_curve(results, reference)


def test_distill_writes_summary_with_documented_fields(tmp_path):
    """distill() validates, fits, and writes summary.json with the documented fields."""
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.training.strategy import MegatronStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=2,
    )
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=2,
        num_train_samples=8,
        num_val_samples=2,
    )
    with pytest.warns(UserWarning, match="teacher has random weights"):
        summary = distill(
            STUDENT,
            data,
            trainer,
            teacher=TeacherSpec(config=TEACHER),
            job=RunConfig(log_dir=str(tmp_path), name="run1"),
        )
    written = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for key in (
        "train",
        "val_loss",
        "val_kd_loss",
        "teacher_val_loss",
        "tokens_per_s",
        "wall_s",
        "steps",
        "tokens",
        "step_time_breakdown",
        "configs",
        "versions",
    ):
        assert key in written, key
    assert written["steps"] == 4 and written["tokens"] == 4 * 2 * SEQ
    assert written["configs"]["student"]["hidden_size"] == 32
    assert written["configs"]["teacher"]["hidden_size"] == 64
    assert written["versions"]["megatron-core"] == "0.16.1"
    assert (tmp_path / "run1" / "metrics.csv").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp": 3}, r"world size 1 \(num_nodes x devices\) is not divisible by"),
        ({"global_batch_size": 3}, r"global_batch_size=3 must be a multiple of micro_batch_size=2"),
        ({"seq_length": 64}, r"seq_length 64 .*max_position_embeddings 32|64.*32"),
        (
            {"export_hf": "hf"},
            r"job.export_hf: the student cannot be written as LlamaForCausalLM: "
            r"normalization='LayerNorm' \(an LlamaForCausalLM needs 'RMSNorm'\)",
        ),
    ],
    ids=["layout", "batch", "seq-length", "export-hf"],
)
def test_distill_refuses_bad_inputs_before_building(tmp_path, kwargs, message):
    """Bad layout, batch sizes or sequence length are refused with one message, nothing built."""
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.training.strategy import MegatronStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        strategy=MegatronStrategy(tensor_model_parallel_size=kwargs.get("tp", 1)),
    )
    with pytest.raises(ValueError, match=message):
        data = GPTDataModule(
            mock=True,
            seq_length=kwargs.get("seq_length", SEQ),
            micro_batch_size=2,
            global_batch_size=kwargs.get("global_batch_size", 2),
        )
        distill(
            STUDENT,
            data,
            trainer,
            teacher=TeacherSpec(config=TEACHER),
            job=RunConfig(
                log_dir=str(tmp_path),
                export_hf=str(tmp_path / kwargs["export_hf"]) if "export_hf" in kwargs else None,
            ),
        )
    assert not (tmp_path / "default").exists()
    assert not (tmp_path / "hf").exists()


def _short_distill(**arguments):
    """Two mock steps of distill() with the given teacher/job arguments; its summary."""
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
        mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=2, num_train_samples=4
    )
    return distill(STUDENT, data, trainer, **arguments)


def test_deprecated_flat_keywords_warn_and_equal_the_grouped_call(tmp_path):
    """distill(teacher=GPTModelConfig, log_dir=, name=, export=) still works for one release:
    it warns, naming each keyword's group field, and trains exactly like the grouped call."""
    grouped = _short_distill(
        teacher=TeacherSpec(config=TEACHER),
        job=RunConfig(log_dir=str(tmp_path), name="grouped", export=False),
    )
    with pytest.warns(
        DeprecationWarning,
        match=r"log_dir= \(use job.log_dir=\).*teacher= "
        r"\(use teacher.config=\)",
    ):
        flat = _short_distill(teacher=TEACHER, log_dir=str(tmp_path), name="flat", export=False)
    losses = sorted(key for key in grouped["train"] if key.endswith("loss"))
    assert "kd_loss" in losses and flat["steps"] == grouped["steps"] == 2
    assert [flat["train"][key] for key in losses] == [grouped["train"][key] for key in losses]
    assert flat["configs"]["teacher"] == grouped["configs"]["teacher"]
    assert (tmp_path / "flat" / "summary.json").exists()
    assert not (tmp_path / "flat" / "student").exists()  # export=False reached the job group


def test_a_flat_keyword_and_its_group_field_together_are_refused(tmp_path):
    """teacher_checkpoint= with teacher=TeacherSpec(checkpoint=...) (or name= with job.name) is
    one error naming both spellings, before anything is built or written."""
    with pytest.raises(
        ValueError,
        match=r"teacher_checkpoint='/b' and teacher.checkpoint='/a' are both given.*"
        r"name='y' and job.name='x' are both given",
    ):
        _short_distill(
            teacher=TeacherSpec(checkpoint="/a", config=TEACHER),
            job=RunConfig(log_dir=str(tmp_path), name="x"),
            teacher_checkpoint="/b",
            name="y",
        )
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'teacher_path'"):
        _short_distill(teacher_path="/a")
    assert list(tmp_path.iterdir()) == []


def test_lm_only_module_trains_a_plain_gpt():
    """GPTModule (teachers and LM-only baselines) lowers lm_loss and logs val_loss."""
    import lightning as L

    from kd_module.data import GPTDataModule
    from kd_module.training.module import GPTModule
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy

    module = GPTModule(STUDENT, optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-3))
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=4,
        num_train_samples=80,
        num_val_samples=4,
    )
    recorder = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=10,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)
    curve = _curve({"steps": recorder.steps}, "lm_loss")
    assert curve[-3:].mean() < curve[:3].mean() - 0.5, curve
    assert "kd_loss" not in recorder.steps[-1]
    assert module.last_val_metrics["val_loss"] > 0


def test_strategy_refuses_bad_arguments():
    """MegatronStrategy names each bad argument."""
    from kd_module.training.strategy import MegatronStrategy

    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=0 must be a positive"):
        MegatronStrategy(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match=r"precision='fp8' is not one of fp32, bf16"):
        MegatronStrategy(precision="fp8")


class _MixedPrecisionState:
    """Records, at the end of training, the dtypes and devices of the student's parameters and
    of megatron's optimizer groups (a plain Lightning callback)."""

    def __new__(cls):
        import lightning as L

        class MixedPrecisionState(L.Callback):
            def __init__(self):
                self.state = {}

            def on_train_end(self, trainer, module):
                megatron_optimizer = trainer.optimizers[0].megatron_optimizer
                # get_megatron_optimizer returns a ChainedOptimizer of one optimizer per
                # model-chunk group; with bf16 each is a Float16OptimizerWithFloat16Params.
                inner = getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])
                student = module.distillation_model
                teacher_ids = {id(p) for p in student.teacher_model.parameters()}
                self.state = {
                    "optimizers": [type(o).__name__ for o in inner],
                    "model_params": [
                        (p.dtype, p.device.type)
                        for o in inner
                        for group in o.float16_groups
                        for p in group
                    ],
                    "main_params": [
                        (p.dtype, p.device.type)
                        for o in inner
                        for group in o.fp32_from_float16_groups
                        for p in group
                    ],
                    "student_dtypes": {
                        p.dtype
                        for p in student.parameters()
                        if p.requires_grad and id(p) not in teacher_ids
                    },
                }

        return MixedPrecisionState()


@pytest.mark.gpu
def test_bf16_fit_on_gpu():
    """bf16 on one GPU (megatron's Float16Module): kd_loss falls over 30 steps, the student's
    weights are bf16 on the GPU and megatron's optimizer updates fp32 main copies of them."""
    mixed_precision = _MixedPrecisionState()
    result = _fit(
        accelerator="gpu",
        precision="bf16",
        max_steps=30,
        callbacks=[mixed_precision],
    )
    curve = _curve(result)
    assert len(curve) == 30 and torch.isfinite(curve).all(), curve
    assert curve[-3:].mean() < 0.8 * curve[:3].mean(), curve
    state = mixed_precision.state
    assert state["optimizers"] == ["Float16OptimizerWithFloat16Params"], state["optimizers"]
    assert state["student_dtypes"] == {torch.bfloat16}, state["student_dtypes"]
    assert state["model_params"] and set(state["model_params"]) == {(torch.bfloat16, "cuda")}
    assert len(state["main_params"]) == len(state["model_params"])
    assert set(state["main_params"]) == {(torch.float32, "cuda")}, set(state["main_params"])


def test_readme_documents_exactly_the_logged_metrics():
    """The README's "Logged metrics" table names every metric the modules log, and no other."""
    import re
    from pathlib import Path

    from kd_module.training.module import TRAIN_METRICS, VAL_METRICS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Logged metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
    assert documented == set(TRAIN_METRICS) | set(VAL_METRICS)
