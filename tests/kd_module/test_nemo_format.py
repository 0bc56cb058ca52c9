"""NeMo-style teacher model_config.yaml -> megatron GPTModelConfig, and back."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import tarfile
from pathlib import Path

import pytest
import yaml

from kd_module.models.gpt import GPTModelConfig
from kd_module.nemo_format.discovery import load_teacher_model_config
from kd_module.nemo_format.keys import (
    CONVERSION_TABLE,
    PARALLELISM_KEYS,
    TRAINING_ONLY_KEYS,
    conversion_table_markdown,
)
from kd_module.nemo_format.reader import TeacherModelConfig, convert_nemo_model_config
from kd_module.nemo_format.writer import to_nemo_model_config

DATA = Path(__file__).parent / "data_files"
LLAMA31_8B = DATA / "llama31_8b_model_config.yaml"
LLAMA31_8B_TRAINING = DATA / "megatron_llama31_8b_training.yaml"
LOGGER = "kd_module.nemo_format"

# A student unlike the teacher in every field the file sets, and with values the file does not
# set (transformer_impl, init) that the teacher must inherit.
STUDENT = GPTModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=128,
    num_query_groups=2,
    kv_channels=32,
    seq_length=128,
    normalization="LayerNorm",
    layernorm_epsilon=1e-6,
    activation="gelu",
    add_bias_linear=True,
    position_embedding_type="learned_absolute",
    rotary_base=10000,
    share_embeddings_and_output_weights=True,
    init_method_std=0.01,
    make_vocab_size_divisible_by=64,
    transformer_impl="local",
)


def _convert(data: dict, student: GPTModelConfig = STUDENT) -> TeacherModelConfig:
    return convert_nemo_model_config(data, student, source="t.yaml")


def _error(data: dict, student: GPTModelConfig = STUDENT) -> str:
    with pytest.raises(ValueError) as info:
        _convert(data, student)
    return str(info.value)


@pytest.fixture(scope="module")
def llama() -> TeacherModelConfig:
    return load_teacher_model_config(LLAMA31_8B, STUDENT)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("seq_length", 8192),  # encoder_seq_length
        ("max_position_embeddings", 8192),
        ("num_layers", 32),
        ("hidden_size", 4096),
        ("ffn_hidden_size", 14336),
        ("num_attention_heads", 32),
        ("num_query_groups", 8),
        ("kv_channels", None),  # null in the file, and never the student's 32
        ("add_bias_linear", False),  # bias
        ("activation", "fast-swiglu"),
        ("normalization", "RMSNorm"),  # rmsnorm
        ("layernorm_zero_centered_gamma", False),
        ("layernorm_epsilon", 1e-5),  # "1e-05" is a string to YAML 1.1
        ("position_embedding_type", "rope"),
        ("rotary_percent", 1.0),  # rotary_percentage
        ("rotary_base", 500000),  # written as 500000.0
        ("share_embeddings_and_output_weights", False),
        ("init_method_std", 0.02),
        ("hidden_dropout", 0.0),
        ("attention_dropout", 0.0),
        ("apply_query_key_layer_scaling", False),
        ("masked_softmax_fusion", True),
        ("make_vocab_size_divisible_by", 128),
        ("transformer_impl", "local"),  # not in the file: the student's
        ("vocab_size", None),  # from the tokenizer at build time
    ],
)
def test_llama31_8b_key_by_key(llama, field, expected):
    """Each field of the NeMo Llama-3.1-8B model_config.yaml lands in the megatron field."""
    value = getattr(llama.model, field)
    assert value == expected
    assert type(value) is type(expected)


def test_llama31_8b_precision_tokenizer_and_ignored(llama):
    """precision bf16-mixed -> bfloat16; tokenizer section kept; ignored keys in file order."""
    assert llama.precision == "bfloat16"
    assert llama.tokenizer == {
        "library": "huggingface",
        "type": "meta-llama/Llama-3.1-8B",
        "model": None,
        "vocab_file": None,
        "merge_file": None,
        "delimiter": None,
        "sentencepiece_legacy": False,
        "use_fast": True,
    }
    assert llama.source == str(LLAMA31_8B)
    assert llama.ignored_keys[:4] == [
        "micro_batch_size",
        "global_batch_size",
        "rampup_batch_size",
        "tensor_model_parallel_size",
    ]
    assert {"optim", "data", "nemo_version", "target", "sequence_parallel"} <= set(
        llama.ignored_keys
    )
    assert len(llama.ignored_keys) == 55
    assert llama.model.extra == {"fp32_residual_connection": False}


def test_model_wrapped_training_config(caplog):
    """A NeMo 1 training config: the model: section is read, ${.key} resolved, trainer precision
    used, and the trainer/exp_manager sections are not looked at."""
    with caplog.at_level(logging.INFO, logger=LOGGER):
        teacher = load_teacher_model_config(LLAMA31_8B_TRAINING, STUDENT)
    model = teacher.model
    assert (model.seq_length, model.max_position_embeddings) == (8192, 8192)
    assert (model.num_layers, model.hidden_size, model.ffn_hidden_size) == (32, 4096, 14336)
    assert (model.num_attention_heads, model.num_query_groups) == (32, 8)
    assert model.activation == "swiglu"
    assert model.layernorm_epsilon == 1e-5
    assert model.rotary_base == 500000
    assert teacher.precision == "bfloat16"
    assert teacher.tokenizer["type"] == "meta-llama/Llama-3.1-8B"
    assert teacher.ignored_keys == [
        "micro_batch_size",
        "global_batch_size",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "data",
        "optim",
    ]
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert not any("trainer" in m or "exp_manager" in m for m in messages)


def test_ignored_keys_logged_once(caplog):
    """Training-only keys: one INFO line listing them; parallelism keys: one WARNING saying the
    teacher uses the student's layout; Llama 3.1 RoPE scaling is applied, not warned about."""
    with caplog.at_level(logging.INFO, logger=LOGGER):
        converted = load_teacher_model_config(LLAMA31_8B, STUDENT)
    records = [r for r in caplog.records if r.name == LOGGER]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(infos) == 1
    assert infos[0].startswith(f"teacher model config {LLAMA31_8B}: ignored 49 training-only keys:")
    assert (
        "micro_batch_size, global_batch_size, rampup_batch_size, use_scaled_init_method"
        in (infos[0])
    )
    assert "optim" in infos[0] and "tensor_model_parallel_size" not in infos[0]
    assert len(warnings) == 1
    assert converted.model.rope_scaling is True
    parallel = [w for w in warnings if "parallelism" in w]
    assert parallel == [
        f"teacher model config {LLAMA31_8B}: ignored parallelism keys "
        "tensor_model_parallel_size=8, pipeline_model_parallel_size=1, "
        "virtual_pipeline_model_parallel_size=None, context_parallel_size=1, "
        "expert_model_parallel_size=1, sequence_parallel=False; the teacher uses the student's "
        "parallel layout"
    ]


