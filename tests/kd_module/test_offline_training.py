"""Offline distillation end to end: build_teacher_cache, then students trained from the cache."""

from __future__ import annotations

import json

import pytest
import torch

from kd_module.models.gpt import GPTModelConfig
from kd_module.specs import OfflineConfig, RunConfig, TeacherSpec
from tests.helpers import run_distributed

SEQ, K, STEPS = 32, 8, 4
STUDENT = GPTModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=512
)
TEACHER = STUDENT.replace(num_layers=4, hidden_size=64, ffn_hidden_size=128)
# Online top-k distillation with the LM loss in the objective: what the renormalized offline
# loss must reproduce.
TOPK_CONFIG = {"logit_kl_topk": K, "skip_lm_loss": False, "kd_loss_scale": 0.5}


def _student_init(model):
    from tests.helpers import init_weights_by_global_key

    init_weights_by_global_key(model, seed=1)


def _teacher_init(model):
    from tests.helpers import init_weights_by_global_key

    init_weights_by_global_key(model, seed=2, std=0.3)


def _data(micro_batch_size=2, **overrides):
    from kd_module.data import GPTDataModule

    settings = {
        "mock": True,
        "seq_length": SEQ,
        "micro_batch_size": micro_batch_size,
        "global_batch_size": 4,
        "num_train_samples": STEPS * 4,
        "num_val_samples": 4,
    }
    return GPTDataModule(**{**settings, **overrides})


def _make_cache(out_dir, dtype="fp32", k=K, **kwargs):
    from kd_module.offline.job import build_teacher_cache

    return build_teacher_cache(
        _data(micro_batch_size=3, global_batch_size=6),  # teacher micro-batches: any size
        str(out_dir),
        TeacherSpec(config=TEACHER),
        k=k,
        dtype=dtype,
        shard_size=6,
        accelerator="cpu",
        precision="fp32",
        teacher_init_fn=_teacher_init,
        **kwargs,
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    _make_cache(out)
    return out


def _fit(module, data, devices=1, tp=1, pp=1, sequence_parallel=False, max_steps=STEPS):
    import lightning as L

    from kd_module.training.strategy import MegatronStrategy

    class Recorder(L.Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.steps.append(dict(pl_module.last_train_metrics))

    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=MegatronStrategy(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=sequence_parallel,
        ),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)
    return recorder.steps


def _offline_module(cache_dir, mode="renormalized", config=TOPK_CONFIG):
    from kd_module.offline.module import OfflineDistillationModule
    from kd_module.training.optim import OptimizerConfig

    return OfflineDistillationModule(
        STUDENT,
        str(cache_dir),
        distill_config=config,
        offline_loss_mode=mode,
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
        student_init_fn=_student_init,
    )


def _curve(steps, key):
    return torch.tensor([step[key] for step in steps], dtype=torch.float64)


@pytest.fixture(scope="module")
def online_curve():
    from kd_module.training.module import DistillationModule
    from kd_module.training.optim import OptimizerConfig

    module = DistillationModule(
        STUDENT,
        TEACHER,
        distill_config=TOPK_CONFIG,
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
        student_init_fn=_student_init,
        teacher_init_fn=_teacher_init,
    )
    return _fit(module, _data())


def _assert_same_curves(steps, reference, rtol):
    for key in ("kd_loss", "logits_loss", "lm_loss", "grad_norm"):
        torch.testing.assert_close(
            _curve(steps, key), _curve(reference, key), rtol=rtol, atol=1e-6, msg=key
        )


def test_offline_training_equals_online_topk_distillation(cache_dir, online_curve):
    """Same batches, renormalized top-k: offline losses and gradient norms equal online's."""
    module = _offline_module(cache_dir)
    offline = _fit(module, _data())
    assert len(offline) == STEPS
    assert not hasattr(module.core_model, "teacher_model")  # no teacher was built
    assert _curve(offline, "logits_loss").min() > 0.01
    _assert_same_curves(offline, online_curve, rtol=1e-5)


def test_tail_mode_distills_and_differs_from_renormalized(cache_dir, tmp_path):
    """distill(teacher_cache=...) in tail mode trains, validates on the LM loss and reports."""
    import lightning as L

    from kd_module.api import distill
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy

    data = _data(num_train_samples=None)  # taken from the cache's manifest
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=STEPS,
        logger=False,  # distill() attaches its CSV logger at log_dir/name
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=STEPS,
    )
    summary = distill(
        STUDENT,
        data,
        trainer,
        offline=OfflineConfig(teacher_cache=str(cache_dir), loss_mode="tail"),
        job=RunConfig(log_dir=str(tmp_path), name="tail"),
        distill_config={"skip_lm_loss": False, "kd_loss_scale": 0.5},
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
    )
    assert data.num_train_samples == STEPS * 4
    assert summary["configs"]["teacher_cache"] == str(cache_dir)
    assert summary["configs"]["offline_loss_mode"] == "tail"
    assert summary["configs"]["teacher"] is None and summary["teacher_val_loss"] is None
    assert summary["val_loss"] > 0 and summary["val_kd_loss"] is None
    assert summary["train"]["intermediate_loss"] == 0.0
    assert summary["train"]["logits_loss"] > 0.01
    assert (tmp_path / "tail" / "student" / "model_config.yaml").exists()
    header = (tmp_path / "tail" / "metrics.csv").read_text().splitlines()[0]
    assert "logits_loss" in header and "val_loss" in header


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"seed": 5}}, "manifest field 'dataset.seed' is 1234 in the cache but 5"),
        (
            {"data": {"num_train_samples": 20}},
            "manifest field 'dataset.num_samples' is 16 in the cache but 20",
        ),
        ({"max_steps": 5}, "needs 20 train samples but the teacher cache .* holds 16"),
        ({"teacher": TeacherSpec(checkpoint="/ckpt")}, "teacher_cache replaces the teacher"),
        (
            {"distill_config": {"logit_loss": "reverse_kl"}},
            "logit_loss='reverse_kl' is not available from a teacher cache",
        ),
        (
            {"distill_config": {"intermediate_layer_pairs": [["decoder", "decoder"]]}},
            "intermediate_layer_pairs need the teacher's activations",
        ),
        (
            {"distill_config": {"logit_kl_temperature": 2.0}},
            "logit_kl_temperature=2.0 needs offline_loss_mode='renormalized'",
        ),
        ({"distill_config": {"logit_kl_topk": 9}}, "logit_kl_topk=9 is larger than the k=8"),
        ({"loss_mode": "full"}, "loss_mode='full' is not one of tail, renormalized"),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else None,
)
def test_distill_refuses_a_cache_that_does_not_fit(cache_dir, tmp_path, change, message):
    """Each mismatch is one clear error before any model is built; the cache is untouched."""
    import lightning as L

    from kd_module.api import distill
    from kd_module.training.strategy import MegatronStrategy

    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=change.get("max_steps", STEPS),
        logger=False,
    )
    kwargs = {k: v for k, v in change.items() if k not in ("data", "max_steps", "loss_mode")}
    with pytest.raises(ValueError, match=message):
        distill(
            STUDENT,
            _data(**change.get("data", {})),
            trainer,
            offline=OfflineConfig(str(cache_dir), change.get("loss_mode", "tail")),
            job=RunConfig(log_dir=str(tmp_path)),
            **kwargs,
        )
    assert not (tmp_path / "default").exists()
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == before


