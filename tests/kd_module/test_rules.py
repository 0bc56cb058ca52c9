"""The shared input rules: the Problems collector, ParallelLayout's sizes and problems, the
precision table, the YAML reader, and that the rules import without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kd_module.models.gpt import ParallelLayout
from kd_module.rules import Problems, positive_int_problems
from kd_module.training.precision import PRECISIONS, dtype_name_of, precision_problems
from kd_module.yaml_files import parse_yaml, read_yaml


def test_positive_int_accepts_positive_ints_and_names_everything_else():
    """0, negatives, floats, strings and bools are refused, each with its own message."""
    problems = Problems()
    assert problems.positive_int("devices", 8)
    for value in (0, -1, 2.0, "2", True, None):
        assert not problems.positive_int("devices", value)
    assert problems == [
        "devices=0 must be a positive integer",
        "devices=-1 must be a positive integer",
        "devices=2.0 must be a positive integer",
        "devices='2' must be a positive integer",
        "devices=True must be a positive integer",
        "devices=None must be a positive integer",
    ]


def test_positive_int_or_none_and_hint_are_spelled_out():
    """``or_none`` accepts None and says so in the caller's spelling; a hint is appended."""
    problems = Problems()
    assert problems.positive_int("seq_length", None, or_none="None")
    problems.positive_int("logit_kl_topk", 0, or_none="null")
    problems.positive_int("num_samples", None, hint=" (or set data.num_train_samples)")
    assert problems == [
        "logit_kl_topk=0 must be a positive integer or null",
        "num_samples=None must be a positive integer (or set data.num_train_samples)",
    ]


def test_int_at_least_and_positive_number():
    """Lower bounds and positive numbers have one message each; bools are not numbers."""
    problems = Problems()
    assert problems.int_at_least("num_workers", 0, 0)
    assert problems.positive_number("lr", 3e-4)
    problems.int_at_least("window", 1, 2, hint=" (steps fitted)")
    problems.int_at_least("num_workers", True, 0)
    problems.positive_number("lr", 0)
    problems.positive_number("lr", False)
    assert problems == [
        "window=1 must be an integer >= 2 (steps fitted)",
        "num_workers=True must be an integer >= 0",
        "lr=0 must be a number > 0",
        "lr=False must be a number > 0",
    ]


def test_one_of_lists_the_allowed_values_and_suggests_a_close_one():
    """A misspelt string gets a did-you-mean; a value of another type just the allowed list."""
    problems = Problems()
    assert problems.one_of("precision", "bf16", ("fp32", "bf16"))
    problems.one_of("precision", "bf61", ("fp32", "bf16"))
    problems.one_of("precision", "int8", ("fp32", "bf16"))
    problems.one_of("precision", 16, ("fp32", "bf16"))
    assert problems == [
        "precision='bf61' is not one of fp32, bf16 (did you mean 'bf16'?)",
        "precision='int8' is not one of fp32, bf16",
        "precision=16 is not one of fp32, bf16",
    ]


def test_raise_if_any_raises_every_problem_once_with_the_prefix():
    """No problem: nothing raised; otherwise one ValueError joining them after the prefix."""
    problems = Problems()
    problems.raise_if_any("distill")
    problems.add("trainer.max_steps=0 must be a positive integer")
    problems.extend(["name='' must be a non-empty string without '/'"])
    problems += positive_int_problems(keep_last=0)
    with pytest.raises(ValueError) as raised:
        problems.raise_if_any("distill")
    assert str(raised.value) == (
        "distill: trainer.max_steps=0 must be a positive integer; "
        "name='' must be a non-empty string without '/'; keep_last=0 must be a positive integer"
    )


