"""The distillation YAML: defaults, validation messages, file errors, module-name checks."""

from __future__ import annotations

import re

import pytest
import yaml

from kd_module.distillation.config import (
    DistillConfig,
    check_module_names,
    check_pipeline_placement,
    layer_index,
    load_distill_config,
    local_module_name,
)

MEGATRON_EXAMPLE = """\
logit_layers: ["output_layer", "output_layer"]
intermediate_layer_pairs:
  - ["decoder.layers.0.input_layernorm", "decoder.layers.0.input_layernorm"]
  - ["decoder.final_layernorm", "decoder.layers.30.input_layernorm"]
skip_lm_loss: true
kd_loss_scale: 10.0
logit_kl_temperature: 1.0
"""


@pytest.fixture(scope="module")
def tiny_gpt():
    """A real 2-layer megatron GPTModel on one in-process gloo rank."""
    from kd_module.models.gpt import GPTModelConfig, build_model
    from kd_module.parallel import runtime

    runtime.initialize_distributed(1, 1)
    try:
        model = build_model(
            GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16),
            vocab_size=128,
        )
        yield model
    finally:
        runtime.destroy_distributed()


def test_defaults_are_megatron_logits_only():
    """No file means Megatron-LM's default: KL on output_layer logits, scale and temperature 1."""
    config = load_distill_config(None)
    assert config.logit_layers == ["output_layer", "output_layer"]
    assert config.intermediate_layer_pairs == []
    assert config.skip_lm_loss is True
    assert config.kd_loss_scale == 1.0
    assert config.logit_kl_temperature == 1.0
    assert config.logit_kl_topk is None
    assert config.logit_loss == "forward_kl"
    assert config.jsd_beta == 0.5


def test_megatron_lm_example_file_reads(tmp_path):
    """The example YAML from Megatron-LM's distillation README loads field by field."""
    path = tmp_path / "distill.yaml"
    path.write_text(MEGATRON_EXAMPLE)
    config = load_distill_config(str(path))
    assert config.intermediate_layer_pairs == [
        ["decoder.layers.0.input_layernorm", "decoder.layers.0.input_layernorm"],
        ["decoder.final_layernorm", "decoder.layers.30.input_layernorm"],
    ]
    assert config.kd_loss_scale == 10.0
    assert config.skip_lm_loss is True
    assert config.intermediate_loss_names() == ["cosine", "cosine"]
    assert config.student_intermediate_layers == [
        "decoder.layers.0.input_layernorm",
        "decoder.final_layernorm",
    ]
    assert config.teacher_intermediate_layers[1] == "decoder.layers.30.input_layernorm"


def test_to_dict_round_trips_through_yaml(tmp_path):
    """to_dict -> YAML file -> from_yaml gives an equal config, including the non-Megatron keys."""
    config = DistillConfig(
        logit_layers=["output_layer", "output_layer"],
        intermediate_layer_pairs=[["decoder.final_layernorm", "decoder.final_layernorm", "mse"]],
        skip_lm_loss=False,
        kd_loss_scale=2.5,
        logit_kl_temperature=3,
        logit_kl_topk=64,
        logit_loss="jsd",
        jsd_beta=0.25,
    )
    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    again = DistillConfig.from_yaml(path)
    assert again == config
    assert again.logit_kl_temperature == 3.0 and isinstance(again.logit_kl_temperature, float)


def test_load_accepts_dict_and_config():
    """A mapping is validated; a DistillConfig is returned unchanged; other types are refused."""
    config = load_distill_config({"logit_kl_temperature": 2.0})
    assert config.logit_kl_temperature == 2.0
    assert load_distill_config(config) is config
    with pytest.raises(TypeError, match="expected a YAML path, a mapping"):
        load_distill_config(3)


def test_tuples_are_normalized_to_lists():
    """Python callers may pass tuples; the config stores lists (what YAML gives)."""
    config = DistillConfig(logit_layers=("a", "b"), intermediate_layer_pairs=[("x", "y")])
    assert config.logit_layers == ["a", "b"]
    assert config.intermediate_layer_pairs == [["x", "y"]]


def test_unknown_key_names_file_and_suggests(tmp_path):
    """A misspelt key is refused with the file name and the closest real key."""
    path = tmp_path / "distill.yaml"
    path.write_text("logit_layer: [output_layer, output_layer]\n")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"distill config {path}: unknown key 'logit_layer' (did you mean 'logit_layers'?)"
        ),
    ):
        DistillConfig.from_yaml(path)