def test_cache_rerun_with_other_settings_is_refused_before_the_teacher(cache_dir):
    """Re-running build_teacher_cache into a cache made with another k names the field."""
    with pytest.raises(ValueError, match="manifest field 'k' is 8 in the cache but 4"):
        _make_cache(cache_dir, k=4)


def _layouts_fit(cache_dir: str) -> dict:
    """2 ranks: a PP=2 cache run; offline fits at DP=2 (micro-batch 1), TP=2 with SP, PP=2."""
    _make_cache(f"{cache_dir}-pp2", pipeline_model_parallel_size=2, devices=2)
    dp = _fit(_offline_module(cache_dir), _data(micro_batch_size=1), devices=2)
    tp = _fit(_offline_module(cache_dir), _data(), devices=2, tp=2, sequence_parallel=True)
    pp = _fit(_offline_module(cache_dir), _data(), devices=2, pp=2)
    return {"dp2": dp, "tp2": tp, "pp2": pp}


@pytest.mark.multirank
def test_offline_dp2_tp2_pp2_fits_match_single_process(cache_dir, online_curve):
    """build_teacher_cache at PP=2 writes the single-process cache; offline DP=2, TP=2 (+SP)
    and PP=2 fits reproduce the single-process (= online) curve."""
    from kd_module.offline.reader import TeacherCache

    results = run_distributed(_layouts_fit, 2, str(cache_dir), timeout=400)
    one, pp2 = TeacherCache(cache_dir), TeacherCache(f"{cache_dir}-pp2")
    assert pp2.manifest == one.manifest
    for single, pipelined in zip(one.lookup(range(16)), pp2.lookup(range(16)), strict=True):
        torch.testing.assert_close(pipelined, single, rtol=1e-5, atol=1e-5)
    for result in results:
        for name in ("dp2", "tp2", "pp2"):
            _assert_same_curves(result[name], online_curve, rtol=1e-4)


