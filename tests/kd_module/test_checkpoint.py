"""Model checkpoints: resharding, legacy files, format detection, errors, export, atomic saves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kd_module.models.gpt import GPTModelConfig, ParallelLayout
from tests.helpers import run_distributed

SEQ, VOCAB, BATCH = 16, 128, 2

TEACHER = GPTModelConfig(
    num_layers=4,
    hidden_size=48,
    num_attention_heads=4,
    ffn_hidden_size=96,
    seq_length=SEQ,
    vocab_size=VOCAB,
    share_embeddings_and_output_weights=False,
)
STUDENT = TEACHER.replace(hidden_size=32, ffn_hidden_size=64)
TEACHER_SEED, STUDENT_SEED = 7, 1


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return tokens, torch.arange(SEQ).expand(BATCH, SEQ)


def _build(config: GPTModelConfig, seed: int | None = None, layout: ParallelLayout | None = None):
    from kd_module.models.gpt import build_model
    from tests.helpers import init_weights_by_global_key

    model = build_model(config, layout or ParallelLayout())
    init_weights_by_global_key(model, seed if seed is not None else 99)
    return model.eval()


def _logits(model) -> torch.Tensor:
    """Full-vocabulary logits [b, s, v] of a single-stage model (TP shards gathered)."""
    from megatron.core import parallel_state

    tokens, position_ids = _tokens()
    with torch.no_grad():
        logits = model(tokens, position_ids, None)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(tp_size)]
        torch.distributed.all_gather(
            parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
        )
        logits = torch.cat(parts, dim=-1)
    return logits


def _pipeline_logits(model) -> torch.Tensor | None:
    """Logits of a PP=2 model: stage 0 sends its hidden states to stage 1 (None on stage 0)."""
    from megatron.core import parallel_state

    tokens, position_ids = _tokens()
    with torch.no_grad():
        if parallel_state.is_pipeline_first_stage():
            hidden = model(tokens, position_ids, None)
            torch.distributed.send(hidden.contiguous(), dst=1)
            return None
        hidden = torch.empty(SEQ, BATCH, TEACHER.hidden_size)
        torch.distributed.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        return model(tokens, position_ids, None)


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


# ---------------------------------------------------------------- rank functions


def _save_teacher_tp2(root: str) -> dict:
    """At TP=2: save the teacher as torch_dist (iteration layout) and as legacy torch."""
    from kd_module.checkpoints.model import export_student, save_model_checkpoint
    from kd_module.distillation.model import build_distillation_model
    from kd_module.parallel import runtime
    from tests.helpers import init_weights_by_global_key

    runtime.initialize_distributed(2, 1, seed=3)
    model = _build(TEACHER, TEACHER_SEED, ParallelLayout(2, 1))
    save_model_checkpoint(
        model,
        Path(root) / "dist_tp2",
        model_config=TEACHER,
        tokenizer={"library": "byte"},
        iteration=3,
    )
    legacy = Path(root) / "legacy_tp2"
    save_model_checkpoint(model, legacy, ckpt_format="torch")

    # A save failing on rank 1 only: both ranks raise, the previous checkpoint stays.
    before = {p.relative_to(legacy): p.read_bytes() for p in legacy.rglob("*") if p.is_file()}
    real_save = torch.save

    def failing_save(*args, **kwargs):
        raise OSError("disk full on rank 1")

    torch.save = failing_save if torch.distributed.get_rank() == 1 else real_save
    try:
        failed_save = _error(lambda: save_model_checkpoint(model, legacy, ckpt_format="torch"))
    finally:
        torch.save = real_save
    after = {p.relative_to(legacy): p.read_bytes() for p in legacy.rglob("*") if p.is_file()}

    distill_model = build_distillation_model(
        STUDENT,
        TEACHER,
        layout=ParallelLayout(2, 1),
        student_init=lambda m: init_weights_by_global_key(m, seed=STUDENT_SEED),
    ).model
    export_student(distill_model, Path(root) / "student_tp2", STUDENT)
    return {"logits": _logits(model), "failed_save": failed_save, "intact": after == before}


def _load_teacher_pp2(root: str) -> dict:
    """At PP=2: load the TP=2 torch_dist teacher; the errors every rank must raise."""
    from kd_module.checkpoints.model import load_model_checkpoint
    from kd_module.parallel import runtime

    runtime.initialize_distributed(1, 2, seed=3)
    layout = ParallelLayout(1, 2)
    model = _build(TEACHER, 1234, layout)
    load_model_checkpoint(model, Path(root) / "dist_tp2")
    logits = _pipeline_logits(model)
    wider = _build(TEACHER.replace(hidden_size=64, ffn_hidden_size=128), 1, layout)
    tied = _build(TEACHER.replace(share_embeddings_and_output_weights=True), 1, layout)
    return {
        "logits": logits,
        "shape_error": _error(lambda: load_model_checkpoint(wider, Path(root) / "dist_tp2")),
        "key_error": _error(lambda: load_model_checkpoint(tied, Path(root) / "dist_tp2")),
        "legacy_error": _error(lambda: load_model_checkpoint(model, Path(root) / "legacy_tp2")),
    }


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Teacher checkpoints saved at TP=2 (2 ranks) and the TP=1 reference logits."""
    from kd_module.parallel import runtime

    root = tmp_path_factory.mktemp("teacher")
    ranks = run_distributed(_save_teacher_tp2, 2, str(root), timeout=300)
    runtime.initialize_distributed(seed=3)
    try:
        reference = _logits(_build(TEACHER, TEACHER_SEED))
    finally:
        runtime.destroy_distributed()
    return {"root": root, "ranks": ranks, "tp2_logits": ranks[0]["logits"], "reference": reference}


