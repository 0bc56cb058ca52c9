"""Minitron pruning (kd_module.pruning): shapes and parameter counts, importance that finds the
parts contributing nothing (so pruning them changes no logit), determinism, refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kd_module.models.gpt import GPTModelConfig
from kd_module.pruning import minitron

SEQ, VOCAB = 32, 320
LLAMA_LIKE = GPTModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    seq_length=SEQ,
    vocab_size=VOCAB,
    normalization="RMSNorm",
    activation="swiglu",
    position_embedding_type="rope",
    add_bias_linear=False,
    share_embeddings_and_output_weights=False,
    transformer_impl="local",
)
GPT2_LIKE = GPTModelConfig(
    num_layers=3, hidden_size=48, num_attention_heads=4, seq_length=SEQ, vocab_size=VOCAB
)
"""LayerNorm, GELU, biases, learned positions, tied embeddings: every optional tensor."""


def _data(samples: int = 16):
    from kd_module.data import GPTDataModule

    return GPTDataModule(
        mock=True,
        seq_length=SEQ,
        micro_batch_size=4,
        global_batch_size=4,
        num_train_samples=samples,
    )


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 258, (2, SEQ), generator=generator)
    return tokens, torch.arange(SEQ).expand(2, SEQ)


def _logits(model) -> torch.Tensor:
    tokens, positions = _tokens()
    with torch.no_grad():
        return model.eval()(tokens, positions, None)


def _silence(config: GPTModelConfig, layer_off: int, group_off: int, ffn_off: list[int]):
    """``fn(model)``: random weights, then layer ``layer_off`` made an identity, query group
    ``group_off``'s values zeroed in every layer, and FFN neurons ``ffn_off`` switched off: the
    parts an exact importance ranking must prune first."""
    from tests.helpers import init_weights_by_global_key

    dim, groups = minitron.head_dim(config), minitron.query_groups(config)
    per_group = config.num_attention_heads // groups
    ffn = minitron.ffn_size(config)

    def init(model) -> None:
        init_weights_by_global_key(model, seed=11, std=0.2)
        with torch.no_grad():
            for index, layer in enumerate(model.decoder.layers):
                attention, mlp = layer.self_attention, layer.mlp
                value = group_off * (per_group + 2) * dim + (per_group + 1) * dim
                attention.linear_qkv.weight[value : value + dim] = 0
                if attention.linear_qkv.bias is not None:
                    attention.linear_qkv.bias[value : value + dim] = 0
                rows = torch.tensor(ffn_off)
                if config.activation in minitron.GATED:
                    rows = torch.cat([rows, rows + ffn])
                mlp.linear_fc1.weight[rows] = 0
                if mlp.linear_fc1.bias is not None:
                    mlp.linear_fc1.bias[rows] = 0
                if index == layer_off:
                    for linear in (attention.linear_proj, mlp.linear_fc2):
                        linear.weight.zero_()
                        if linear.bias is not None:
                            linear.bias.zero_()

    return init


def _prune(tmp_path: Path, teacher: GPTModelConfig, target: GPTModelConfig, init, **kwargs):
    from kd_module.pruning.job import prune
    from kd_module.specs import TeacherSpec

    out = tmp_path / kwargs.pop("name", "pruned")
    report = prune(
        _data(),
        str(out),
        teacher=TeacherSpec(config=teacher),
        target=target,
        calibration_samples=16,
        teacher_init_fn=init,
        **kwargs,
    )
    return out, report


def _load(directory: Path):
    from kd_module.checkpoints.model import load_model_checkpoint
    from kd_module.models.gpt import build_model
    from kd_module.nemo_format.discovery import load_teacher_model_config

    config = load_teacher_model_config(None, GPTModelConfig(seq_length=SEQ), directory).model
    model = build_model(config)
    load_model_checkpoint(model, directory)
    return model, config


@pytest.mark.parametrize("teacher", [LLAMA_LIKE, GPT2_LIKE], ids=["llama-like", "gpt2-like"])
def test_pruning_what_contributes_nothing_keeps_every_logit(tmp_path, teacher):
    """An identity layer, a query group with zero values and dead FFN neurons have zero
    importance: pruned to exactly those, the student's logits equal the teacher's (fp32), so the
    ranking, the layer renumbering and the cut of linear_qkv / linear_proj / linear_fc1 /
    linear_fc2 are all right."""
    from kd_module.models.gpt import build_model
    from kd_module.parallel import runtime

    groups = minitron.query_groups(teacher)
    per_group = teacher.num_attention_heads // groups
    ffn_off = [1, 5, 6]
    init = _silence(teacher, layer_off=1, group_off=0, ffn_off=ffn_off)
    target = teacher.replace(
        num_layers=teacher.num_layers - 1,
        num_attention_heads=teacher.num_attention_heads - per_group,
        num_query_groups=groups - 1,
        ffn_hidden_size=minitron.ffn_size(teacher) - len(ffn_off),
    )
    out, report = _prune(tmp_path, teacher, target, init)
    assert report["kept_layers"] == [i for i in range(teacher.num_layers) if i != 1]
    assert report["layer_importance"][1] == pytest.approx(0.0, abs=1e-12)
    for layer in report["kept_layers"]:
        assert report["kept_query_groups"][str(layer)] == list(range(1, groups))

    runtime.initialize_distributed(seed=1)
    try:
        reference = build_model(teacher)
        init(reference)
        pruned, config = _load(out)
        assert config.num_layers == teacher.num_layers - 1
        assert config.kv_channels == minitron.head_dim(teacher)
        parameters = sum(p.numel() for p in pruned.parameters())
        assert (
            parameters == minitron.parameter_count(config, VOCAB) == report["pruned"]["parameters"]
        )
        torch.testing.assert_close(_logits(pruned), _logits(reference), rtol=1e-5, atol=1e-5)
    finally:
        runtime.destroy_distributed()


def test_width_and_depth_pruning_reach_the_target_shape_and_keep_the_important_channels(
    tmp_path,
):
    """Every dimension pruned at once: the checkpoint has the target's shape and count, and its
    tensors are the teacher's rows and columns at the kept indices."""
    from kd_module.models.gpt import build_model
    from kd_module.parallel import runtime
    from tests.helpers import init_weights_by_global_key

    def init(model) -> None:
        init_weights_by_global_key(model, seed=3, std=0.2)
        with torch.no_grad():  # hidden channel 5 is never written: the least important
            model.embedding.word_embeddings.weight[:, 5] = 0
            for layer in model.decoder.layers:
                layer.self_attention.linear_proj.weight[5] = 0
                layer.mlp.linear_fc2.weight[5] = 0

    target = LLAMA_LIKE.replace(
        num_layers=3, hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=1
    )
    out, report = _prune(tmp_path, LLAMA_LIKE, target, init)
    runtime.initialize_distributed(seed=1)
    try:
        teacher = build_model(LLAMA_LIKE)
        init(teacher)
        pruned, config = _load(out)
        for key in minitron.PRUNED_FIELDS:
            assert getattr(config, key) == getattr(target, key), key
        assert sum(p.numel() for p in pruned.parameters()) == minitron.parameter_count(
            config, VOCAB
        )
        # Each pruned embedding column is one teacher column, in the teacher's order.
        embedding, source = (
            pruned.embedding.word_embeddings.weight,
            teacher.embedding.word_embeddings.weight,
        )
        kept = [
            next(c for c in range(64) if torch.equal(embedding[:, j], source[:, c]))
            for j in range(48)
        ]
        assert 5 not in kept and kept == sorted(kept)
        first = report["kept_layers"][0]
        heads = report["kept_heads"][str(first)]
        proj = teacher.decoder.layers[first].self_attention.linear_proj.weight
        columns = torch.cat([torch.arange(16) + h * 16 for h in heads])
        torch.testing.assert_close(
            pruned.decoder.layers[0].self_attention.linear_proj.weight,
            proj[torch.tensor(kept)][:, columns],
            rtol=0,
            atol=0,
        )
    finally:
        runtime.destroy_distributed()