def test_all_problems_are_reported_at_once():
    """Unknown keys and bad values come back together in one ValueError."""
    with pytest.raises(ValueError) as info:
        DistillConfig.from_dict(
            {"kd_loss_scal": 2.0, "logit_kl_temperature": 0, "jsd_beta": 1.0},
            source="x.yaml",
        )
    message = str(info.value)
    assert message.startswith("distill config x.yaml: ")
    assert "unknown key 'kd_loss_scal' (did you mean 'kd_loss_scale'?)" in message
    assert "logit_kl_temperature=0 must be a number > 0" in message
    assert "jsd_beta=1.0 must be a number strictly between 0 and 1" in message
    assert message.count(";") == 2


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"skip_lm_loss": "yes"}, r"skip_lm_loss='yes' must be true or false"),
        ({"skip_lm_loss": 1}, r"skip_lm_loss=1 must be true or false"),
        ({"kd_loss_scale": True}, r"kd_loss_scale=True must be a number > 0"),
        ({"kd_loss_scale": -1.0}, r"kd_loss_scale=-1.0 must be a number > 0"),
        ({"kd_loss_scale": "10"}, r"kd_loss_scale='10' must be a number > 0"),
        ({"logit_kl_temperature": 0.0}, r"logit_kl_temperature=0.0 must be a number > 0"),
        ({"logit_kl_temperature": False}, r"logit_kl_temperature=False must be a number > 0"),
        ({"logit_kl_topk": 0}, r"logit_kl_topk=0 must be a positive integer or null"),
        ({"logit_kl_topk": 8.0}, r"logit_kl_topk=8.0 must be a positive integer or null"),
        ({"logit_kl_topk": True}, r"logit_kl_topk=True must be a positive integer or null"),
        (
            {"logit_loss": "reverse-kl"},
            r"logit_loss='reverse-kl' is not one of forward_kl, reverse_kl, jsd "
            r"\(did you mean 'reverse_kl'",
        ),
        ({"jsd_beta": 0}, r"jsd_beta=0 must be a number strictly between 0 and 1"),
        ({"jsd_beta": True}, r"jsd_beta=True must be a number strictly between 0 and 1"),
        ({"logit_layers": ["output_layer"]}, r"logit_layers=\['output_layer'\] must be a list of"),
        ({"logit_layers": "output_layer"}, r"logit_layers='output_layer' must be a list of exac"),
        ({"logit_layers": ["a", 3]}, r"logit_layers=\['a', 3\] must be a list of exactly 2"),
        ({"intermediate_layer_pairs": "a"}, r"intermediate_layer_pairs='a' must be a list of"),
        (
            {"intermediate_layer_pairs": [["a"]]},
            r"intermediate_layer_pairs\[0\]=\['a'\] must be \[student_module, teacher_module\]",
        ),
        (
            {"intermediate_layer_pairs": [["a", "b"], ["a", "b", "cos", "x"]]},
            r"intermediate_layer_pairs\[1\]=\['a', 'b', 'cos', 'x'\] must be",
        ),
        (
            {"intermediate_layer_pairs": [["a", 1]]},
            r"intermediate_layer_pairs\[0\]=\['a', 1\]: module names must be non-empty strings",
        ),
        (
            {"intermediate_layer_pairs": [["a", "b", "cosin"]]},
            r"intermediate_layer_pairs\[0\]: loss 'cosin' is not one of cosine, mse "
            r"\(did you mean 'cosine'\?\)",
        ),
    ],
)
def test_bad_values_are_named(changes, pattern):
    """Each bad value is refused with its key, the value and what is allowed."""
    with pytest.raises(ValueError, match=r"^distill config: .*" + pattern):
        DistillConfig(**changes)
    with pytest.raises(ValueError, match=r"^distill config f\.yaml: .*" + pattern):
        DistillConfig.from_dict(changes, source="f.yaml")