def test_no_log_lines_for_a_pure_architecture_file(caplog):
    """A file with architecture keys only logs nothing."""
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _convert({"num_layers": 4, "hidden_size": 64})
    assert [r for r in caplog.records if r.name == LOGGER] == []


def test_student_values_kept_where_file_is_silent():
    """Keys the file does not set keep the student's values; kv_channels is recomputed."""
    teacher = _convert({"num_layers": 4}).model
    expected = dataclasses.replace(STUDENT, num_layers=4, kv_channels=None)
    assert teacher == expected
    assert _convert({"kv_channels": 8}).model.kv_channels == 8


@pytest.mark.parametrize(
    ("value", "normalization", "zero_centered"),
    [
        ("layernorm", "LayerNorm", False),
        ("layernorm1p", "LayerNorm", True),
        ("rmsnorm", "RMSNorm", False),
        ("RMSNorm", "RMSNorm", False),  # NeMo 2 / megatron spelling
        ("LayerNorm", "LayerNorm", False),
    ],
)
def test_normalization_names(value, normalization, zero_centered):
    """NeMo normalization names map to megatron's, layernorm1p to zero-centered gamma."""
    student = dataclasses.replace(STUDENT, layernorm_zero_centered_gamma=True)
    model = _convert({"normalization": value}, student).model
    assert (model.normalization, model.layernorm_zero_centered_gamma) == (
        normalization,
        zero_centered,
    )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"activation": "gelu"}, "gelu"),
        ({"activation": "fast-gelu"}, "fast-gelu"),
        ({"activation": "gelu", "openai_gelu": True}, "fast-gelu"),
        ({"activation": "swiglu"}, "swiglu"),
        ({"activation": "fast-swiglu"}, "fast-swiglu"),
        ({"activation": "geglu"}, "geglu"),
        ({"activation": "squared-relu"}, "squared-relu"),
        ({"openai_gelu": False}, "gelu"),  # the student's
        # NeMo 2: the function and the gate come separately
        (
            {
                "activation_func": {"_target_": "torch.nn.functional.silu"},
                "gated_linear_unit": True,
            },
            "swiglu",
        ),
        ({"activation_func": "torch.nn.functional.gelu", "gated_linear_unit": True}, "geglu"),
        ({"activation_func": "torch.nn.functional.gelu", "gated_linear_unit": False}, "gelu"),
        ({"activation_func": "megatron.core.activations.squared_relu"}, "squared-relu"),
        ({"activation_func": "megatron.core.fusions.fused_bias_gelu.openai_gelu"}, "fast-gelu"),
        ({"gated_linear_unit": True}, "geglu"),  # gated form of the student's gelu
        ({"activation": "geglu", "gated_linear_unit": False}, "gelu"),
    ],
)
def test_activation_names(keys, expected):
    """NeMo 1 activation names and NeMo 2 activation_func + gated_linear_unit resolve."""
    assert _convert(keys).model.activation == expected


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (16, "float16"),
        ("16-mixed", "float16"),
        ("fp16", "float16"),
        ("bf16", "bfloat16"),
        ("bf16-mixed", "bfloat16"),
        ("bf16-true", "bfloat16"),
        (32, "float32"),
        ("32", "float32"),
        ("fp32", "float32"),
        ("32-true", "float32"),
    ],
)
def test_precision_names(value, dtype):
    """NeMo/Lightning precision spellings give a torch dtype name, not a model field."""
    teacher = _convert({"precision": value})
    assert teacher.precision == dtype
    assert teacher.model == dataclasses.replace(STUDENT, kv_channels=None)