@pytest.fixture
def single_rank():
    from kd_module.parallel import runtime

    runtime.initialize_distributed(seed=3)
    yield runtime
    runtime.destroy_distributed()


# ---------------------------------------------------------------- resharding


@pytest.mark.multirank
def test_tp2_teacher_loads_at_tp1_with_identical_logits(saved, single_rank):
    """A torch_dist teacher saved at TP=2 loads at TP=1 bit-identical to the TP=1 reference."""
    from kd_module.checkpoints.model import load_model_checkpoint

    model = _build(TEACHER, seed=1234)
    assert not torch.equal(_logits(model), saved["reference"])
    load_model_checkpoint(model, saved["root"] / "dist_tp2")
    torch.testing.assert_close(_logits(model), saved["reference"], rtol=0, atol=0)
    # The TP=2 model that was saved computes the same logits up to summation order.
    torch.testing.assert_close(saved["tp2_logits"], saved["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.multirank
def test_tp2_teacher_loads_at_pp2_and_errors_reach_every_rank(saved):
    """At PP=2 the TP=2 teacher gives the TP=1 logits; shape/key/legacy errors on both ranks."""
    results = run_distributed(_load_teacher_pp2, 2, str(saved["root"]), timeout=240)
    assert results[0]["logits"] is None
    torch.testing.assert_close(results[1]["logits"], saved["reference"], rtol=1e-5, atol=1e-6)
    for result in results:
        assert "shape mismatch" in result["shape_error"]
        assert (
            "decoder.final_layernorm.bias: checkpoint (48,), model (64,)" in result["shape_error"]
        )
        assert (
            "unexpected in the checkpoint (the model lacks them) output_layer.weight"
            in (result["key_error"])
        )
        assert "saved at TP=2, PP=1 cannot be loaded at TP=1, PP=2" in result["legacy_error"]
        assert "torch_dist" in result["legacy_error"]


@pytest.mark.multirank
def test_layout_files_and_model_config_of_an_iteration_save(saved):
    """Megatron-LM layout: iter_0000003 with metadata.json, tracker '3', model_config.yaml."""
    from kd_module.checkpoints.model import detect_checkpoint_format, resolve_checkpoint_dir
    from kd_module.nemo_format.discovery import load_teacher_model_config

    root = saved["root"] / "dist_tp2"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert resolve_checkpoint_dir(root) == root / "iter_0000003"
    assert detect_checkpoint_format(root) == "torch_dist"
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000003",
        "latest_checkpointed_iteration.txt",
        "model_config.yaml",
    ]
    config = load_teacher_model_config(None, STUDENT, teacher_checkpoint=root)
    assert config.model == TEACHER
    assert config.precision == "float32" and config.tokenizer == {"library": "byte"}
    legacy = saved["root"] / "legacy_tp2"
    assert sorted(p.name for p in legacy.iterdir()) == ["mp_rank_00", "mp_rank_01"]
    assert detect_checkpoint_format(legacy) == "torch"


# ---------------------------------------------------------------- legacy torch format


def test_legacy_torch_teacher_in_iteration_layout_loads_identically(single_rank, tmp_path):
    """A legacy torch teacher in Megatron-LM's iter layout reloads with identical logits."""
    from kd_module.checkpoints.model import (
        detect_checkpoint_format,
        load_model_checkpoint,
        save_model_checkpoint,
    )

    teacher = _build(TEACHER, TEACHER_SEED)
    save_model_checkpoint(teacher, tmp_path, ckpt_format="torch", iteration=10)
    file = tmp_path / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    content = torch.load(file, weights_only=False)
    assert (content["checkpoint_version"], content["iteration"]) == (3.0, 10)
    assert content["model"].keys() == teacher.state_dict().keys()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert detect_checkpoint_format(tmp_path) == "torch"

    model = _build(TEACHER, seed=1234)
    load_model_checkpoint(model, tmp_path, ckpt_format="torch")
    torch.testing.assert_close(_logits(model), _logits(teacher), rtol=0, atol=0)


@pytest.mark.multirank
def test_legacy_tp2_checkpoint_refused_at_tp1(saved, single_rank):
    """A legacy checkpoint saved at TP=2 is refused at TP=1 with the torch_dist suggestion."""
    from kd_module.checkpoints.model import load_model_checkpoint

    with pytest.raises(ValueError, match=r"saved at TP=2, PP=1 cannot be loaded at TP=1, PP=1.*"):
        load_model_checkpoint(_build(TEACHER), saved["root"] / "legacy_tp2")


# ---------------------------------------------------------------- keys and shapes


@pytest.fixture
def dist_teacher(single_rank, tmp_path):
    """A TP=1 torch_dist teacher checkpoint and its model."""
    from kd_module.checkpoints.model import save_model_checkpoint

    teacher = _build(TEACHER, TEACHER_SEED)
    save_model_checkpoint(teacher, tmp_path / "teacher", model_config=TEACHER)
    return tmp_path / "teacher", teacher


def test_missing_and_unexpected_keys_are_named(dist_teacher):
    """Untied checkpoint into a tied model: unexpected output_layer; the reverse: missing."""
    from kd_module.checkpoints.model import load_model_checkpoint, save_model_checkpoint

    path, teacher = dist_teacher
    tied = _build(TEACHER.replace(share_embeddings_and_output_weights=True), seed=1)
    with pytest.raises(ValueError, match=r"unexpected in the checkpoint .*\) output_layer.weight"):
        load_model_checkpoint(tied, path)
    save_model_checkpoint(tied, path.parent / "tied")
    with pytest.raises(ValueError, match=r"missing from the checkpoint .*\) output_layer.weight"):
        load_model_checkpoint(_build(TEACHER), path.parent / "tied")


def test_non_strict_load_skips_unexpected_keys(dist_teacher):
    """strict=False loads the shared tensors and leaves the rest (a warning, no error)."""
    from kd_module.checkpoints.model import load_model_checkpoint

    path, teacher = dist_teacher
    tied = _build(TEACHER.replace(share_embeddings_and_output_weights=True), seed=1)
    load_model_checkpoint(tied, path, strict=False)
    expected = teacher.state_dict()
    for key, value in tied.state_dict().items():
        if isinstance(value, torch.Tensor) and key != "output_layer.weight":
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_shape_mismatch_names_tensor_and_both_shapes(dist_teacher):
    """A teacher config with another hidden size: the error names tensors and both shapes."""
    from kd_module.checkpoints.model import load_model_checkpoint

    path, _ = dist_teacher
    wider = _build(TEACHER.replace(hidden_size=64, ffn_hidden_size=128))
    with pytest.raises(
        ValueError,
        match=r"shape mismatch for 17 tensors .*decoder\.final_layernorm\.bias: "
        r"checkpoint \(48,\), model \(64,\)",
    ):
        load_model_checkpoint(wider, path)


def test_loading_never_modifies_the_checkpoint(dist_teacher):
    """Files and their bytes are the same after a successful and a failed load."""
    from kd_module.checkpoints.model import load_model_checkpoint

    path, _ = dist_teacher
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    load_model_checkpoint(_build(TEACHER), path)
    with pytest.raises(ValueError):
        load_model_checkpoint(_build(TEACHER.replace(num_layers=2)), path)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- formats and paths


def test_resolve_and_detect_formats(tmp_path):
    """Tracker files (number, release), iter dirs, NeMo 2 weights/ and both formats resolve."""
    from kd_module.checkpoints.model import detect_checkpoint_format, resolve_checkpoint_dir

    (tmp_path / "release" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert resolve_checkpoint_dir(tmp_path) == tmp_path / "release"
    assert detect_checkpoint_format(tmp_path) == "torch"

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("42")
    (tmp_path / "iter_0000042").mkdir()
    (tmp_path / "iter_0000042" / "metadata.json").write_text("{}")
    assert resolve_checkpoint_dir(tmp_path) == tmp_path / "iter_0000042"
    assert detect_checkpoint_format(tmp_path / "iter_0000042") == "torch_dist"

    nemo2 = tmp_path / "nemo2"
    (nemo2 / "weights").mkdir(parents=True)
    (nemo2 / "weights" / "metadata.json").write_text("{}")
    assert resolve_checkpoint_dir(nemo2) == nemo2 / "weights"


def test_format_errors_name_the_path(tmp_path):
    """Missing, empty, neither-format, file, bad tracker and dangling tracker are explained."""
    from kd_module.checkpoints.model import detect_checkpoint_format, resolve_checkpoint_dir

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {missing}: no such directory"):
        detect_checkpoint_format(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"checkpoint {empty}: empty directory; expected"):
        detect_checkpoint_format(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_text("x")
    with pytest.raises(
        ValueError, match=r"no known format; expected metadata.json .*\(hf\), found weights.bin"
    ):
        detect_checkpoint_format(other)
    with pytest.raises(ValueError, match="is a file; expected a checkpoint directory"):
        resolve_checkpoint_dir(other / "weights.bin")
    (other / "latest_checkpointed_iteration.txt").write_text("latest")
    with pytest.raises(ValueError, match="holds 'latest'; expected an iteration number"):
        resolve_checkpoint_dir(other)
    (other / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(FileNotFoundError, match="names iter_0000007, which does not exist"):
        resolve_checkpoint_dir(other)


def test_requested_format_must_match_the_directory(dist_teacher):
    """ckpt_format='torch' on a torch_dist directory is refused; an unknown format too."""
    from kd_module.checkpoints.model import load_model_checkpoint

    path, _ = dist_teacher
    with pytest.raises(ValueError, match="ckpt_format='torch' was requested .* torch_dist"):
        load_model_checkpoint(_build(TEACHER), path, ckpt_format="torch")
    with pytest.raises(ValueError, match="ckpt_format='zarr' is not one of auto"):
        load_model_checkpoint(_build(TEACHER), path, ckpt_format="zarr")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_files_name_the_path(dist_teacher):
    """Truncated torch_dist shards/metadata and a truncated legacy file are reported by path."""
    from kd_module.checkpoints.model import load_model_checkpoint, save_model_checkpoint

    path, teacher = dist_teacher
    broken = path.parent / "broken_shard"
    shutil.copytree(path, broken)
    for shard in broken.glob("*.distcp"):
        _truncate(shard)
    with pytest.raises(ValueError, match=f"checkpoint {broken}: loading failed .*corrupt"):
        load_model_checkpoint(_build(TEACHER), broken)

    broken = path.parent / "broken_metadata"
    shutil.copytree(path, broken)
    _truncate(broken / ".metadata")
    with pytest.raises(ValueError, match=f"checkpoint {broken}: cannot read the torch_dist"):
        load_model_checkpoint(_build(TEACHER), broken)

    legacy = path.parent / "legacy"
    save_model_checkpoint(teacher, legacy, ckpt_format="torch")
    _truncate(legacy / "mp_rank_00" / "model_optim_rng.pt")
    file = legacy / "mp_rank_00" / "model_optim_rng.pt"
    with pytest.raises(ValueError, match=f"checkpoint {file}: cannot be read .*truncated"):
        load_model_checkpoint(_build(TEACHER), legacy)


# ---------------------------------------------------------------- atomic save


def test_failed_save_keeps_the_previous_checkpoint(dist_teacher, monkeypatch):
    """A save that raises midway leaves the old checkpoint intact and no temporary directory."""
    from megatron.core import dist_checkpointing

    from kd_module.checkpoints.model import load_model_checkpoint, save_model_checkpoint

    path, teacher = dist_teacher
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    real_save = dist_checkpointing.save

    def save_then_fail(state, directory, **kwargs):
        real_save(state, directory, **kwargs)
        # Written into a hidden sibling, never under the final name.
        assert Path(directory).name.startswith(".") and Path(directory).name.endswith(".incomplete")
        raise OSError("disk full")

    monkeypatch.setattr(dist_checkpointing, "save", save_then_fail)
    other = _build(TEACHER, seed=5)
    with pytest.raises(OSError, match="disk full"):
        save_model_checkpoint(other, path, model_config=TEACHER)
    with pytest.raises(OSError, match="disk full"):
        save_model_checkpoint(other, path.parent / "fresh")
    assert sorted(p.name for p in path.parent.iterdir()) == ["teacher"]
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before

    monkeypatch.undo()
    save_model_checkpoint(other, path, model_config=TEACHER)
    assert sorted(p.name for p in path.parent.iterdir()) == ["teacher"]
    model = _build(TEACHER)
    load_model_checkpoint(model, path)
    torch.testing.assert_close(_logits(model), _logits(other), rtol=0, atol=0)


@pytest.mark.multirank
def test_save_failing_on_one_rank_raises_everywhere_and_keeps_the_checkpoint(saved):
    """Rank 1's write fails: rank 1 re-raises it, rank 0 names it, the old files are intact."""
    rank0, rank1 = saved["ranks"]
    assert rank1["failed_save"] == "OSError: disk full on rank 1"
    assert rank0["failed_save"].startswith("RuntimeError: save checkpoint ")
    assert "failed on another rank: rank 1: OSError: disk full on rank 1" in rank0["failed_save"]
    assert rank0["intact"] and rank1["intact"]
    assert sorted(p.name for p in saved["root"].iterdir()) == [
        "dist_tp2",
        "legacy_tp2",
        "student_tp2",
    ]


# ---------------------------------------------------------------- export and next round


@pytest.mark.multirank
def test_student_exported_at_tp2_loads_at_tp1(saved, single_rank):
    """A student exported from a TP=2 DistillationModel loads at TP=1 with the same weights."""
    from kd_module.checkpoints.model import load_model_checkpoint

    reference = _build(STUDENT, STUDENT_SEED)
    model = _build(STUDENT, seed=1234)
    load_model_checkpoint(model, saved["root"] / "student_tp2")
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


def test_exported_student_is_a_plain_model_and_the_next_teacher(single_rank, tmp_path):
    """Export: plain GPT keys only, the DistillationModel student's logits, next teacher."""
    from megatron.core import dist_checkpointing

    from kd_module.checkpoints.model import (
        export_student,
        load_model_checkpoint,
        make_teacher_loader,
    )
    from kd_module.distillation.config import DistillConfig
    from kd_module.distillation.model import build_distillation_model
    from kd_module.models.gpt import build_model
    from kd_module.nemo_format.discovery import load_teacher_model_config
    from tests.helpers import init_weights_by_global_key

    distill = DistillConfig(
        intermediate_layer_pairs=[["decoder.final_layernorm", "decoder.final_layernorm"]]
    )
    parts = build_distillation_model(
        STUDENT,
        TEACHER,
        distill,
        student_init=lambda m: init_weights_by_global_key(m, seed=1),
        teacher_loader=lambda m: init_weights_by_global_key(m, seed=TEACHER_SEED),
    )
    model = parts.model
    model.eval()
    assert any(name.startswith("_loss_modules") for name, _ in model.named_parameters())
    tokens, position_ids = _tokens()
    with torch.no_grad(), model.only_student_forward():
        student_logits = type(model).forward(model, tokens, position_ids, None)

    export = tmp_path / "student"
    export_student(model, export, STUDENT, tokenizer={"library": "byte"})
    saved_keys = set(dist_checkpointing.load_tensors_metadata(str(export)))
    plain = build_model(STUDENT, ParallelLayout())
    plain_keys = {sh.key for sh in plain.sharded_state_dict().values() if hasattr(sh, "key")}
    assert saved_keys == {key for key in plain_keys if not key.endswith("_extra_state")}
    assert not any("teacher" in key or "loss_modules" in key for key in saved_keys)

    load_model_checkpoint(plain, export)
    torch.testing.assert_close(_logits(plain.eval()), student_logits, rtol=0, atol=0)

    smaller = STUDENT.replace(num_layers=2, hidden_size=16, ffn_hidden_size=32)
    teacher_config = load_teacher_model_config(None, smaller, teacher_checkpoint=export)
    assert teacher_config.model == STUDENT
    assert teacher_config.tokenizer == {"library": "byte"}
    next_round = build_distillation_model(
        smaller, teacher_config.model, teacher_loader=make_teacher_loader(export)
    ).model
    with torch.no_grad():
        teacher_logits = next_round.teacher_model(tokens, position_ids, None)
    torch.testing.assert_close(teacher_logits, student_logits, rtol=0, atol=0)


def test_export_in_legacy_format_holds_only_student_tensors(single_rank, tmp_path):
    """ckpt_format='torch' export: exactly the plain GPTModel state-dict keys."""
    from kd_module.checkpoints.model import export_student
    from kd_module.distillation.model import build_distillation_model
    from kd_module.models.gpt import build_model

    distill_model = build_distillation_model(STUDENT, TEACHER).model
    export_student(distill_model, tmp_path, STUDENT, ckpt_format="torch")
    content = torch.load(tmp_path / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert content["model"].keys() == build_model(STUDENT, ParallelLayout()).state_dict().keys()
    assert (tmp_path / "model_config.yaml").is_file()


def test_make_student_init_none_means_from_scratch():
    """make_student_init(None) is None, so build_distillation_model keeps random weights."""
    from kd_module.checkpoints.model import make_student_init

    assert make_student_init(None) is None
    assert make_student_init("/ckpt/x").keywords == {
        "path": "/ckpt/x",
        "ckpt_format": "auto",
        "strict": True,
    }