def test_missing_file_is_named(tmp_path):
    """A path that does not exist raises FileNotFoundError naming it."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=rf"distill config {path}: no such file"):
        load_distill_config(path)


def test_unparsable_yaml_names_file_and_line(tmp_path):
    """A YAML syntax error names the file and the 1-based line of the problem."""
    path = tmp_path / "broken.yaml"
    path.write_text("skip_lm_loss: true\nlogit_layers: [output_layer, output_layer\nkd: 1\n")
    with pytest.raises(ValueError, match=rf"distill config {path}: not valid YAML at line 3"):
        DistillConfig.from_yaml(path)


def test_top_level_must_be_mapping(tmp_path):
    """A YAML list at the top level is refused, naming the file and what was found."""
    path = tmp_path / "list.yaml"
    path.write_text("- output_layer\n- output_layer\n")
    with pytest.raises(
        ValueError, match=rf"distill config {path}: the top level must be a mapping.*got list"
    ):
        DistillConfig.from_yaml(path)


def test_empty_file_gives_defaults(tmp_path):
    """An empty YAML file is the default config."""
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert DistillConfig.from_yaml(path) == DistillConfig()


def test_module_names_found_in_real_gpt(tiny_gpt):
    """Names from megatron's GPTModel (the README's examples) pass the check."""
    names = [
        "output_layer",
        "decoder.final_layernorm",
        "decoder.layers.0.input_layernorm",
        "decoder.layers.1.mlp",
    ]
    assert check_module_names(tiny_gpt, names, "student") == []


def test_module_name_typos_suggest_real_names(tiny_gpt):
    """Missing names are reported one by one with the closest real submodule names."""
    problems = check_module_names(
        tiny_gpt,
        ["decoder.layer.0.input_layernorm", "output_layer", "decoder.final_norm", "zzz"],
        "student",
    )
    assert len(problems) == 3
    assert problems[0].startswith(
        "student has no submodule 'decoder.layer.0.input_layernorm' (did you mean "
        "'decoder.layers.0.input_layernorm'"
    )
    assert "'decoder.final_layernorm'" in problems[1]
    assert problems[1].startswith("student has no submodule 'decoder.final_norm'")
    assert problems[2] == "student has no submodule 'zzz'"
    # At most three suggestions per name.
    assert problems[0].count(" or ") <= 2


def test_module_name_beyond_last_layer_is_missing(tiny_gpt):
    """The tiny model has layers 0 and 1 only; layer 2 is reported for the teacher."""
    problems = check_module_names(tiny_gpt, ["decoder.layers.2.input_layernorm"], "teacher")
    assert problems and problems[0].startswith(
        "teacher has no submodule 'decoder.layers.2.input_layernorm'"
    )


def test_layer_index_parsing():
    """Layer indices are read from '.layers.N.' and 'layers.N'; other names have none."""
    assert layer_index("decoder.layers.30.input_layernorm") == 30
    assert layer_index("decoder.layers.7") == 7
    assert layer_index("module.decoder.layers.12.mlp.linear_fc1") == 12
    assert layer_index("decoder.final_layernorm") is None
    assert layer_index("output_layer") is None
    assert layer_index("decoder.mylayers.3") is None


def test_pipeline_placement_last_stage_only():
    """With 8 layers on 4 stages only indices 6-7 (and unindexed names) are on the last stage."""
    names = [
        "decoder.layers.6.input_layernorm",
        "decoder.layers.7.mlp",
        "decoder.final_layernorm",
        "decoder.layers.5.input_layernorm",
        "decoder.layers.0.self_attention",
    ]
    problems = check_pipeline_placement(names, 8, 4, "teacher")
    assert problems == [
        "teacher intermediate layer 'decoder.layers.5.input_layernorm' is on pipeline stage 2 "
        "of 4; distillation losses are computed on the last stage only, which holds layers "
        "6 to 7",
        "teacher intermediate layer 'decoder.layers.0.self_attention' is on pipeline stage 0 "
        "of 4; distillation losses are computed on the last stage only, which holds layers "
        "6 to 7",
    ]
    assert check_pipeline_placement(names, 8, 1, "teacher") == []


def test_pipeline_placement_out_of_range_and_bad_split():
    """An index past the last layer is reported; an uneven split is refused."""
    assert check_pipeline_placement(["decoder.layers.32.mlp"], 32, 2, "student") == [
        "student intermediate layer 'decoder.layers.32.mlp': layer 32 does not exist "
        "(num_layers=32, indices 0 to 31)"
    ]
    with pytest.raises(ValueError, match=r"num_layers=6 must be a positive multiple of .*=4"):
        check_pipeline_placement([], 6, 4, "student")


def test_local_module_name_on_last_stage():
    """Global index 30 of 32 layers on 2 stages is local index 14; unindexed names are kept."""
    assert local_module_name("decoder.layers.30.input_layernorm", 32, 2) == (
        "decoder.layers.14.input_layernorm"
    )
    assert local_module_name("decoder.layers.30.input_layernorm", 32, 1) == (
        "decoder.layers.30.input_layernorm"
    )
    assert local_module_name("decoder.final_layernorm", 32, 4) == "decoder.final_layernorm"
    with pytest.raises(ValueError, match="is on pipeline stage 0 of 2"):
        local_module_name("decoder.layers.3.mlp", 32, 2)