def test_nemo2_model_yaml():
    """A NeMo 2 context/model.yaml: config: section, megatron-style names, bf16 flag, tokenizer
    beside the config."""
    data = {
        "_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel",
        "config": {
            "_target_": "nemo.collections.llm.gpt.model.llama.Llama32Config1B",
            "num_layers": 16,
            "hidden_size": 2048,
            "ffn_hidden_size": 8192,
            "num_attention_heads": 32,
            "num_query_groups": 8,
            "seq_length": 8192,
            "normalization": "RMSNorm",
            "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
            "gated_linear_unit": True,
            "add_bias_linear": False,
            "qk_layernorm": True,
            "rotary_percent": 0.5,
            "rotary_base": 500000,
            "position_embedding_type": "rope",
            "share_embeddings_and_output_weights": True,
            "bf16": True,
            "fp16": False,
            "params_dtype": {"_target_": "torch.bfloat16", "_call_": False},
            "tensor_model_parallel_size": 1,
            "transformer_layer_spec": {"_target_": "some.spec"},
        },
        "tokenizer": {"_target_": "nemo.collections.common.tokenizers.AutoTokenizer"},
    }
    teacher = _convert(data)
    model = teacher.model
    assert (model.num_layers, model.hidden_size, model.seq_length) == (16, 2048, 8192)
    assert (model.normalization, model.activation) == ("RMSNorm", "swiglu")
    assert (model.add_bias_linear, model.qk_layernorm, model.rotary_percent) == (False, True, 0.5)
    assert teacher.precision == "bfloat16"
    assert teacher.tokenizer == {"_target_": "nemo.collections.common.tokenizers.AutoTokenizer"}
    assert teacher.ignored_keys == [
        "_target_",
        "tensor_model_parallel_size",
        "transformer_layer_spec",
    ]


def test_params_dtype_alone_gives_precision():
    """NeMo 2 params_dtype without bf16/fp16 flags sets the precision."""
    assert _convert({"params_dtype": "torch.float16"}).precision == "float16"
    assert _convert({"bf16": False, "fp16": False}).precision is None


