"""Hugging Face directories through the real ``nemo kd`` command: a distillation whose teacher is
an HF directory and whose student comes out as one (``job.export_hf``), and the one-off
conversions ``nemo kd import-hf`` / ``export-hf``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.recipes.test_cli import _nemo, short_mock_distill

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TEXTS = [
    "the teacher knows the answer and the student learns it from the soft labels\n",
    "distillation moves what a large model knows into a small one, token by token\n",
    "a tokenizer turns text into numbers; both models must read the same numbers\n",
] * 20
LLAMA_STUDENT = (
    "student.normalization=RMSNorm",
    "student.activation=swiglu",
    "student.position_embedding_type=rope",
    "student.add_bias_linear=false",
)
"""Overrides that make ``tiny_cpu``'s student Llama-shaped, so that it exports as Llama."""


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory) -> tuple[Path, int]:
    """A tiny Llama HF directory with its own BPE tokenizer, and its vocabulary size.

    Its output layer is zero, so its logits are uniform over the padded vocabulary: its loss on
    any data is ``log(vocab)`` when its weights were loaded, and something else when not.
    """
    from kd_module.data.tokenizers import padded_vocab_size
    from tests.helpers import save_hf_tokenizer

    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    size = save_hf_tokenizer(directory, TEXTS, vocab_size=300)
    vocab = padded_vocab_size(size, 64)  # what tiny_cpu's student pads this tokenizer to
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(directory)
    return directory, vocab


def _megatron_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, v] logits of a saved megatron-kd checkpoint, on one in-process rank."""
    from kd_module.checkpoints.model import load_model_checkpoint
    from kd_module.models.gpt import GPTModelConfig, build_model
    from kd_module.nemo_format.discovery import load_teacher_model_config
    from kd_module.parallel import runtime

    config = load_teacher_model_config(None, GPTModelConfig(), str(checkpoint)).model
    runtime.initialize_distributed(seed=1)
    try:
        model = build_model(config).eval()
        load_model_checkpoint(model, checkpoint)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            return model(tokens, positions, None)
    finally:
        runtime.destroy_distributed()


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_distill_from_an_hf_teacher_exports_the_student_to_hf(hf_teacher, tmp_path):
    """`nemo kd distill` with `teacher.checkpoint=<HF dir>` and `job.export_hf=`: the teacher's
    architecture, weights and tokenizer come from the directory, and the HF student that comes
    out loads with AutoModelForCausalLM and gives the megatron student's logits."""
    directory, vocab = hf_teacher
    exported = tmp_path / "student-hf"
    result, run_dir = short_mock_distill(
        tmp_path,
        "hf",
        f"teacher.checkpoint={directory}",
        f"job.export_hf={exported}",
        "trainer.limit_val_batches=2",
        *LLAMA_STUDENT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    teacher = summary["configs"]["teacher"]
    assert (teacher["num_layers"], teacher["num_query_groups"], teacher["vocab_size"]) == (
        2,
        2,
        vocab,
    )
    # The data took the teacher directory's tokenizer (the recipe named none).
    assert summary["configs"]["data"]["tokenizer"] == {
        "library": "huggingface",
        "path": str(directory),
    }
    # The teacher's weights were loaded: its zero output layer makes its loss log(vocab).
    assert math.isclose(summary["teacher_val_loss"], math.log(vocab), rel_tol=1e-5)
    assert summary["export_hf"] == str(exported)

    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["vocab_size"]) == (1, vocab)
    assert (exported / "generation_config.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    tokens = torch.tensor([tokenizer.encode(TEXTS[0])[:32], tokenizer.encode(TEXTS[1])[:32]])
    expected = _megatron_logits(run_dir / "student", tokens)
    torch.testing.assert_close(_hf_logits(exported, tokens), expected, rtol=1e-4, atol=1e-5)


def test_import_hf_then_export_hf_gives_the_original_tensors(hf_teacher, tmp_path):
    """`nemo kd import-hf` writes a torch_dist checkpoint with model_config.yaml and the
    tokenizer; `nemo kd export-hf` of it gives back the HF tensors bit for bit."""
    directory, vocab = hf_teacher
    converted, back = tmp_path / "megatron", tmp_path / "back"
    result = _nemo(
        "kd",
        "import-hf",
        f"hf_dir={directory}",
        f"output={converted}",
        "dtype=float32",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model_config = yaml.safe_load((converted / "model_config.yaml").read_text())
    assert (model_config["num_layers"], model_config["vocab_size"]) == (2, vocab)
    assert model_config["tokenizer"]["library"] == "huggingface"
    assert (Path(model_config["tokenizer"]["type"]) / "tokenizer.json").is_file()

    result = _nemo("kd", "export-hf", f"checkpoint={converted}", f"output={back}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    original, written = _tensors(directory), _tensors(back)
    assert sorted(original) == sorted(written)
    for name, tensor in original.items():
        assert torch.equal(tensor, written[name]), name
    assert (back / "tokenizer.json").is_file()


def test_conversions_name_bad_input_in_one_line(hf_teacher, tmp_path):
    """A checkpoint without model_config.yaml, a missing HF directory and a bad dtype are
    refused with one line and exit code 2; nothing is written."""
    directory, _ = hf_teacher
    (tmp_path / "bare").mkdir()
    cases = [
        (("export-hf", f"checkpoint={tmp_path / 'bare'}", f"output={tmp_path / 'a'}"), "bare"),
        (("import-hf", f"hf_dir={tmp_path / 'nope'}", f"output={tmp_path / 'b'}"), "nope"),
        (
            ("import-hf", f"hf_dir={directory}", f"output={tmp_path / 'c'}", "dtype=float8"),
            "dtype='float8' is not one of float32, bfloat16, float16",
        ),
    ]
    for arguments, named in cases:
        result = _nemo("kd", *arguments, cwd=tmp_path)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert named in result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]
