"""Recipes are configuration: inspected without building, defaults, overrides, bad arguments."""

from __future__ import annotations

import fiddle as fdl
import lightning
import nemo_run as run
import pytest

from kd_module.api import distill
from kd_module.data.datamodule import GPTDataModule
from kd_module.lightning_factories import gpt_data_module, lightning_trainer, megatron_strategy
from kd_module.models.gpt import GPTModelConfig
from kd_module.specs import OfflineConfig, RunConfig, TeacherSpec
from kd_module.training.strategy import MegatronStrategy
from recipes import llama31_8b_to_llama32_1b, qwen3_8b_to_qwen3_1p7b, tiny_cpu
from recipes.distill_recipe import distill_recipe, offline_config, run_config, teacher_spec

PAIR_MODULES = (llama31_8b_to_llama32_1b, qwen3_8b_to_qwen3_1p7b)
ALL_MODULES = (tiny_cpu, *PAIR_MODULES)


def _factory(module):
    return getattr(module, module.NAME)


def _student():
    return run.Config(GPTModelConfig, num_layers=2, hidden_size=64, num_attention_heads=4)


def _parameters(config: GPTModelConfig) -> dict[str, int]:
    """Parameters of a pre-norm GPT with RMSNorm, SwiGLU, GQA and no biases (a reference count).

    Returns ``{"total", "non_embedding"}`` as the model cards count them (the output layer
    counts as embedding when untied).
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = config.kv_channels or hidden // heads
    groups = config.num_query_groups or heads
    attention = hidden * head_dim * (2 * heads + 2 * groups)  # q, o and k, v projections
    qk_norm = 2 * head_dim if config.qk_layernorm else 0
    mlp = 3 * hidden * config.ffn_hidden_size  # gate, up, down
    layer = attention + qk_norm + mlp + 2 * hidden  # two norms
    non_embedding = config.num_layers * layer + hidden  # final norm
    embedding = config.vocab_size * hidden
    if not config.share_embeddings_and_output_weights:
        embedding *= 2
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def test_every_recipe_is_a_partial_of_distill_made_of_configs():
    """Each pair recipe returns run.Partial(distill) whose pieces are unbuilt run.Config."""
    for module in ALL_MODULES:
        recipe = _factory(module)()
        assert isinstance(recipe, run.Partial), module.NAME
        assert recipe.__fn_or_cls__ is distill
        assert isinstance(recipe.student, run.Config)
        assert recipe.student.__fn_or_cls__ is GPTModelConfig
        assert recipe.trainer.__fn_or_cls__ is lightning_trainer
        assert recipe.trainer.strategy.__fn_or_cls__ is megatron_strategy
        assert recipe.data.__fn_or_cls__ is gpt_data_module
        assert recipe.trainer.logger is False and recipe.trainer.num_sanity_val_steps == 0


def test_recipes_are_registered_as_distill_factories_under_their_name():
    """`--factory NAME` finds each module's recipe through nemo-run's registry."""
    for module in ALL_MODULES:
        factory = run.cli.resolve_factory(distill, module.NAME)
        assert factory.wrapped is _factory(module).wrapped


def test_generic_recipe_defaults():
    """distill_recipe's defaults: 1 node x 8 GPUs, bf16, mock data, runs/<name>, 1000 steps."""
    recipe = distill_recipe(teacher_spec("/ckpt/teacher"), _student())
    trainer = recipe.trainer
    assert (trainer.num_nodes, trainer.devices, trainer.accelerator) == (1, 8, "gpu")
    assert (trainer.max_steps, trainer.val_check_interval, trainer.limit_val_batches) == (
        1000,
        100,
        32,
    )
    assert trainer.enable_checkpointing is False and trainer.callbacks == []
    assert trainer.strategy.precision == "bf16"
    assert trainer.strategy.tensor_model_parallel_size == 1
    assert recipe.data.mock is True and recipe.data.paths is None
    assert recipe.data.seq_length == 128  # the student's seq_length (GPTModelConfig default)
    job = fdl.build(recipe.job)
    assert (job.log_dir, job.name, job.checkpoint_every_n_steps, job.resume) == (
        "runs",
        "default",
        None,
        False,
    )
    assert fdl.build(recipe.teacher) == TeacherSpec(checkpoint="/ckpt/teacher")
    assert recipe.optimizer.lr == 1e-4 and recipe.optimizer.warmup_steps == 50
    assert recipe.offline is None