def test_pruning_is_deterministic(tmp_path):
    """The same teacher, data and target give byte-identical weight files, and a ``.metadata``
    that differs only in what torch.distributed.checkpoint varies on every save: a random
    ``save_id`` and the order its writer threads fill the index in."""
    import pickle

    init = _silence(LLAMA_LIKE, layer_off=2, group_off=1, ffn_off=[0])
    target = LLAMA_LIKE.replace(num_layers=3, hidden_size=56, ffn_hidden_size=80)

    def digest(directory: Path) -> dict[str, str]:
        out = {}
        for path in sorted(directory.rglob("*")):
            if not path.is_file() or path.name == "pruning.json":  # it records the wall time
                continue
            data = path.read_bytes()
            if path.name == ".metadata":  # its dicts are filled in thread-completion order
                metadata = pickle.loads(data)
                data = repr(
                    [
                        sorted(metadata.state_dict_metadata.items(), key=repr),
                        sorted(metadata.storage_data.items(), key=repr),
                        metadata.planner_data,
                    ]
                ).encode()
            out[str(path.relative_to(directory))] = hashlib.sha256(data).hexdigest()
        return out

    # Into the same directory: .metadata also records where it was written.
    first, _ = _prune(tmp_path, LLAMA_LIKE, target, init)
    before = digest(first)
    assert any(name.endswith(".distcp") for name in before)
    second, _ = _prune(tmp_path, LLAMA_LIKE, target, init)
    assert digest(second) == before
    report = json.loads((first / "pruning.json").read_text())
    assert report["pruned"]["num_layers"] == 3


