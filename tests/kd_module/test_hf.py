"""Hugging Face checkpoints in and out (kd_module.hf), against transformers' own forward.

Tiny random models of each supported architecture are built with transformers and saved with
``save_pretrained``; the imported megatron model's logits must equal transformers' (fp32) at
TP=1, TP=2 and PP=2, and the export of an imported model must give back the original tensors
bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from kd_module.models.gpt import ParallelLayout
from tests.helpers import run_distributed

transformers = pytest.importorskip("transformers")

SEQ, BATCH, VOCAB = 16, 2, 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # Larger than the default 0.02, so that attention is far from uniform and a wrong rotary
    # embedding (e.g. Llama 3.1's scaling left out) shows in the logits.
    initializer_range=0.1,
)
ARCHS = {
    # Llama 3.2-style: tied embeddings.
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    # Llama 3.1-style: untied, "llama3" RoPE scaling (original_max_position 8192 < max positions).
    "llama31": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=False,
            max_position_embeddings=16384,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            rope_theta=500000.0,
        ),
    ),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
}


def _make_hf(directory: Path, name: str, seed: int = 0, **overrides) -> Path:
    config_class, extra = ARCHS[name]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    # Random norms, so that a norm weight imported into the wrong place shows in the logits.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return tokens, torch.arange(SEQ).expand(BATCH, SEQ)


def _hf_logits(directory: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(_tokens()[0]).logits


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, FileNotFoundError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _import(directory: Path, layout: ParallelLayout | None = None):
    from kd_module.checkpoints.model import load_model_checkpoint
    from kd_module.hf.importer import hf_model_config
    from kd_module.models.gpt import build_model

    config = hf_model_config(directory, seq_length=SEQ)
    model = build_model(config, layout or ParallelLayout())
    load_model_checkpoint(model, directory)
    return model.eval(), config


def _logits(model) -> torch.Tensor:
    """[b, s, v] logits of one stage holding the whole model, TP shards gathered."""
    from megatron.core import parallel_state

    tokens, positions = _tokens()
    with torch.no_grad():
        logits = model(tokens, positions, None)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        group = parallel_state.get_tensor_model_parallel_group()
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _make_hf(root / name, name) for name in ARCHS}


# ---------------------------------------------------------------- TP=1: import and export


@pytest.mark.parametrize("name", list(ARCHS))
def test_imported_logits_equal_transformers(hf_dirs, single_rank, name):
    from kd_module.checkpoints.model import detect_checkpoint_format

    assert detect_checkpoint_format(hf_dirs[name]) == "hf"
    model, config = _import(hf_dirs[name])
    torch.testing.assert_close(_logits(model), _hf_logits(hf_dirs[name]), rtol=1e-4, atol=1e-5)
    assert config.share_embeddings_and_output_weights == (name == "llama_tied")
    assert config.rope_scaling == (name == "llama31")


@pytest.mark.parametrize("name", list(ARCHS))
def test_export_of_the_imported_model_gives_the_original_tensors(
    hf_dirs, single_rank, tmp_path, name
):
    from kd_module.checkpoints.model import save_model_checkpoint
    from kd_module.hf.exporter import export_hf

    source = hf_dirs[name]
    model, config = _import(source)
    save_model_checkpoint(model, tmp_path / "ckpt", model_config=config)
    architecture = json.loads((source / "config.json").read_text())["architectures"][0]
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", architecture=architecture)

    original, exported = _tensors(source), _tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key
    loaded = transformers.AutoConfig.from_pretrained(out)
    assert loaded.architectures == [architecture]
    assert (out / "generation_config.json").is_file()
    torch.testing.assert_close(_hf_logits(out), _hf_logits(source), rtol=0, atol=0)


def test_pytorch_model_bin_checkpoint_imports_like_safetensors(hf_dirs, single_rank, tmp_path):
    source = hf_dirs["qwen2"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(source / "config.json", bin_dir / "config.json")
    torch.save(_tensors(source), bin_dir / "pytorch_model.bin")
    before = _digest(bin_dir)
    model, _ = _import(bin_dir)
    torch.testing.assert_close(_logits(model), _hf_logits(source), rtol=1e-4, atol=1e-5)
    assert _digest(bin_dir) == before


def test_import_never_modifies_the_hf_directory(hf_dirs, single_rank):
    before = _digest(hf_dirs["llama31"])
    _import(hf_dirs["llama31"])
    assert _digest(hf_dirs["llama31"]) == before


def test_teacher_architecture_and_tokenizer_come_from_config_json(hf_dirs, tmp_path):
    from kd_module.models.gpt import GPTModelConfig
    from kd_module.nemo_format.discovery import load_teacher_model_config

    student = GPTModelConfig(seq_length=SEQ, vocab_size=VOCAB)
    resolved = load_teacher_model_config(None, student, hf_dirs["qwen3"])
    assert resolved.source == str(hf_dirs["qwen3"] / "config.json")
    assert (resolved.model.num_layers, resolved.model.kv_channels) == (2, 32)
    assert resolved.model.qk_layernorm and resolved.model.seq_length == SEQ
    # An explicit model_config.yaml still wins over config.json.
    explicit = tmp_path / "model_config.yaml"
    explicit.write_text("num_layers: 3\nhidden_size: 64\nnum_attention_heads: 4\n")
    assert load_teacher_model_config(explicit, student, hf_dirs["qwen3"]).model.num_layers == 3


# ---------------------------------------------------------------- bad input


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_unsupported_architecture_names_the_supported_ones(hf_dirs, single_rank, tmp_path):
    from kd_module.hf.importer import hf_model_config

    bad = _copy(hf_dirs["llama_tied"], tmp_path / "gpt2")
    _edit_config(bad, architectures=["GPT2LMHeadModel"])
    message = _error(lambda: hf_model_config(bad))
    assert "architectures=['GPT2LMHeadModel'] is not supported" in message
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in message


def test_unsupported_settings_are_named_together(hf_dirs, tmp_path):
    from kd_module.hf.importer import hf_model_config

    bad = _copy(hf_dirs["llama31"], tmp_path / "bad")
    _edit_config(
        bad,
        hidden_act="gelu",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
    )
    message = _error(lambda: hf_model_config(bad))
    assert f"HF checkpoint {bad}/config.json" in message
    assert "hidden_act='gelu' is not supported" in message
    assert "rope_type='yarn' is not supported; allowed: default, llama3" in message


def test_missing_shard_missing_tensor_and_shape_mismatch(hf_dirs, single_rank, tmp_path):
    from safetensors.torch import save_file

    from kd_module.hf.importer import check_hf_checkpoint, hf_model_config

    source = hf_dirs["qwen2"]
    config = hf_model_config(source, seq_length=SEQ)
    # A sharded checkpoint whose index names a shard that is not there.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(source / "config.json", sharded / "config.json")
    tensors = _tensors(source)
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(sharded / "a.safetensors"))
    weight_map = {k: "a.safetensors" for k in names[:half]}
    weight_map.update({k: "b.safetensors" for k in names[half:]})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = _error(lambda: check_hf_checkpoint(sharded, config, 1))
    assert "model.safetensors.index.json names 1 missing shard(s): b.safetensors" in message

    # A missing tensor.
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(source / "config.json", missing / "config.json")
    dropped = "model.layers.1.self_attn.k_proj.bias"
    save_file(
        {k: v for k, v in tensors.items() if k != dropped}, str(missing / "model.safetensors")
    )
    message = _error(lambda: check_hf_checkpoint(missing, config, 1))
    assert f"1 tensor(s) missing from the weights: {dropped}" in message

    # config.json that disagrees with the weights.
    wrong = _copy(source, tmp_path / "wrong")
    _edit_config(wrong, intermediate_size=128)
    message = _error(lambda: check_hf_checkpoint(wrong, config.replace(ffn_hidden_size=128), 1))
    assert "shape mismatch: model.layers.0.mlp.gate_proj.weight: weights (96, 64)" in message
    assert "config.json implies (128, 64)" in message


def test_sizes_the_tensor_parallel_split_cannot_divide(hf_dirs, tmp_path):
    from kd_module.hf.importer import check_hf_checkpoint, hf_model_config

    odd = _copy(hf_dirs["llama_tied"], tmp_path / "odd")
    config = hf_model_config(odd, seq_length=SEQ)
    message = _error(lambda: check_hf_checkpoint(odd, config, 3))
    assert "vocab_size=256 is not divisible by tensor_model_parallel_size=3" in message
    assert "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3" in message
    assert "num_query_groups=2 is not divisible by tensor_model_parallel_size=3" in message


def test_a_model_of_another_architecture_is_refused_before_loading(hf_dirs, single_rank):
    from kd_module.hf.importer import hf_model_config, load_hf_weights
    from kd_module.models.gpt import build_model

    config = hf_model_config(hf_dirs["llama_tied"], seq_length=SEQ)
    smaller = config.replace(num_layers=1, ffn_hidden_size=64)
    message = _error(lambda: load_hf_weights(build_model(smaller), hf_dirs["llama_tied"], smaller))
    assert "the model being loaded is not this checkpoint's" in message
    assert "num_layers: model 1, config.json 2" in message


def test_export_refuses_a_model_the_architecture_cannot_hold(single_rank, tmp_path):
    from kd_module.checkpoints.model import save_model_checkpoint
    from kd_module.hf.exporter import export_hf
    from kd_module.models.gpt import GPTModelConfig, build_model

    config = GPTModelConfig(num_layers=1, hidden_size=32, seq_length=SEQ, vocab_size=VOCAB)
    save_model_checkpoint(build_model(config), tmp_path / "gelu", model_config=config)
    message = _error(lambda: export_hf(tmp_path / "gelu", tmp_path / "out"))
    assert "HF export of" in message
    assert "normalization='LayerNorm' (an LlamaForCausalLM needs 'RMSNorm')" in message
    assert "activation='gelu'" in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- TP=2 and PP=2


def _import_tp2(directory: str, ckpt: str) -> torch.Tensor:
    from kd_module.checkpoints.model import save_model_checkpoint
    from kd_module.parallel import runtime

    runtime.initialize_distributed(2, 1, seed=3)
    model, config = _import(Path(directory), ParallelLayout(2, 1))
    save_model_checkpoint(model, ckpt, model_config=config)
    return _logits(model)


def _import_pp2(directory: str) -> torch.Tensor | None:
    from megatron.core import parallel_state

    from kd_module.parallel import runtime

    runtime.initialize_distributed(1, 2, seed=3)
    model, config = _import(Path(directory), ParallelLayout(1, 2))
    tokens, positions = _tokens()
    with torch.no_grad():
        if parallel_state.is_pipeline_first_stage():
            torch.distributed.send(model(tokens, positions, None).contiguous(), dst=1)
            return None
        hidden = torch.empty(SEQ, BATCH, config.hidden_size)
        torch.distributed.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        return model(tokens, positions, None)


@pytest.mark.parametrize("name", ["qwen2", "llama_tied"])
def test_tp2_import_equals_transformers_and_exports_the_original(hf_dirs, tmp_path, name):
    from kd_module.hf.exporter import export_hf
    from kd_module.parallel import runtime

    ckpt = tmp_path / "ckpt_tp2"
    logits = run_distributed(_import_tp2, 2, str(hf_dirs[name]), str(ckpt), timeout=240)
    reference = _hf_logits(hf_dirs[name])
    for rank_logits in logits:
        torch.testing.assert_close(rank_logits, reference, rtol=1e-4, atol=1e-5)
    # Written at TP=2, exported in one process: the original tensors come back.
    try:
        out = export_hf(ckpt, tmp_path / "hf")
    finally:
        runtime.destroy_distributed()
    original, exported = _tensors(hf_dirs[name]), _tensors(out)
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())


@pytest.mark.parametrize("name", ["llama_tied", "qwen3"])
def test_pp2_import_equals_transformers(hf_dirs, name):
    first, last = run_distributed(_import_pp2, 2, str(hf_dirs[name]), timeout=240)
    assert first is None
    torch.testing.assert_close(last, _hf_logits(hf_dirs[name]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- distill() with HF directories


def _distill_hf(student, teacher_dir: Path, student_dir: Path, job):
    """One step of distill() from HF directories, in this process; its summary."""
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.specs import TeacherSpec
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = GPTDataModule(
        mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=2, num_train_samples=2
    )
    return distill(
        student,
        data,
        trainer,
        teacher=TeacherSpec(checkpoint=str(teacher_dir)),
        student_checkpoint=str(student_dir),
        # The first step's learning rate is 0 (linear warmup from 0), so the student's weights
        # leave the run as they came in.
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=10),
        job=job,
    )


def test_distill_from_hf_teacher_and_student_directories(tmp_path):
    """A Qwen3 teacher and a Llama student, both HF directories: a student config that is not
    the directory's is refused before anything is built; the run's HF export gives back the
    student directory's tensors (its only step had learning rate 0)."""
    from kd_module.hf.importer import hf_model_config
    from kd_module.specs import RunConfig

    vocab = 320  # the byte tokenizer of the mock data has 258 tokens
    teacher_dir = _make_hf(tmp_path / "teacher", "qwen3", vocab_size=vocab)
    student_dir = _make_hf(tmp_path / "student", "llama_tied", 1, vocab_size=vocab)
    student = hf_model_config(student_dir, seq_length=SEQ)
    with pytest.raises(ValueError) as refused:
        _distill_hf(
            student.replace(hidden_size=32),
            teacher_dir,
            student_dir,
            RunConfig(log_dir=str(tmp_path / "runs")),
        )
    assert (
        f"student_checkpoint: HF checkpoint {student_dir}: the model being loaded is not this "
        "checkpoint's: hidden_size: model 32, config.json 64"
    ) in str(refused.value)
    assert not (tmp_path / "runs").exists()

    out = tmp_path / "student-hf"
    summary = _distill_hf(
        student,
        teacher_dir,
        student_dir,
        RunConfig(log_dir=str(tmp_path / "runs"), export_hf=str(out)),
    )
    assert summary["export_hf"] == str(out)
    assert summary["configs"]["teacher"]["qk_layernorm"] is True  # from the Qwen3 config.json
    original, exported = _tensors(student_dir), _tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_hf_import_and_export_on_gpu(hf_dirs, impl):
    """On CUDA, with the local spec and (where installed) Transformer Engine's: the imported
    model's logits equal transformers' CPU forward (fp32, TF32 off) and its state dict maps back
    to the original tensors bit for bit (TE keeps the norms inside linear_qkv / linear_fc1)."""
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine")
    from kd_module.checkpoints.model import load_model_checkpoint
    from kd_module.hf.exporter import hf_state_dict
    from kd_module.hf.importer import hf_model_config
    from kd_module.models.gpt import build_model
    from kd_module.parallel import runtime

    source = hf_dirs["qwen3"]
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    runtime.initialize_distributed(seed=1, device="cuda")
    try:
        config = hf_model_config(source, seq_length=SEQ).replace(transformer_impl=impl)
        model = build_model(config).eval()
        assert next(model.parameters()).is_cuda
        names = {type(module).__name__ for module in model.modules()}
        assert any(name.startswith("TE") for name in names) == (impl != "local"), names
        load_model_checkpoint(model, source)
        tokens, positions = _tokens()
        with torch.no_grad():
            logits = model(tokens.cuda(), positions.cuda(), None).float().cpu()
        torch.testing.assert_close(logits, _hf_logits(source), rtol=1e-4, atol=1e-5)
        state = {k: v.cpu() for k, v in model.state_dict().items() if "_extra_state" not in k}
        exported, original = hf_state_dict(state, config, "Qwen3ForCausalLM"), _tensors(source)
        assert sorted(exported) == sorted(original)
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), key
    finally:
        runtime.destroy_distributed()
        torch.backends.cuda.matmul.allow_tf32 = matmul