def test_generic_recipe_arguments_and_attribute_overrides():
    """Arguments reach the right pieces; attribute overrides change the config in place."""
    recipe = distill_recipe(
        teacher_spec("/ckpt/teacher", GPTModelConfig(num_layers=4)),
        _student(),
        job=run_config("/results", "exp1"),
        student_path="/ckpt/student",
        distill_config="distill.yaml",
        num_nodes=2,
        num_gpus_per_node=4,
        data_paths=["/data/a", "/data/b"],
        tensor_model_parallel_size=2,
        global_batch_size=16,
        seq_length=64,
    )
    assert (recipe.trainer.num_nodes, recipe.trainer.devices) == (2, 4)
    assert recipe.trainer.strategy.tensor_model_parallel_size == 2
    assert recipe.teacher.config.__fn_or_cls__ is GPTModelConfig
    assert recipe.teacher.config.num_layers == 4
    assert recipe.student_checkpoint == "/ckpt/student"
    assert recipe.distill_config == "distill.yaml"
    assert (recipe.job.log_dir, recipe.job.name, recipe.trainer.default_root_dir) == (
        "/results",
        "exp1",
        "/results",
    )
    assert recipe.data.paths == ["/data/a", "/data/b"] and recipe.data.mock is False
    assert recipe.data.seq_length == 64 and recipe.data.global_batch_size == 16
    recipe.trainer.max_steps = 7
    recipe.student.num_layers = 3
    built_student = fdl.build(recipe.student)
    assert isinstance(built_student, GPTModelConfig) and built_student.num_layers == 3
    assert recipe.trainer.max_steps == 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_nodes": 0}, r"num_nodes=0 must be a positive integer"),
        ({"num_gpus_per_node": 2.5}, r"num_gpus_per_node=2.5 must be a positive integer"),
        ({"student_config": None}, r"student_config is required"),
        ({"accelerator": "tpu"}, r"accelerator='tpu' is not one of gpu, cpu"),
        ({"precision": "fp8"}, r"precision='fp8' is not one of fp32, bf16"),
        ({"accelerator": "cpu"}, r"precision='bf16' needs accelerator='gpu'"),
        (
            {"num_gpus_per_node": 6, "tensor_model_parallel_size": 4},
            r"num_nodes x num_gpus_per_node = 6 is not divisible by .* = 4",
        ),
        (
            {"global_batch_size": 12},
            r"global_batch_size=12 is not divisible by micro_batch_size=1 x data_parallel_size=8",
        ),
        (
            {"student_config": run.Config(MegatronStrategy)},
            r"student_config is a run.Config of MegatronStrategy; expected a run.Config of "
            r"GPTModelConfig",
        ),
    ],
)
def test_generic_recipe_rejects_bad_arguments(kwargs, message):
    """Bad arguments raise one ValueError at recipe time naming the key and what is allowed."""
    arguments = {"student_config": _student(), **kwargs}
    with pytest.raises(ValueError, match=message):
        distill_recipe(teacher_spec("/ckpt/teacher"), **arguments)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: run_config(checkpoint_every_n_steps=0),
            r"run config: checkpoint_every_n_steps=0 must be a positive integer or None",
        ),
        (lambda: run_config(name="a/b"), r"name='a/b' must be a non-empty string without '/'"),
        (lambda: run_config(keep_last=0), r"keep_last=0 must be a positive integer"),
        (
            lambda: teacher_spec("/t", ckpt_format="zarr"),
            r"teacher spec: ckpt_format='zarr' is not one of auto, torch_dist, torch",
        ),
        (
            lambda: teacher_spec("/t", config=run.Config(MegatronStrategy)),
            r"teacher config is a run.Config of MegatronStrategy",
        ),
        (
            lambda: distill_recipe(TeacherSpec(), _student(), job=RunConfig, offline="/cache"),
            r"job=<class .*RunConfig'> must be a RunConfig or a run.Config of one; "
            r"offline='/cache' must be a OfflineConfig",
        ),
    ],
)
def test_group_factories_reject_bad_arguments(make, message):
    """teacher_spec, run_config and the groups of distill_recipe name the bad key at recipe
    time."""
    with pytest.raises(ValueError, match=message):
        make()