def test_megatron_names_pass_through():
    """GPTModelConfig fields and TransformerConfig extras in megatron names are taken as is."""
    teacher = _convert(
        {
            "add_qkv_bias": True,
            "qkv_bias": True,
            "layernorm_zero_centered_gamma": True,
            "transformer_impl": "auto",
            "vocab_size": 256,
            "rotary_interleaved": True,
            "extra": {"attention_softmax_in_fp32": True},
        }
    ).model
    assert teacher.add_qkv_bias is True
    assert teacher.layernorm_zero_centered_gamma is True
    assert teacher.transformer_impl == "auto"
    assert teacher.vocab_size == 256
    assert teacher.extra == {"rotary_interleaved": True, "attention_softmax_in_fp32": True}


def test_unknown_key_names_file_and_suggests():
    """A misspelt architecture key is an error naming the file, the key and the closest key."""
    with pytest.raises(
        ValueError,
        match=re.escape(
            "teacher model config t.yaml: unknown key 'num_layer' (did you mean 'num_layers'?)"
        ),
    ):
        _convert({"num_layer": 4})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"activation": "swigluu"},
            "activation='swigluu' is not one of gelu, fast-gelu, swiglu, fast-swiglu, geglu, "
            "squared-relu, relu (did you mean 'swiglu'",
        ),
        (
            {"normalization": "batchnorm"},
            "normalization='batchnorm' is not one of layernorm, layernorm1p, rmsnorm",
        ),
        (
            {"position_embedding_type": "alibi"},
            "position_embedding_type='alibi' is not one of learned_absolute, rope, none",
        ),
        ({"precision": "bf17"}, "precision='bf17' is not one of 16, 16-mixed"),
        ({"precision": 64}, "precision=64 is not one of 16, 16-mixed"),
        ({"bias": "no"}, "bias (-> add_bias_linear)='no' must be true or false"),
        ({"num_layers": 0}, "num_layers=0 must be a positive integer"),
        ({"hidden_size": True}, "hidden_size=True must be a positive integer"),
        ({"num_query_groups": 2.5}, "num_query_groups=2.5 must be a positive integer or null"),
        ({"layernorm_epsilon": "tiny"}, "layernorm_epsilon='tiny' must be a non-negative number"),
        ({"headscale": True}, "headscale=True is not supported (head scaling is not in"),
        (
            {"transformer_block_type": "post_ln"},
            "transformer_block_type='post_ln' is not supported (megatron-core's GPT is "
            "pre-LayerNorm); allowed: pre_ln",
        ),
        ({"mcore_gpt": False}, "mcore_gpt=False is not supported"),
        ({"num_moe_experts": 8}, "num_moe_experts=8 is not supported (mixture-of-experts"),
        ({"tokenizer": "llama"}, "tokenizer='llama' must be a mapping"),
        ({"openai_gelu": "yes"}, "openai_gelu='yes' must be true or false"),
        ({"gated_linear_unit": 1}, "gated_linear_unit=1 must be true or false"),
        (
            {"activation": "squared-relu", "gated_linear_unit": True},
            "gated_linear_unit=true with activation 'squared-relu': no gated form",
        ),
        (
            {"activation_func": "torch.nn.functional.tanh"},
            "activation_func='torch.nn.functional.tanh' is not one of gelu, openai_gelu",
        ),
        (
            {"activation_func": "torch.nn.functional.silu", "gated_linear_unit": False},
            "activation_func=silu with gated_linear_unit=false (plain SiLU) is not supported",
        ),
        ({"params_dtype": "torch.int8"}, "params_dtype='torch.int8' is not one of torch.bfloat16"),
        ({"bf16": "yes"}, "bf16='yes' must be true or false"),
        ({"rotary_interleaved": 1}, "rotary_interleaved=1 must be true or false"),
        ({"scale_positional_embedding": "on"}, "scale_positional_embedding='on' must be true or"),
        (
            {"encoder_seq_length": 8192, "max_position_embeddings": "${multiply:2,4096}"},
            "max_position_embeddings='${multiply:2,4096}': only ${.key} interpolations",
        ),
        (
            {"num_attention_heads": 5},
            "the teacher architecture is invalid: model config: hidden_size=64 is not divisible "
            "by num_attention_heads=5 (set kv_channels)",
        ),
    ],
)
def test_bad_values_are_named(data, message):
    """Each bad value names the file, the key, the value and what is allowed."""
    with pytest.raises(ValueError, match=r"^teacher model config t\.yaml: .*" + re.escape(message)):
        _convert(data)