@pytest.mark.parametrize(
    "config",
    [LLAMA_LIKE, GPT2_LIKE, LLAMA_LIKE.replace(qk_layernorm=True, normalization="LayerNorm")],
)
def test_parameter_count_equals_the_built_model(single_rank, config):
    from kd_module.models.gpt import build_model

    model = build_model(config)
    assert minitron.parameter_count(config, VOCAB) == sum(p.numel() for p in model.parameters())


def test_a_budget_gives_the_widest_model_within_it():
    """Hidden and FFN shrink by one factor in 1/64 steps: the result fits the budget and the
    next wider step does not."""
    budget = minitron.parameter_count(LLAMA_LIKE, VOCAB) // 2
    target = minitron.budget_target(LLAMA_LIKE, budget, VOCAB)
    assert minitron.parameter_count(target, VOCAB) <= budget
    assert (target.num_layers, target.num_attention_heads) == (4, 4)
    assert target.hidden_size < 64 and target.hidden_size % 8 == 0
    wider = target.replace(hidden_size=target.hidden_size + 8)
    assert minitron.parameter_count(wider, VOCAB) > budget or wider.hidden_size > 64
    with pytest.raises(ValueError, match=r"no width-pruned architecture has at most params=1,000"):
        minitron.budget_target(LLAMA_LIKE, 1000, VOCAB)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target": LLAMA_LIKE.replace(hidden_size=96)},
            "target hidden_size=96 is larger than the teacher's 64",
        ),
        ({"target": LLAMA_LIKE}, "the target is the teacher's own architecture"),
        (
            {"target": LLAMA_LIKE.replace(num_query_groups=1)},
            "target has 4 heads per query group, more than the teacher's 2",
        ),
        (
            {"target": LLAMA_LIKE.replace(num_layers=2, activation="gelu")},
            "target activation='gelu' differs from the teacher's 'swiglu'",
        ),
        (
            {"target": LLAMA_LIKE.replace(num_layers=2), "tensor_model_parallel_size": 4},
            "pruned model: num_query_groups=2 is not divisible by tensor_model_parallel_size=4",
        ),
        ({"target": LLAMA_LIKE.replace(num_layers=2), "params": 10}, "exactly one of target"),
        ({"params": 1000}, "no width-pruned architecture has at most params=1,000"),
        (
            {"target": LLAMA_LIKE.replace(num_layers=2), "calibration_samples": 2},
            "calibration_samples=2 is less than one micro-batch (4 samples)",
        ),
    ],
    ids=["larger", "same", "heads-per-group", "other-field", "tp", "both", "budget", "calibration"],
)
def test_bad_targets_are_refused_before_anything_is_built(tmp_path, kwargs, message):
    from kd_module.pruning.job import prune
    from kd_module.specs import TeacherSpec

    arguments = {"calibration_samples": 16, **kwargs}
    with pytest.raises(ValueError) as refused:
        prune(_data(), str(tmp_path / "out"), teacher=TeacherSpec(config=LLAMA_LIKE), **arguments)
    assert message in str(refused.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"student": LLAMA_LIKE.replace(num_layers=2, kv_channels=8)},
            "student_from='prune': target kv_channels=8 differs from the teacher's head size 16",
        ),
        (
            {"student_checkpoint": "/somewhere"},
            "student_from='prune' starts the student from the pruned teacher; leave "
            "student_checkpoint unset",
        ),
        ({"teacher_checkpoint": None}, "student_from='prune' needs teacher.checkpoint"),
    ],
    ids=["head-size", "student-checkpoint", "no-teacher-weights"],
)
def test_distill_student_from_prune_refuses_before_anything_runs(tmp_path, arguments, message):
    import lightning as L

    from kd_module.api import distill
    from kd_module.specs import RunConfig, TeacherSpec
    from kd_module.training.strategy import MegatronStrategy

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, strategy=MegatronStrategy()
    )
    with pytest.raises(ValueError) as refused:
        distill(
            arguments.get("student", LLAMA_LIKE.replace(num_layers=2)),
            _data(),
            trainer,
            teacher=TeacherSpec(
                checkpoint=arguments.get("teacher_checkpoint", str(tmp_path)), config=LLAMA_LIKE
            ),
            job=RunConfig(log_dir=str(tmp_path / "runs")),
            student_checkpoint=arguments.get("student_checkpoint"),
            student_from="prune",
        )
    assert message in str(refused.value)
    assert not (tmp_path / "runs").exists()