def test_group_factories_return_configs_of_the_specs():
    """The sub-factories return unbuilt configs that build the specs; offline_config(None) is
    no offline run; a built spec given to distill_recipe is turned back into a config."""
    assert fdl.build(teacher_spec("/t", model_config="m.yaml")) == TeacherSpec(
        checkpoint="/t", model_config="m.yaml"
    )
    job = ("/r", "n", 5, 3, True, False)
    assert fdl.build(run_config(*job)) == RunConfig(*job)
    assert offline_config(None) is None
    assert fdl.build(offline_config("/c", "renormalized")) == OfflineConfig("/c", "renormalized")
    recipe = distill_recipe(TeacherSpec(checkpoint="/t"), _student(), job=RunConfig(name="x"))
    assert isinstance(recipe.teacher, run.Config) and recipe.teacher.checkpoint == "/t"
    assert isinstance(recipe.job, run.Config) and recipe.job.name == "x"
    offline = distill_recipe(teacher_spec("/t"), _student(), offline=offline_config("/c"))
    assert offline.teacher is None and offline.offline.teacher_cache == "/c"


def test_generic_recipe_names_every_problem_at_once():
    """Several bad arguments are reported together in one message."""
    with pytest.raises(ValueError, match=r"num_nodes=0 .*; max_steps=-1 .*; accelerator='x'"):
        distill_recipe(None, _student(), num_nodes=0, max_steps=-1, accelerator="x")


@pytest.mark.parametrize(
    ("make", "total", "non_embedding"),
    [
        # meta-llama/Llama-3.1-8B: 8,030,261,248 parameters (8.03B on the model card).
        (llama31_8b_to_llama32_1b.llama31_8b, 8_030_261_248, None),
        # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters (1.24B on the model card).
        (llama31_8b_to_llama32_1b.llama32_1b, 1_235_814_400, None),
        # Qwen/Qwen3-8B model card: 8.2B parameters, 6.95B non-embedding.
        (qwen3_8b_to_qwen3_1p7b.qwen3_8b, 8_190_735_360, 6_946_075_648),
        # Qwen/Qwen3-1.7B model card: 1.7B parameters, 1.4B non-embedding.
        (qwen3_8b_to_qwen3_1p7b.qwen3_1p7b, 1_720_574_976, 1_409_410_048),
    ],
)
def test_pair_architectures_have_the_model_cards_parameter_counts(make, total, non_embedding):
    """Each architecture's parameter count equals the published one, to the parameter."""
    config = fdl.build(make())
    counts = _parameters(config)
    assert counts["total"] == total
    if non_embedding is not None:
        assert counts["non_embedding"] == non_embedding