def test_all_problems_reported_at_once():
    """Unknown keys and bad values of one file come back in one ValueError."""
    message = _error({"hiden_size": 8, "activation": "relu2", "normalization": "bn", "bias": 1})
    assert message.count(";") == 3
    assert "unknown key 'hiden_size' (did you mean 'hidden_size'?)" in message
    assert "activation='relu2'" in message
    assert "normalization='bn'" in message
    assert "bias (-> add_bias_linear)=1" in message


def test_missing_explicit_file(tmp_path):
    """An explicit path that does not exist is an error naming it (as in Megatron-LM)."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(f"teacher model config {path}: no such")):
        load_teacher_model_config(path, STUDENT)
    with pytest.raises(FileNotFoundError, match="is a directory; pass the YAML file, or the"):
        load_teacher_model_config(tmp_path, STUDENT)


def test_unparsable_yaml_names_line(tmp_path):
    """A syntax error names the file and the line."""
    path = tmp_path / "model_config.yaml"
    path.write_text("num_layers: 4\nhidden_size: [64\nbias: false\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid YAML at line 3")):
        load_teacher_model_config(path, STUDENT)


def test_top_level_not_mapping(tmp_path):
    """A top-level list is refused with the file name."""
    path = tmp_path / "model_config.yaml"
    path.write_text("- num_layers\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: the top level must be a mapping")):
        load_teacher_model_config(path, STUDENT)
    with pytest.raises(ValueError, match=r"^teacher model config <dict>: the top level must be"):
        convert_nemo_model_config([1], STUDENT)


def test_checkpoint_directory_lookup(tmp_path, caplog):
    """Without a path, model_config.yaml at the checkpoint root is read; a NeMo 2 checkpoint's
    context/model.yaml next; otherwise the student's architecture is reused, with a log line."""
    root = tmp_path / "teacher"
    root.mkdir()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        reused = load_teacher_model_config(None, STUDENT, teacher_checkpoint=root)
    assert reused == TeacherModelConfig(model=STUDENT)
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"teacher model config: no file given and none found in {root}; the teacher reuses "
        "the student's architecture"
    ]

    (root / "context").mkdir()
    (root / "context" / "model.yaml").write_text(
        yaml.safe_dump({"_target_": "LlamaModel", "config": {"num_layers": 6}})
    )
    nemo2 = load_teacher_model_config(None, STUDENT, teacher_checkpoint=root)
    assert (nemo2.model.num_layers, nemo2.source) == (6, str(root / "context" / "model.yaml"))

    (root / "model_config.yaml").write_text("num_layers: 8\n")
    found = load_teacher_model_config(None, STUDENT, teacher_checkpoint=root)
    assert (found.model.num_layers, found.source) == (8, str(root / "model_config.yaml"))

    explicit = tmp_path / "other.yaml"
    explicit.write_text("num_layers: 10\n")
    chosen = load_teacher_model_config(explicit, STUDENT, teacher_checkpoint=root)
    assert chosen.model.num_layers == 10


def test_no_config_and_no_checkpoint_reuses_student(caplog):
    """Neither a path nor a checkpoint: the student's architecture, said in a log line."""
    with caplog.at_level(logging.INFO, logger=LOGGER):
        teacher = load_teacher_model_config(None, STUDENT)
    assert teacher.model is STUDENT and teacher.source is None
    assert "reuses the student's architecture" in caplog.records[-1].getMessage()


def test_nemo_archive_lookup(tmp_path):
    """A NeMo 1 .nemo tar archive's ./model_config.yaml is read."""
    archive = tmp_path / "teacher.nemo"
    payload = LLAMA31_8B.read_bytes()
    with tarfile.open(archive, "w:") as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    teacher = load_teacher_model_config(None, STUDENT, teacher_checkpoint=archive)
    assert (teacher.model.num_layers, teacher.model.num_query_groups) == (32, 8)
    assert teacher.source == f"{archive}:model_config.yaml"