def test_a_pruned_trained_teacher_starts_far_below_a_random_init(tmp_path):
    """A teacher trained briefly on real text, pruned to half its depth, width, heads and FFN:
    before any training the pruned student's held-out loss is far below the same architecture's
    at random initialization (about ln 320 = 5.77 nats/byte)."""
    import lightning as L

    from kd_module.checkpoints.model import save_model_checkpoint
    from kd_module.data import GPTDataModule
    from kd_module.data.corpus import embedded_corpus
    from kd_module.pruning.job import prune
    from kd_module.specs import TeacherSpec
    from kd_module.training.module import GPTModule
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy

    corpus = embedded_corpus(max_bytes=300_000)
    seq, steps = 64, 60
    teacher = GPTModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=seq,
        make_vocab_size_divisible_by=64,
    )
    student = teacher.replace(
        num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=128
    )

    def data() -> GPTDataModule:
        return GPTDataModule(
            paths={"train": corpus["train_prefix"], "validation": corpus["validation_prefix"]},
            seq_length=seq,
            micro_batch_size=8,
            global_batch_size=8,
            num_train_samples=steps * 8,
            num_val_samples=32,
        )

    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu",
            devices=1,
            strategy=MegatronStrategy(seed=3),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=4,
            **kwargs,
        )

    class Save(L.Callback):
        def on_train_end(self, trainer, module) -> None:
            save_model_checkpoint(module.core_model, tmp_path / "teacher", model_config=teacher)

    model = GPTModule(teacher, optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5))
    trainer(max_steps=steps, val_check_interval=steps, callbacks=[Save()]).fit(
        model, datamodule=data()
    )
    prune(
        data(),
        str(tmp_path / "pruned"),
        teacher=TeacherSpec(checkpoint=str(tmp_path / "teacher"), config=teacher),
        target=student,
        calibration_samples=32,
    )
    losses = {}
    for name, checkpoint in (("pruned", str(tmp_path / "pruned")), ("random", None)):
        module = GPTModule(student, student_checkpoint=checkpoint)
        trainer().validate(module, datamodule=data())
        losses[name] = module.last_val_metrics["val_loss"]
    assert abs(losses["random"] - 5.77) < 0.3, losses
    assert losses["pruned"] < losses["random"] - 1.0, losses