def test_pair_recipes_pin_the_published_architecture_details():
    """RoPE base/scaling, norms, tying and vocabularies match the model cards' config.json."""
    llama = llama31_8b_to_llama32_1b.llama31_8b_to_llama32_1b("/t", "/tok")
    teacher, student = fdl.build(llama.teacher.config), fdl.build(llama.student)
    for config in (teacher, student):
        assert (config.normalization, config.layernorm_epsilon) == ("RMSNorm", 1e-5)
        assert (config.activation, config.add_bias_linear) == ("swiglu", False)
        assert (config.rotary_base, config.rope_scaling) == (500_000, True)
        assert (config.vocab_size, config.max_position_embeddings) == (128_256, 131_072)
    assert (teacher.rope_scaling_factor, student.rope_scaling_factor) == (8.0, 32.0)
    assert teacher.share_embeddings_and_output_weights is False
    assert student.share_embeddings_and_output_weights is True
    assert llama.data.tokenizer.library == "huggingface" and llama.data.tokenizer.path == "/tok"
    assert llama.data.seq_length == 8192 and llama.trainer.strategy.precision == "bf16"
    assert (llama.job.checkpoint_every_n_steps, llama.job.resume) == (500, True)
    assert llama.teacher.checkpoint == "/t"

    qwen = qwen3_8b_to_qwen3_1p7b.qwen3_8b_to_qwen3_1p7b("/t", "/tok")
    teacher, student = fdl.build(qwen.teacher.config), fdl.build(qwen.student)
    for config in (teacher, student):
        assert (config.normalization, config.layernorm_epsilon) == ("RMSNorm", 1e-6)
        assert config.qk_layernorm is True and config.kv_channels == 128
        assert (config.rotary_base, config.rope_scaling) == (1_000_000, False)
        assert config.vocab_size == 151_936 and config.num_query_groups == 8
    assert teacher.share_embeddings_and_output_weights is False
    assert student.share_embeddings_and_output_weights is True


def test_pair_recipe_layout_arguments_are_checked_against_the_world_size():
    """A tensor-parallel size that does not divide the ranks fails at recipe time."""
    with pytest.raises(ValueError, match=r"num_nodes x num_gpus_per_node = 8 is not divisible"):
        llama31_8b_to_llama32_1b.llama31_8b_to_llama32_1b(tensor_model_parallel_size=3)


def test_tiny_cpu_defaults_reference_corpus_and_teacher_lazily():
    """tiny_cpu: CPU, 1 device, fp32; corpus and teacher are run.Config calls, not paths."""
    recipe = tiny_cpu.tiny_cpu()
    assert (recipe.trainer.accelerator, recipe.trainer.devices) == ("cpu", 1)
    assert recipe.trainer.strategy.precision == "fp32"
    assert recipe.trainer.max_steps == 100
    assert recipe.data.paths.__fn_or_cls__ is tiny_cpu.embedded_corpus_paths
    assert recipe.teacher.checkpoint.__fn_or_cls__ is tiny_cpu.demo_teacher_checkpoint
    assert recipe.distill_config.skip_lm_loss is False
    mock = tiny_cpu.tiny_cpu(teacher_path="/t", mock_data=True, num_gpus_per_node=2)
    assert mock.data.mock is True and mock.data.paths is None
    assert mock.teacher.checkpoint == "/t" and mock.trainer.devices == 2
    with pytest.raises(ValueError, match=r"data_paths='/d' is not used with mock_data=True"):
        tiny_cpu.tiny_cpu(data_paths="/d", mock_data=True)


def test_demo_teacher_checkpoint_finds_the_newest_cached_teacher(tmp_path):
    """The lazy teacher reference picks the newest teacher-*/teacher.json, or says what to run."""
    import os

    with pytest.raises(FileNotFoundError, match=r"run `python -m examples.demo` once"):
        tiny_cpu.demo_teacher_checkpoint(str(tmp_path))
    for index, key in enumerate(("teacher-aaa", "teacher-bbb")):
        (tmp_path / key).mkdir()
        record = tmp_path / key / "teacher.json"
        record.write_text("{}")
        os.utime(record, (1000 + index, 1000 + index))
    assert tiny_cpu.demo_teacher_checkpoint(str(tmp_path)) == str(
        tmp_path / "teacher-bbb" / "checkpoint"
    )