def test_killed_offline_run_resumes_to_identical_losses(tmp_path):
    """SIGKILLed after step 5, an offline run resumes from its step-4 checkpoint, same losses."""
    from kd_module.offline.job import build_teacher_cache
    from tests.kd_module.resume_job import job_models_and_data
    from tests.kd_module.test_resume import _losses, _run

    _, teacher, data = job_models_and_data()
    build_teacher_cache(
        data,
        str(tmp_path / "cache"),
        teacher=teacher,
        k=16,
        dtype="bf16",
        shard_size=8,
        accelerator="cpu",
        precision="fp32",
    )
    cache = ["--teacher-cache", str(tmp_path / "cache")]
    _run(tmp_path, "full", *cache)
    reference = {item["step"]: item["kd_loss"] for item in _losses(tmp_path, "full")}
    assert len(reference) == 8
    _run(tmp_path, "killed", "--kill-after-step", "5", *cache, expect_killed=True)
    before = _losses(tmp_path, "killed")
    _run(tmp_path, "killed", "--resume", *cache)
    resumed = _losses(tmp_path, "killed")[len(before) :]
    assert [item["step"] for item in resumed] == [5, 6, 7, 8]
    for item in before + resumed:
        assert item["kd_loss"] == reference[item["step"]], item
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["configs"]["teacher_cache"] == str(tmp_path / "cache")


@pytest.mark.gpu
def test_bf16_cache_and_offline_fit_on_gpu(tmp_path):
    """On a GPU: a bf16 teacher writes a bf16 cache; a bf16 offline fit follows the online
    top-k curve within bf16 tolerance."""
    import lightning as L

    from kd_module.offline.job import build_teacher_cache
    from kd_module.offline.module import OfflineDistillationModule
    from kd_module.training.module import DistillationModule
    from kd_module.training.strategy import MegatronStrategy

    build_teacher_cache(
        _data(),
        str(tmp_path / "cache"),
        teacher=TEACHER,
        k=K,
        dtype="bf16",
        accelerator="gpu",
        precision="bf16",
        teacher_init_fn=_teacher_init,
    )

    def fit(module):
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            strategy=MegatronStrategy(precision="bf16"),
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=_data())
        return module

    common = {"distill_config": TOPK_CONFIG, "student_init_fn": _student_init}
    online = fit(DistillationModule(STUDENT, TEACHER, teacher_init_fn=_teacher_init, **common))
    offline = fit(
        OfflineDistillationModule(
            STUDENT, str(tmp_path / "cache"), offline_loss_mode="renormalized", **common
        )
    )
    assert next(offline.core_model.parameters()).dtype == torch.bfloat16
    for key in ("kd_loss", "lm_loss"):
        assert offline.last_train_metrics[key] == pytest.approx(
            online.last_train_metrics[key], rel=0.05
        ), key


def test_sigkilled_cache_run_completes_on_restart_with_identical_files(tmp_path):
    """A cache run SIGKILLed after its 2nd of 4 shards leaves an incomplete cache that training
    refuses; rerun, it completes the cache byte-identical to an uninterrupted run."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def job(out, *extra):
        return subprocess.run(
            [sys.executable, "-m", "tests.kd_module.cache_job", str(out), *extra],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )

    clean = job(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = job(tmp_path / "killed", "--kill-after-shards", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = sorted(p.name for p in (tmp_path / "killed").glob("*.done"))
    assert done == ["shard_00000.done", "shard_00001.done"]
    with pytest.raises(ValueError, match="is incomplete; run `nemo kd cache-teacher` again"):
        _offline_module(tmp_path / "killed")
    resumed = job(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert len(names) == 1 + 4 * 5  # manifest + 4 shards x (values, indices, lse, tokens, done)
    for name in names:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_bad_cache_arguments_are_named_together_before_anything_is_built(tmp_path):
    """build_teacher_cache names every bad argument in one message and writes nothing;
    distill names a teacher_cache directory without a manifest."""
    import lightning as L

    from kd_module.api import distill
    from kd_module.offline.job import build_teacher_cache
    from kd_module.training.strategy import MegatronStrategy

    with pytest.raises(
        ValueError,
        match=r"k=0 must be .*shard_size=-1 must be .*dtype='int8' is not one of bf16, fp16, "
        r"fp32.*precision='bf16' needs accelerator='gpu'",
    ):
        build_teacher_cache(
            _data(),
            str(tmp_path / "cache"),
            teacher=TEACHER,
            k=0,
            shard_size=-1,
            dtype="int8",
            accelerator="cpu",
            precision="bf16",
        )
    assert not (tmp_path / "cache").exists()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=MegatronStrategy(), max_steps=1, logger=False
    )
    with pytest.raises(ValueError, match=r"no manifest.json in .*nowhere"):
        distill(
            STUDENT,
            _data(),
            trainer,
            offline=OfflineConfig(str(tmp_path / "nowhere")),
            job=RunConfig(log_dir=str(tmp_path)),
        )
