"""The real ``nemo kd`` command in subprocesses: distill runs, dry-runs, exports; prepare-data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

NEMO = str(Path(sys.executable).with_name("nemo"))
"""The ``nemo`` console script of this environment."""


def _nemo(*args: str, cwd: Path, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, *python_flags, NEMO, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=400,
    )


def short_mock_distill(tmp_path: Path, name: str, *overrides: str) -> tuple[Any, Path]:
    """`nemo kd distill --factory tiny_cpu` for 2 steps on mock data into
    ``tmp_path/runs/name``, with ``overrides``; the completed process and the run directory."""
    result = _nemo(
        "kd",
        "distill",
        "--factory",
        "tiny_cpu",
        "-y",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=1",
        "data.paths=None",
        "data.mock=true",
        "data.global_batch_size=8",
        f"job.log_dir={tmp_path / 'runs'}",
        f"job.name={name}",
        *overrides,
        cwd=tmp_path,
    )
    return result, tmp_path / "runs" / name


def test_cli_distill_tiny_cpu_runs_for_real_with_overrides(tiny_teacher, tmp_path):
    """`nemo kd distill --factory tiny_cpu -y trainer.max_steps=3 ...` trains 3 steps, writes a
    summary whose numbers reflect the overrides."""
    result = _nemo(
        "kd",
        "distill",
        "--factory",
        "tiny_cpu",
        "-y",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        f"teacher.checkpoint={tiny_teacher}",
        "data.paths=None",
        "data.mock=true",
        "data.global_batch_size=8",
        f"job.log_dir={tmp_path / 'runs'}",
        "job.name=cli",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["tokens"] == 3 * 8 * 128
    assert summary["configs"]["data"]["mock"] is True
    assert summary["configs"]["teacher"]["num_layers"] == 2  # from the checkpoint's yaml
    assert summary["configs"]["student"]["num_layers"] == 1
    assert summary["val_loss"] > 0 and summary["teacher_val_loss"] > 0
    rows = (tmp_path / "runs" / "cli" / "metrics.csv").read_text().splitlines()
    assert "kd_loss" in rows[0]
    # No third-party notice the user did not cause (kd_module.cli.quiet): megatron's TE/Apex
    # fallbacks, ModelOpt's transformers notice, Lightning's tip and dataloader_iter advice.
    output = result.stdout + result.stderr
    for noise in (
        "Apex",
        "is not tested with current version of modelopt",
        "litlogger",
        "dataloader_iter",
        "sync_dist=True",
        "deprecated",
        "MockGPTDataset",
    ):
        assert noise not in output, noise


def test_cli_dryrun_prints_the_recipe_without_megatron_or_modelopt(tmp_path):
    """--dryrun of the Llama pair resolves overrides and imports neither megatron nor ModelOpt."""
    result = _nemo(
        "kd",
        "distill",
        "--factory",
        "llama31_8b_to_llama32_1b",
        "--dryrun",
        "trainer.max_steps=77",
        "student.num_layers=12",
        cwd=tmp_path,
        python_flags=("-X", "importtime"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Dry run for task kd_module.api:distill" in result.stdout
    assert "max_steps=77" in result.stdout and "num_layers=12" in result.stdout
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "kd_module.api" in imported  # importtime did report this process's imports
    heavy = [name for name in imported if name.split(".")[0] in ("megatron", "modelopt")]
    assert heavy == []


def test_cli_dotted_overrides_of_the_groups_reach_the_task(tmp_path):
    """`teacher.checkpoint=`, `teacher.ckpt_format=`, `job.name=`, `job.resume=` and (offline)
    `offline.loss_mode=` set the fields of distill's groups (printed by --dryrun)."""
    result = _nemo(
        "kd",
        "distill",
        "--factory",
        "tiny_cpu",
        "--dryrun",
        "teacher.checkpoint=/ckpt/dotted_teacher",
        "teacher.ckpt_format=torch_dist",
        "job.name=dotted_run",
        "job.resume=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checkpoint='/ckpt/dotted_teacher'" in result.stdout
    assert "ckpt_format='torch_dist'" in result.stdout
    assert "name='dotted_run'" in result.stdout and "resume=True" in result.stdout
    offline = _nemo(
        "kd",
        "distill",
        "--factory",
        "tiny_cpu(teacher_cache='/data/dotted_cache')",
        "--dryrun",
        "offline.loss_mode=renormalized",
        cwd=tmp_path,
    )
    assert offline.returncode == 0, offline.stdout[-3000:] + offline.stderr[-3000:]
    assert "teacher_cache='/data/dotted_cache'" in offline.stdout
    assert "loss_mode='renormalized'" in offline.stdout


def test_cli_to_yaml_writes_the_overridden_recipe(tmp_path):
    """--to-yaml exports the recipe with the command line's overrides and runs nothing."""
    out = tmp_path / "recipe.yaml"
    result = _nemo(
        "kd",
        "distill",
        "--factory",
        "qwen3_8b_to_qwen3_1p7b",
        "--to-yaml",
        str(out),
        "trainer.max_steps=123",
        "trainer.strategy.tensor_model_parallel_size=2",
        "job.name=qwen_exp",
        "teacher.checkpoint=/ckpt/qwen3_8b",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exported = yaml.safe_load(out.read_text())
    assert exported["_target_"] == "kd_module.api.distill"
    assert exported["trainer"]["max_steps"] == 123
    assert exported["trainer"]["strategy"]["tensor_model_parallel_size"] == 2
    assert exported["job"]["name"] == "qwen_exp"
    assert exported["teacher"]["checkpoint"] == "/ckpt/qwen3_8b"
    assert exported["student"]["num_layers"] == 28
    assert exported["teacher"]["config"]["num_layers"] == 36
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def tiny_jsonl(tmp_path):
    documents = ["hello world", "knowledge distillation", "ünïcödé"]
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    return path, documents


def test_cli_prepare_data_writes_a_megatron_dataset(tiny_jsonl, tmp_path):
    """`nemo kd prepare-data` tokenizes a jsonl into .bin/.idx holding every byte plus EODs."""
    path, documents = tiny_jsonl
    prefix = tmp_path / "out" / "tiny"
    result = _nemo(
        "kd",
        "prepare-data",
        f"inputs=['{path}']",
        f"output_prefix={prefix}",
        "workers=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from kd_module.data.tokenizers import TokenizerConfig

    tokenizer = TokenizerConfig().build()
    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == len(documents)
    for index, document in enumerate(documents):
        tokens = dataset[index].tolist()
        assert tokens == tokenizer.tokenize(document) + [tokenizer.eod]


def test_cli_cache_teacher_then_offline_distill(tiny_teacher, tmp_path):
    """`nemo kd cache-teacher --factory tiny_cpu` writes a cache; `nemo kd distill --factory
    "tiny_cpu(teacher_cache=...)"` trains from it without a teacher; a rerun resumes (no-op)."""
    cache = tmp_path / "cache"
    mock = ("data.paths=None", "data.mock=true")
    command = ("kd", "cache-teacher", "--factory", "tiny_cpu", "-y")
    arguments = (f"teacher.checkpoint={tiny_teacher}", *mock, "num_samples=48", f"out_dir={cache}")
    result = _nemo(*command, *arguments, "k=8", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["num_samples"] == 48 and manifest["k"] == 8
    assert manifest["dataset"]["mock"] is True and manifest["teacher"]["checkpoint"]
    markers = sorted(path.name for path in cache.glob("*.done"))
    assert markers == ["shard_00000.done"]  # 48 samples, shards of 256
    again = _nemo(*command, *arguments, "k=16", cwd=tmp_path)  # other settings: refused
    assert again.returncode != 0
    assert "manifest field 'k' is 8 in the cache but 16" in again.stdout + again.stderr

    result = _nemo(
        "kd",
        "distill",
        "--factory",
        f"tiny_cpu(teacher_cache='{cache}')",
        "-y",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        *mock,
        f"job.log_dir={tmp_path / 'runs'}",
        "job.name=offline",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "offline" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["configs"]["teacher_cache"] == str(cache)
    assert summary["configs"]["teacher"] is None and summary["train"]["logits_loss"] > 0


@pytest.mark.parametrize(
    ("command", "overrides", "task", "shown"),
    [
        (
            "cache-teacher",
            ("out_dir=/data/cache", "num_samples=12345"),
            "kd_module.offline.job:build_teacher_cache",
            ("12345", "/data/cache"),
        ),
        (
            "prune",
            ("output=/ckpt/minitron", "calibration_samples=777"),
            "kd_module.pruning.job:prune",
            ("777", "/ckpt/minitron", "hidden_size=3072"),
        ),
    ],
    ids=["cache-teacher", "prune"],
)
def test_cli_task_dryrun_of_a_gpu_pair_imports_no_megatron(
    tmp_path, command, overrides, task, shown
):
    """`nemo kd cache-teacher|prune --factory llama31_8b_to_llama32_1b --dryrun` resolves
    overrides without importing megatron or ModelOpt."""
    result = _nemo(
        "kd",
        command,
        "--factory",
        "llama31_8b_to_llama32_1b",
        "--dryrun",
        *overrides,
        cwd=tmp_path,
        python_flags=("-X", "importtime"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Dry run for task {task}" in result.stdout
    for text in shown:
        assert text in result.stdout, text
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert [name for name in imported if name.split(".")[0] in ("megatron", "modelopt")] == []


@pytest.mark.parametrize(
    "flags",
    [("--dryrun", "trainer.max_steps=5"), ("--to-yaml", "tiny_cpu.yaml"), ("--help",)],
    ids=["dryrun", "to-yaml", "help"],
)
def test_cli_dryrun_to_yaml_and_help_import_no_lightning_megatron_or_modelopt(flags, tmp_path):
    """`nemo kd distill --factory tiny_cpu` with --dryrun, --to-yaml or --help leaves lightning,
    megatron and modelopt out of sys.modules (the recipe's Lightning pieces are light configs)."""
    code = (
        "import sys\n"
        "from nemo_run.__main__ import app\n"
        "sys.argv = ['nemo', *sys.argv[1:]]\n"
        "try:\n"
        "    app()\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'megatron', "
        "'modelopt'})\n"
        "print('HEAVY', heavy)\n"
    )
    arguments = ("kd", "distill", "--factory", "tiny_cpu", *flags)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "HEAVY []" in result.stdout, result.stdout[-3000:]
    if flags[0] == "--to-yaml":
        assert (tmp_path / "tiny_cpu.yaml").is_file()


def test_cli_prune_then_distill_the_pruned_student(tiny_teacher, tmp_path):
    """`nemo kd prune --factory tiny_cpu` cuts a student out of the teacher (one layer, half
    the heads), and `nemo kd distill` trains it from that checkpoint."""
    pruned = tmp_path / "pruned"
    result = _nemo(
        "kd",
        "prune",
        "--factory",
        "tiny_cpu(mock_data=True)",
        "-y",
        f"teacher.checkpoint={tiny_teacher}",
        f"output={pruned}",
        "target.num_layers=1",
        "calibration_samples=16",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((pruned / "pruning.json").read_text())
    assert report["pruned"]["num_layers"] == 1 and report["pruned"]["num_attention_heads"] == 2
    assert report["pruned"]["parameters"] < report["teacher"]["parameters"]
    config = yaml.safe_load((pruned / "model_config.yaml").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["kv_channels"]) == (
        1,
        2,
        16,
    )

    result, run_dir = short_mock_distill(
        tmp_path,
        "pruned",
        f"teacher.checkpoint={tiny_teacher}",
        f"student_checkpoint={pruned}",
        "student.num_attention_heads=2",
        "student.kv_channels=16",
        "student.ffn_hidden_size=256",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["configs"]["student_checkpoint"] == str(pruned)


def test_cli_distill_student_from_prune(tiny_teacher, tmp_path):
    """`student_from=prune`: the run prunes the teacher to the recipe's student (one layer of
    two) into <run>/pruned, then distills from it."""
    result, run_dir = short_mock_distill(
        tmp_path,
        "from_prune",
        "student_from=prune",
        "prune_calibration_samples=16",
        f"teacher.checkpoint={tiny_teacher}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["configs"]["student_checkpoint"] == str(run_dir / "pruned")
    report = json.loads((run_dir / "pruned" / "pruning.json").read_text())
    assert report["pruned"]["num_layers"] == 1 and len(report["kept_layers"]) == 1
    assert report["calibration"]["samples"] == 16