def test_every_recipe_dry_runs_and_serializes_without_building(capsys):
    """run.dryrun_fn prints each recipe's arguments and its YAML names every target."""
    from nemo_run.cli.config import ConfigSerializer

    for module in ALL_MODULES:
        recipe = _factory(module)()
        run.dryrun_fn(recipe)
        text = ConfigSerializer().serialize_yaml(recipe)
        assert "_target_: kd_module.api.distill" in text
        assert "_target_: kd_module.lightning_factories.megatron_strategy" in text
    out = capsys.readouterr().out
    assert out.count("Dry run for task kd_module.api:distill") == len(ALL_MODULES)


def test_recipe_pieces_build_the_lightning_trainer_strategy_and_data_module():
    """The light targets of a recipe build a lightning.Trainer with a MegatronStrategy and a
    GPTDataModule holding the recipe's (and the overrides') values."""
    recipe = tiny_cpu.tiny_cpu(mock_data=True, max_steps=7, tensor_model_parallel_size=1)
    recipe.trainer.enable_progress_bar = False  # a Trainer argument the recipe does not name
    recipe.data.micro_batch_size = 2
    trainer = fdl.build(recipe.trainer)
    assert type(trainer) is lightning.Trainer and trainer.max_steps == 7
    assert isinstance(trainer.strategy, MegatronStrategy)
    assert trainer.strategy.layout.tensor_model_parallel_size == 1
    assert trainer.progress_bar_callback is None and trainer.logger is None
    data = fdl.build(recipe.data)
    assert type(data) is GPTDataModule and data.micro_batch_size == 2 and data.mock is True


def _from_yaml(node):
    """A recipe from the plain data of its YAML: each ``_target_`` imported and configured."""
    import importlib

    if isinstance(node, list):
        return [_from_yaml(item) for item in node]
    if not isinstance(node, dict) or "_target_" not in node:
        return node
    module, _, name = node["_target_"].rpartition(".")
    target = getattr(importlib.import_module(module), name)
    arguments = {key: _from_yaml(value) for key, value in node.items() if key[0] != "_"}
    return (run.Partial if node.get("_partial_") else run.Config)(target, **arguments)


def test_recipe_yaml_round_trips():
    """The YAML of `--to-yaml` names importable targets and gives back an equal recipe."""
    import yaml
    from nemo_run.cli.config import ConfigSerializer

    for module in ALL_MODULES:
        recipe = _factory(module)()
        recipe.trainer.max_steps = 5
        exported = yaml.safe_load(ConfigSerializer().serialize_yaml(recipe))
        assert exported["trainer"]["_target_"] == "kd_module.lightning_factories.lightning_trainer"
        assert _from_yaml(exported) == recipe, module.NAME