def test_a_teacher_directory_with_another_tokenizer_is_refused_naming_both(hf_dirs, tmp_path):
    """An HF teacher directory whose tokenizer is not the data's (sizes differ) is refused,
    naming both tokenizers and sizes, before anything is built."""
    pytest.importorskip("tokenizers")
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.data.tokenizers import TokenizerConfig
    from kd_module.hf.importer import hf_model_config
    from kd_module.specs import RunConfig, TeacherSpec
    from kd_module.training.strategy import MegatronStrategy
    from tests.helpers import save_hf_tokenizer

    texts = ["one tokenizer for the teacher, another for the data\n"] * 20
    teacher = _copy(hf_dirs["qwen3"], tmp_path / "teacher")
    teacher_size = save_hf_tokenizer(teacher, texts, vocab_size=300)
    data_size = save_hf_tokenizer(tmp_path / "data-tok", texts, vocab_size=280)
    assert teacher_size != data_size
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, strategy=MegatronStrategy()
    )
    data = GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=2,
        tokenizer=TokenizerConfig(library="huggingface", path=str(tmp_path / "data-tok")),
    )
    with pytest.raises(ValueError) as refused:
        distill(
            hf_model_config(hf_dirs["llama_tied"], seq_length=SEQ),
            data,
            trainer,
            teacher=TeacherSpec(checkpoint=str(teacher)),
            job=RunConfig(log_dir=str(tmp_path / "runs")),
        )
    assert (
        f"the teacher's tokenizer {teacher} has vocab_size={teacher_size} but the data's "
        f"tokenizer {tmp_path / 'data-tok'} has vocab_size={data_size}"
    ) in str(refused.value)
    assert not (tmp_path / "runs").exists()