def test_rules_import_without_torch():
    """The CLI checks arguments with kd_module.rules, the precision table and ParallelLayout,
    none of which may import torch or Lightning."""
    code = (
        "import sys, kd_module.rules, kd_module.training.precision, kd_module.models.gpt, "
        "kd_module.yaml_files, kd_module.checkpoints.atomic, kd_module.parallel.collectives\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parallel_layout_sizes():
    """Model-parallel size is TP x PP x CP; data parallel and micro-batches follow from it."""
    layout = ParallelLayout(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2
    )
    assert layout.model_parallel_size == 8
    assert layout.data_parallel_size(16) == 2
    assert layout.num_microbatches(global_batch_size=32, micro_batch_size=4, world_size=16) == 4
    assert ParallelLayout().num_microbatches(6, 2, world_size=1) == 3


def test_parallel_layout_problems_one_message_each():
    """Sizes, the world size and the batch split each have one message, in that order."""
    layout = ParallelLayout(tensor_model_parallel_size=2)
    assert layout.problems(4, global_batch_size=8, micro_batch_size=2) == []
    assert layout.problems(3) == [
        "world size 3 is not divisible by tensor_model_parallel_size (2) x "
        "pipeline_model_parallel_size (1) x context_parallel_size (1) = 2"
    ]
    assert layout.problems(6, world="num_nodes x num_gpus_per_node = 6") == []
    assert layout.problems(5, world="num_nodes x num_gpus_per_node = 5")[0].startswith(
        "num_nodes x num_gpus_per_node = 5 is not divisible by"
    )
    assert layout.problems(4, global_batch_size=6, micro_batch_size=2) == [
        "global_batch_size=6 is not divisible by micro_batch_size=2 x data_parallel_size=2"
    ]
    bad = ParallelLayout(tensor_model_parallel_size=0, virtual_pipeline_model_parallel_size=0)
    assert bad.problems(4) == [
        "tensor_model_parallel_size=0 must be a positive integer",
        "virtual_pipeline_model_parallel_size=0 must be a positive integer or None",
    ]


def test_parallel_layout_sizes_raise_on_a_bad_split():
    """Asking for sizes that do not exist raises with the layout's message."""
    layout = ParallelLayout(pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"parallel layout: world size 3 is not divisible"):
        layout.data_parallel_size(3)
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=5 is not divisible by micro_batch_size=1 x data_parallel_size=2",
    ):
        layout.num_microbatches(5, 1, world_size=4)


@pytest.mark.parametrize(
    ("tp", "num_nodes", "devices", "spans"),
    [
        (2, 2, 1, True),  # each TP pair is one rank on each node
        (4, 2, 6, True),  # ranks 4-7 straddle the first node's end
        (8, 4, 8, False),  # one TP group per node
        (2, 2, 8, False),
        (16, 1, 16, False),  # one node: nothing to cross
    ],
)
def test_tensor_parallel_groups_spanning_nodes_are_named(tp, num_nodes, devices, spans):
    """TP groups are consecutive ranks: they cross a node boundary unless TP divides the
    devices of a node, and the warning says what to do instead."""
    layout = ParallelLayout(tensor_model_parallel_size=tp)
    warnings = layout.across_nodes_warnings(num_nodes, devices)
    assert bool(warnings) is spans
    if spans:
        (message,) = warnings
        assert message.startswith(
            f"tensor_model_parallel_size={tp} does not divide the {devices} devices of a node"
        )
        assert "crosses the network" in message and "data or pipeline parallelism" in message


def test_precision_table():
    """Run precisions map to torch dtypes; NeMo spellings to dtype names; bf16 needs a GPU."""
    import torch

    assert list(PRECISIONS) == ["fp32", "bf16"]
    assert PRECISIONS["bf16"].dtype is torch.bfloat16
    assert PRECISIONS["fp32"].dtype is torch.float32
    assert dtype_name_of("BF16-mixed") == "bfloat16"
    assert dtype_name_of("16") == "float16"
    assert dtype_name_of(True) is None
    assert precision_problems("bf16", cuda=True) == []
    assert precision_problems("bf16", cuda=False) == [
        "precision='bf16' needs accelerator='gpu'; use precision='fp32' on CPU"
    ]
    assert precision_problems("fp16", cuda=True) == [
        "precision='fp16' is not one of fp32, bf16 (did you mean 'bf16'?)"
    ]


def test_read_yaml_names_the_file_and_the_line(tmp_path):
    """A syntax error names what the file is, its path, the line and column; a missing file too."""
    path = tmp_path / "kd.yaml"
    path.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ValueError) as raised:
        read_yaml(path, "distill config")
    message = str(raised.value)
    assert message.startswith(f"distill config {path}: not valid YAML at line 3, column 2: ")
    with pytest.raises(FileNotFoundError, match=r"distill config .*nope.yaml: no such file"):
        read_yaml(tmp_path / "nope.yaml", "distill config")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty, "x") is None
    assert parse_yaml("k: [1, 2]", "inline") == {"k": [1, 2]}