def test_cache_recipe_matches_the_distill_recipe_data_and_is_registered():
    """tiny_cpu's cache recipe: a Partial of build_teacher_cache, found as `--factory tiny_cpu`
    of `cache-teacher`, caching the data (paths, seq_length, seed) its distill recipe reads."""
    from kd_module.offline.job import build_teacher_cache

    cache = tiny_cpu.tiny_cpu_cache(out_dir="/cache", num_samples=64, k=16)
    assert cache.__fn_or_cls__ is build_teacher_cache
    assert run.cli.resolve_factory(build_teacher_cache, "tiny_cpu").wrapped is (
        tiny_cpu.tiny_cpu_cache.wrapped
    )
    assert cache.out_dir == "/cache" and cache.k == 16 and cache.num_samples == 64
    assert cache.data.num_train_samples == 64
    train = tiny_cpu.tiny_cpu(teacher_cache="/cache")
    assert train.offline.teacher_cache == "/cache" and train.teacher is None
    for field in ("paths", "seq_length", "seed", "split", "mock", "tokenizer"):
        assert getattr(cache.data, field) == getattr(train.data, field), field
    assert tiny_cpu.tiny_cpu().offline is None  # online by default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 0}, "num_samples=0 must be a positive integer"),
        ({"k": -1, "shard_size": 0}, "k=-1 must be a positive integer; shard_size=0"),
    ],
)
def test_cache_recipe_rejects_bad_arguments(kwargs, message):
    from recipes.distill_recipe import cache_teacher_recipe

    arguments = {"num_samples": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        cache_teacher_recipe(teacher_spec("/ckpt"), "/cache", **arguments)


@pytest.mark.parametrize("module", PAIR_MODULES, ids=lambda module: module.NAME)
def test_pair_cache_recipes_cache_what_their_offline_students_read(module):
    """Each GPU pair has a cache-teacher factory under its name whose data, teacher and tokenizer
    are the distill recipe's; the distill recipe takes teacher_cache= and drops the teacher."""
    from kd_module.offline.job import build_teacher_cache

    cache_factory = getattr(module, module.NAME + "_cache")
    assert run.cli.resolve_factory(build_teacher_cache, module.NAME).wrapped is (
        cache_factory.wrapped
    )
    cache = cache_factory(out_dir="/cache", num_samples=4096, data_paths=["/data/web"])
    online = _factory(module)(data_paths=["/data/web"])
    offline = _factory(module)(data_paths=["/data/web"], teacher_cache="/cache")
    assert cache.__fn_or_cls__ is build_teacher_cache and cache.devices == 8
    assert (cache.accelerator, cache.precision, cache.dtype, cache.k) == ("gpu", "bf16", "bf16", 64)
    assert fdl.build(cache.teacher) == fdl.build(online.teacher)
    for field in ("paths", "seq_length", "seed", "split", "mock", "tokenizer"):
        assert getattr(cache.data, field) == getattr(offline.data, field), field
    assert offline.offline.teacher_cache == "/cache" and offline.teacher is None
    assert online.offline is None


# The published config.json of each pair's models (the fields the import reads).
_LLAMA3 = dict(
    architectures=["LlamaForCausalLM"],
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    vocab_size=128256,
    max_position_embeddings=131072,
    num_attention_heads=32,
    num_key_value_heads=8,
    initializer_range=0.02,
)
_QWEN3 = dict(
    architectures=["Qwen3ForCausalLM"],
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1000000,
    rope_scaling=None,
    vocab_size=151936,
    max_position_embeddings=40960,
    head_dim=128,
    num_key_value_heads=8,
    attention_bias=False,
    sliding_window=None,
    use_sliding_window=False,
    initializer_range=0.02,
)
PUBLISHED_CONFIGS = {
    "Llama-3.1-8B": (
        llama31_8b_to_llama32_1b.llama31_8b,
        dict(
            _LLAMA3,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            tie_word_embeddings=False,
            rope_scaling={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
        ),
    ),
    "Llama-3.2-1B": (
        llama31_8b_to_llama32_1b.llama32_1b,
        dict(
            _LLAMA3,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            head_dim=64,
            tie_word_embeddings=True,
            rope_scaling={
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
        ),
    ),
    "Qwen3-8B": (
        qwen3_8b_to_qwen3_1p7b.qwen3_8b,
        dict(
            _QWEN3,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            tie_word_embeddings=False,
        ),
    ),
    "Qwen3-1.7B": (
        qwen3_8b_to_qwen3_1p7b.qwen3_1p7b,
        dict(
            _QWEN3,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            tie_word_embeddings=True,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_pair_architectures_equal_what_their_hf_config_json_imports_as(name):
    """The pair recipes' architectures are what the published HF directories load as, so
    `teacher_path=` / `student_path=` can name those directories (the import compares them)."""
    from kd_module.hf.config import gpt_config_from_hf

    make, published = PUBLISHED_CONFIGS[name]
    imported = gpt_config_from_hf(published, seq_length=4096)
    recipe = fdl.build(make(4096))
    for key in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "vocab_size",
        "normalization",
        "layernorm_epsilon",
        "activation",
        "add_bias_linear",
        "add_qkv_bias",
        "qk_layernorm",
        "position_embedding_type",
        "rotary_base",
        "rope_scaling",
        "share_embeddings_and_output_weights",
        "max_position_embeddings",
    ):
        assert getattr(recipe, key) == getattr(imported, key), key
    if recipe.rope_scaling:
        assert recipe.rope_scaling_factor == imported.rope_scaling_factor


def test_pair_recipes_take_hf_directories_and_their_tokenizer():
    """With HF directories the teacher directory's tokenizer is the data's by default, and
    export_hf reaches the run config."""
    for recipe in (
        llama31_8b_to_llama32_1b.llama31_8b_to_llama32_1b(
            "/models/teacher", student_path="/models/student", export_hf="/models/out"
        ),
        qwen3_8b_to_qwen3_1p7b.qwen3_8b_to_qwen3_1p7b(
            "/models/teacher", student_path="/models/student", export_hf="/models/out"
        ),
    ):
        assert recipe.teacher.checkpoint == "/models/teacher"
        assert recipe.data.tokenizer.path == "/models/teacher"
        assert recipe.student_checkpoint == "/models/student"
        assert recipe.job.export_hf == "/models/out"


@pytest.mark.parametrize(
    ("kind", "parameters"), [("width", 4_512_746_496), ("depth", 4_540_469_248)]
)
def test_llama_prune_factory_targets_the_published_minitron_4b_shapes(kind, parameters):
    """Llama-3.1-Minitron-4B-Width and -Depth (about 4.5 B parameters each) are valid prunings
    of the pair's teacher, and the prune factory calibrates on the teacher's tokenizer."""
    from kd_module.pruning import minitron

    recipe = llama31_8b_to_llama32_1b.llama31_8b_to_llama32_1b_prune(
        "/out", kind=kind, teacher_path="/models/Llama-3.1-8B"
    )
    teacher, target = fdl.build(recipe.teacher.config), fdl.build(recipe.target)
    assert minitron.target_problems(teacher, target, 128_256) == []
    assert minitron.parameter_count(minitron.pruned_config(teacher, target), 128_256) == parameters
    assert recipe.data.tokenizer.path == "/models/Llama-3.1-8B"
    with pytest.raises(ValueError, match="kind='both' is not one of width, depth"):
        llama31_8b_to_llama32_1b.llama31_minitron_4b("both")


def test_pair_recipe_student_from_prune_distills_a_minitron_shape():
    """`student_from="prune"` on the Llama pair makes the student a Minitron 4B shape of the
    teacher (Llama 3.2 1B's heads cannot be cut from the 8B's) and reaches distill; a bad value
    or a student_path beside it is refused by the generic recipe."""
    recipe = llama31_8b_to_llama32_1b.llama31_8b_to_llama32_1b(
        "/models/Llama-3.1-8B", student_from="prune", prune_kind="depth"
    )
    assert recipe.student_from == "prune"
    student = fdl.build(recipe.student)
    assert (student.num_layers, student.hidden_size) == (16, 4096)
    with pytest.raises(ValueError, match="student_from='grow' is not one of init, prune"):
        llama31_8b_to_llama32_1b.llama31_8b_to_llama32_1b("/t", student_from="grow")
    with pytest.raises(ValueError, match="leave student_path None"):
        llama31_8b_to_llama32_1b.llama31_8b_to_llama32_1b(
            "/t", student_path="/s", student_from="prune"
        )


def test_qwen_pruned_student_is_the_6b_budget_of_the_teacher():
    """The Qwen pair's `student_from="prune"` student is what a 6 B budget prunes Qwen3-8B to."""
    from kd_module.pruning import minitron

    recipe = qwen3_8b_to_qwen3_1p7b.qwen3_8b_to_qwen3_1p7b("/t", student_from="prune")
    teacher, student = fdl.build(recipe.teacher.config), fdl.build(recipe.student)
    expected = minitron.budget_target(teacher, 6_000_000_000, 151_936)
    assert (student.hidden_size, student.ffn_hidden_size) == (
        expected.hidden_size,
        expected.ffn_hidden_size,
    )
    assert minitron.target_problems(teacher, student, 151_936) == []
    assert recipe.student_from == "prune"