@pytest.mark.parametrize(
    "model",
    [
        load_teacher_model_config(LLAMA31_8B, STUDENT).model,
        GPTModelConfig(
            num_layers=3,
            hidden_size=48,
            num_attention_heads=6,
            normalization="LayerNorm",
            layernorm_zero_centered_gamma=True,
            activation="squared-relu",
            add_qkv_bias=True,
            rotary_percent=0.5,
            position_embedding_type="rope",
            vocab_size=512,
            extra={"rotary_interleaved": True},
        ),
        STUDENT,
    ],
    ids=["llama31_8b", "layernorm1p", "student"],
)
def test_round_trip_through_yaml(tmp_path, model):
    """to_nemo_model_config -> model_config.yaml -> load gives the same architecture, from any
    student, with precision and tokenizer kept."""
    path = tmp_path / "model_config.yaml"
    tokenizer = {"library": "huggingface", "type": "meta-llama/Llama-3.2-1B"}
    path.write_text(yaml.safe_dump(to_nemo_model_config(model, "bfloat16", tokenizer)))
    for student in (STUDENT, GPTModelConfig()):
        again = load_teacher_model_config(path, student)
        assert again.model == model
        assert again.precision == "bfloat16"
        assert again.tokenizer == tokenizer
        assert again.ignored_keys == []


def test_to_nemo_uses_nemo_names():
    """The export writes NeMo 1 names (encoder_seq_length, bias, rotary_percentage, rmsnorm)."""
    out = to_nemo_model_config(load_teacher_model_config(LLAMA31_8B, STUDENT).model, "float16")
    assert out["encoder_seq_length"] == 8192
    assert out["bias"] is False
    assert out["rotary_percentage"] == 1.0
    assert out["normalization"] == "rmsnorm"
    assert out["activation"] == "fast-swiglu"
    assert out["precision"] == "16-mixed"
    assert "tokenizer" not in out


def test_converted_teacher_builds_in_megatron(single_rank):
    """A tiny file in the Llama style builds a megatron GPTModel with GQA, gated MLP, RMSNorm,
    no biases and an untied output layer."""
    from megatron.core.models.gpt import GPTModel

    from kd_module.models.gpt import build_model

    teacher = _convert(
        {
            "encoder_seq_length": 32,
            "max_position_embeddings": 32,
            "num_layers": 2,
            "hidden_size": 64,
            "ffn_hidden_size": 96,
            "num_attention_heads": 8,
            "num_query_groups": 2,
            "normalization": "rmsnorm",
            "activation": "swiglu",
            "bias": False,
            "position_embedding_type": "rope",
            "share_embeddings_and_output_weights": False,
        }
    )
    model = build_model(teacher.model, vocab_size=128)
    assert isinstance(model, GPTModel)
    layer = model.decoder.layers[0]
    head_dim = 64 // 8
    assert tuple(layer.self_attention.linear_qkv.weight.shape) == (64 + 2 * 2 * head_dim, 64)
    assert layer.self_attention.linear_qkv.bias is None
    assert tuple(layer.mlp.linear_fc1.weight.shape) == (2 * 96, 64)  # gated: two halves
    assert "RMSNorm" in type(model.decoder.final_layernorm).__name__
    assert model.output_layer.weight is not None
    assert model.output_layer.weight is not model.embedding.word_embeddings.weight
    assert model.config.gated_linear_unit is True


def test_key_sets_are_disjoint_and_table_renders():
    """No key is both training-only and parallelism or a model field; the table renders a row
    per entry and its single-key NeMo names are all understood."""
    fields = {f.name for f in dataclasses.fields(GPTModelConfig)}
    assert not TRAINING_ONLY_KEYS & PARALLELISM_KEYS
    assert not (TRAINING_ONLY_KEYS | PARALLELISM_KEYS) & fields
    table = conversion_table_markdown()
    assert table.splitlines()[0] == "| NeMo key | megatron `GPTModelConfig` field | Notes |"
    assert len(table.splitlines()) == len(CONVERSION_TABLE) + 2
    single_keys = [k for k, _, _ in CONVERSION_TABLE if re.fullmatch(r"[a-z_0-9]+", k)]
    assert len(single_keys) >= 25
    for key in single_keys:
        message = ""
        try:
            _convert({key: None})
        except ValueError as error:
            message = str(error)
        assert "unknown key" not in message, key
