"""Bad inputs are refused with one message naming the culprit, before any model is built.

Every row of :data:`CASES` is one bad input: what it breaks, the error it must raise (matched by
message) and whether the refusal can come before megatron builds a model. Checkpoint rows also
prove that a refused run leaves the checkpoint directory byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kd_module.models.gpt import GPTModelConfig

ROOT = Path(__file__).resolve().parents[2]
SEQ = 32
STUDENT = GPTModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=512
)
TEACHER = STUDENT.replace(num_layers=4, hidden_size=48)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A real torch_dist teacher checkpoint (with model_config.yaml), and bad files to point at."""
    from kd_module.checkpoints.model import save_model_checkpoint
    from kd_module.models.gpt import ParallelLayout, build_model
    from kd_module.parallel import runtime
    from tests.helpers import init_weights_by_global_key

    root = tmp_path_factory.mktemp("bad_inputs")
    runtime.initialize_distributed(seed=1)
    try:
        teacher = build_model(TEACHER, ParallelLayout(), None)
        init_weights_by_global_key(teacher, seed=3)
        save_model_checkpoint(teacher, root / "teacher", model_config=TEACHER)
    finally:
        runtime.destroy_distributed()
    truncated = root / "truncated"
    shutil.copytree(root / "teacher", truncated)
    for shard in truncated.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (root / "empty").mkdir()
    (root / "neither").mkdir()
    (root / "neither" / "weights.bin").write_text("x")
    (root / "tracker").mkdir()
    (root / "tracker" / "latest_checkpointed_iteration.txt").write_text("7")
    (root / "empty.jsonl").write_text("")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "nokey.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    (root / "garbled.yaml").write_text("num_layers: [4\nhidden_size: 48\n")
    yamls = {
        "unknown_key.yaml": "num_layers: 4\nhiden_size: 48\n",
        "activation.yaml": "num_layers: 4\nactivation: swishy\n",
        "normalization.yaml": "num_layers: 4\nnormalization: batchnorm\n",
        "wrong_type.yaml": "num_layers: four\n",
    }
    for name, text in yamls.items():
        (root / name).write_text(text)
    return {path.name: path for path in root.iterdir()}


@pytest.fixture
def builds(monkeypatch) -> list[Any]:
    """Records every megatron model build (the real build still runs)."""
    import kd_module.distillation.model
    import kd_module.models.gpt

    calls: list[Any] = []
    real = kd_module.models.gpt.build_model

    def recording_build_model(config, *args, **kwargs):
        calls.append(config)
        return real(config, *args, **kwargs)

    monkeypatch.setattr(kd_module.models.gpt, "build_model", recording_build_model)
    monkeypatch.setattr(kd_module.distillation.model, "build_model", recording_build_model)
    return calls


def _trainer(devices: int = 1, max_steps: int = 1, **strategy: Any) -> Any:
    import lightning as L

    from kd_module.training.strategy import MegatronStrategy

    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=MegatronStrategy(**strategy),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _data(**overrides: Any) -> Any:
    from kd_module.data import GPTDataModule

    arguments = {
        "mock": True,
        "seq_length": SEQ,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "num_train_samples": 8,
    }
    return GPTDataModule(**{**arguments, **overrides})


def _distill(files: dict[str, Path], data: Any = None, trainer: Any = None, **kwargs: Any) -> Any:
    from kd_module.api import distill

    arguments = {"teacher": TEACHER, "log_dir": str(files["teacher"].parent / "runs")}
    arguments.update(kwargs)
    student = arguments.pop("student", STUDENT)
    return distill(student, data or _data(), trainer or _trainer(), export=False, **arguments)


def _distill_config(files: dict[str, Path], config: dict[str, Any]) -> None:
    _distill(files, distill_config=config)


def _teacher_yaml(files: dict[str, Path], name: str) -> None:
    from kd_module.nemo_format.discovery import load_teacher_model_config

    load_teacher_model_config(str(files[name]), STUDENT)


def _prepare(files: dict[str, Path], name: str) -> None:
    from kd_module.data.prepare import prepare_data

    prepare_data([str(files[name])], str(files["teacher"].parent / "out" / name), workers=1)


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One bad input."""

    id: str
    """Test id."""
    call: Callable[[dict[str, Path]], Any]
    """Runs the refused call with the module's files."""
    match: str
    """Regex the message must match: the culprit and what is allowed."""
    error: type[BaseException] = ValueError
    """The exception type."""
    before_build: bool = True
    """Refused before any megatron model is built."""
    checkpoint: str | None = None
    """Name of a checkpoint directory under the files whose bytes must not change."""
    one_line: bool = True
    """The message is a single line (``friendly_errors`` folds the others on the CLI)."""


CASES = [
    # ---- distillation config
    Case(
        "distill-unknown-key",
        lambda f: _distill_config(f, {"logit_layer": ["output_layer", "output_layer"]}),
        r"distill config.*unknown key 'logit_layer'.*did you mean 'logit_layers'",
    ),
    Case(
        "distill-wrong-type",
        lambda f: _distill_config(f, {"skip_lm_loss": "yes"}),
        r"skip_lm_loss='yes' must be true or false",
    ),
    Case(
        "distill-zero-temperature",
        lambda f: _distill_config(f, {"logit_kl_temperature": 0}),
        r"logit_kl_temperature=0 must be a number > 0",
    ),
    Case(
        "distill-negative-scale",
        lambda f: _distill_config(f, {"kd_loss_scale": -1.0}),
        r"kd_loss_scale=-1.0 must be a number > 0",
    ),
    Case(
        "distill-logit-layers-length",
        lambda f: _distill_config(f, {"logit_layers": ["output_layer"]}),
        r"logit_layers=\['output_layer'\] must be a list of exactly 2 non-empty strings",
    ),
    Case(
        "distill-pair-too-short",
        lambda f: _distill_config(f, {"intermediate_layer_pairs": [["decoder.final_layernorm"]]}),
        r"intermediate_layer_pairs\[0\]=\['decoder.final_layernorm'\] must be "
        r"\[student_module, teacher_module\]",
    ),
    Case(
        "distill-pair-unknown-loss",
        lambda f: _distill_config(
            f,
            {
                "intermediate_layer_pairs": [
                    ["decoder.final_layernorm", "decoder.final_layernorm", "cosin"]
                ]
            },
        ),
        r"loss 'cosin' is not one of cosine, mse.*did you mean 'cosine'",
    ),
    Case(
        "distill-unknown-logit-loss",
        lambda f: _distill_config(f, {"logit_loss": "kl"}),
        r"logit_loss='kl' is not one of forward_kl, reverse_kl, jsd",
    ),
    Case(
        "distill-jsd-beta",
        lambda f: _distill_config(f, {"logit_loss": "jsd", "jsd_beta": 1.0}),
        r"jsd_beta=1.0 must be a number strictly between 0 and 1",
    ),
    Case(
        "distill-layer-does-not-exist",
        lambda f: _distill_config(
            f, {"intermediate_layer_pairs": [["decoder.layers.7", "decoder.layers.3"]]}
        ),
        r"student intermediate layer 'decoder.layers.7': layer 7 does not exist "
        r"\(num_layers=2, indices 0 to 1\)",
    ),
    Case(
        "distill-layer-not-on-last-stage",
        lambda f: _distill(
            f,
            trainer=_trainer(devices=2, pipeline_model_parallel_size=2),
            data=_data(micro_batch_size=2),
            distill_config={"intermediate_layer_pairs": [["decoder.layers.0", "decoder.layers.3"]]},
        ),
        r"student intermediate layer 'decoder.layers.0' is on pipeline stage 0 of 2;.*"
        r"holds layers 1 to 1",
    ),
    Case(
        "distill-unknown-module-name",
        lambda f: _distill_config(
            f, {"logit_layers": ["output_layer", "output_projection"], "skip_lm_loss": True}
        ),
        r"distill config: teacher.*'output_projection'",
        before_build=False,  # module names exist only on a built model
    ),
    Case(
        "distill-yaml-missing",
        lambda f: _distill(f, distill_config=str(f["teacher"].parent / "nope.yaml")),
        r"nope.yaml: no such file",
        error=FileNotFoundError,
    ),
    # ---- teacher architecture (NeMo-style model_config.yaml)
    Case(
        "teacher-unknown-key",
        lambda f: _teacher_yaml(f, "unknown_key.yaml"),
        r"unknown key 'hiden_size'.*did you mean 'hidden_size'",
    ),
    Case(
        "teacher-bad-activation",
        lambda f: _teacher_yaml(f, "activation.yaml"),
        r"activation.*'swishy'",
    ),
    Case(
        "teacher-bad-normalization",
        lambda f: _teacher_yaml(f, "normalization.yaml"),
        r"normalization='batchnorm' is not one of layernorm, layernorm1p, rmsnorm",
    ),
    Case(
        "teacher-wrong-type",
        lambda f: _teacher_yaml(f, "wrong_type.yaml"),
        r"num_layers.*'four'",
    ),
    Case(
        "teacher-unreadable-yaml",
        lambda f: _teacher_yaml(f, "garbled.yaml"),
        r"garbled.yaml: not valid YAML.*line",
    ),
    Case(
        "teacher-yaml-missing",
        lambda f: _distill(f, teacher=None, teacher_model_config=str(f["empty"] / "x.yaml")),
        r"x.yaml: no such file",
        error=FileNotFoundError,
    ),
    # ---- checkpoints
    Case(
        "checkpoint-missing-directory",
        lambda f: _distill(f, teacher_checkpoint=str(f["empty"] / "missing")),
        r"teacher_checkpoint: checkpoint .*missing: no such directory; expected a checkpoint",
    ),
    Case(
        "checkpoint-empty-directory",
        lambda f: _distill(f, teacher_checkpoint=str(f["empty"])),
        r"teacher_checkpoint: checkpoint .*empty: empty directory; expected a torch_dist",
    ),
    Case(
        "checkpoint-neither-format",
        lambda f: _distill(f, teacher_checkpoint=str(f["neither"])),
        r"no known format; expected metadata.json \(torch_dist\), .*found weights.bin",
    ),
    Case(
        "checkpoint-dangling-tracker",
        lambda f: _distill(f, teacher_checkpoint=str(f["tracker"])),
        r"latest_checkpointed_iteration.txt names iter_0000007, which does not exist",
    ),
    Case(
        "checkpoint-wrong-format-requested",
        lambda f: _distill(f, teacher_checkpoint=str(f["teacher"]), teacher_ckpt_format="torch"),
        r"teacher_checkpoint: ckpt_format='torch' was requested but .* holds a torch_dist "
        r"checkpoint; use 'auto' or 'torch_dist'",
        checkpoint="teacher",
    ),
    Case(
        "checkpoint-unknown-format",
        lambda f: _distill(f, teacher_checkpoint=str(f["teacher"]), teacher_ckpt_format="zarr"),
        r"ckpt_format='zarr' is not one of auto, torch_dist, torch",
        checkpoint="teacher",
    ),
    Case(
        "checkpoint-student-missing",
        lambda f: _distill(f, student_checkpoint=str(f["empty"] / "student")),
        r"student_checkpoint: checkpoint .*student: no such directory",
    ),
    Case(
        "checkpoint-vocabulary-mismatch",
        lambda f: _distill(
            f, teacher=TEACHER.replace(vocab_size=256), teacher_checkpoint=str(f["teacher"])
        ),
        # Paddings may differ now; a teacher below the byte tokenizer's 258 tokens may not.
        r"vocabulary: the teacher's padded vocab_size 256 is smaller than the tokenizer's 258",
        checkpoint="teacher",
    ),
    Case(
        "checkpoint-architecture-mismatch",
        lambda f: _distill(
            f,
            teacher=TEACHER.replace(hidden_size=64, ffn_hidden_size=128),
            teacher_checkpoint=str(f["teacher"]),
        ),
        r"shape mismatch for \d+ tensors .*checkpoint \(48,\), model \(64,\)",
        before_build=False,  # shapes are compared against the built model
        checkpoint="teacher",
    ),
    Case(
        "checkpoint-truncated",
        lambda f: _distill(f, teacher_checkpoint=str(f["truncated"])),
        r"checkpoint .*truncated: loading failed .*corrupt",
        before_build=False,  # the shards are read into the built model
        checkpoint="truncated",
        one_line=False,  # kd_module.checkpoints.model quotes torch's multi-line CheckpointException
    ),
    # ---- data
    Case(
        "data-missing-prefix",
        lambda f: _distill(
            f, data=_data(mock=False, paths=[str(f["empty"] / "corpus")], num_train_samples=None)
        ),
        r"data paths: no megatron dataset \(.bin and .idx\) at prefix '.*corpus'; create one",
    ),
    Case(
        "data-no-paths",
        lambda f: _data(mock=False, paths=None),
        r"data config: paths is None; give dataset prefixes or set mock=True",
    ),
    Case(
        "data-empty-file",
        lambda f: _prepare(f, "empty.jsonl"),
        r"prepare_data: .*empty.jsonl is empty",
    ),
    Case(
        "data-bad-json-line",
        lambda f: _prepare(f, "bad.jsonl"),
        r"prepare_data: .*bad.jsonl:2: bad JSON line",
    ),
    Case(
        "data-missing-key",
        lambda f: _prepare(f, "nokey.jsonl"),
        r"nokey.jsonl:2: missing key 'text' \(keys present: 'body'\)",
    ),
    Case(
        "data-seq-length-too-long",
        lambda f: _distill(f, data=_data(seq_length=2 * SEQ)),
        r"student: seq_length=64 is larger than the model's max_position_embeddings=32",
    ),
    Case(
        "data-micro-batch-zero",
        lambda f: _data(micro_batch_size=0),
        r"micro_batch_size=0 must be an integer >= 1",
    ),
    # ---- parallel layout
    Case(
        "layout-tp-does-not-divide-heads",
        lambda f: _distill(f, trainer=_trainer(devices=3, tensor_model_parallel_size=3)),
        r"student: num_attention_heads=4 is not divisible by tensor_model_parallel_size=3",
    ),
    Case(
        "layout-pp-does-not-divide-layers",
        lambda f: _distill(f, trainer=_trainer(devices=3, pipeline_model_parallel_size=3)),
        r"student: num_layers=2 is not divisible by pipeline_model_parallel_size=3",
    ),
    Case(
        "layout-interleaved-pipeline",
        lambda f: _distill(
            f,
            trainer=_trainer(
                devices=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2
            ),
        ),
        r"virtual_pipeline_model_parallel_size=2 \(interleaved pipeline parallelism\) is not "
        r"supported for distillation; use None",
    ),
    Case(
        "layout-world-size-not-divisible",
        lambda f: _distill(f, trainer=_trainer(devices=3, tensor_model_parallel_size=2)),
        r"world size 3 \(num_nodes x devices\) is not divisible by .* = 2",
    ),
    Case(
        "layout-global-batch-not-divisible",
        lambda f: _distill(f, trainer=_trainer(devices=2), data=_data(global_batch_size=6)),
        r"global_batch_size=6 is not divisible by micro_batch_size=2 x data_parallel_size=2",
    ),
    Case(
        "layout-zero-tp",
        lambda f: _trainer(tensor_model_parallel_size=0),
        r"tensor_model_parallel_size=0 must be a positive integer",
    ),
    Case(
        "trainer-max-steps",
        lambda f: _distill(f, trainer=_trainer(max_steps=-1)),
        r"trainer.max_steps=-1 must be a positive integer",
    ),
    Case(
        "run-on-nonfinite",
        lambda f: _distill(f, on_nonfinite="ignore"),
        r"on_nonfinite='ignore' is not one of 'skip', 'stop'",
    ),
    Case(
        "run-keep-last",
        lambda f: _distill(f, keep_last=0),
        r"keep_last=0 must be a positive integer",
    ),
]


def _tree_sha256(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_the_table_is_large_and_ids_are_unique():
    """At least 30 bad inputs, each with its own id."""
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_with_one_message(case, files, builds):
    """The call fails with one message naming the culprit and what is allowed; it builds no
    megatron model when the refusal can precede building; checkpoints stay byte-identical."""
    before = _tree_sha256(files[case.checkpoint]) if case.checkpoint else None
    with pytest.raises(case.error, match=case.match) as caught:
        case.call(files)
    message = str(caught.value)
    if case.one_line:
        assert "\n" not in message.strip(), message
    if case.before_build:
        assert builds == [], f"{case.id}: a model was built before the refusal"
    if before is not None:
        assert _tree_sha256(files[case.checkpoint]) == before


def test_all_problems_are_collected_in_one_message(files):
    """Several bad distill-config fields are reported together, each by name."""
    with pytest.raises(ValueError) as caught:
        _distill_config(files, {"kd_loss_scale": 0, "logit_kl_temperature": -2, "bogus": 1})
    message = str(caught.value)
    for culprit in ("kd_loss_scale=0", "logit_kl_temperature=-2", "unknown key 'bogus'"):
        assert culprit in message, message


# ---------------------------------------------------------------------------- command line


def _python(code: str, debug: bool) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("KD_DEBUG", None)
    if debug:
        environment["KD_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


FRIENDLY_SCRIPT = """
from kd_module.distillation.config import load_distill_config
from kd_module.cli.errors import friendly_errors

with friendly_errors():
    load_distill_config({"logit_kl_temperature": -1.0})
"""


@pytest.mark.parametrize("debug", [False, True], ids=["default", "KD_DEBUG=1"])
def test_friendly_errors_one_line_by_default_traceback_with_kd_debug(debug):
    """In a real process: one `error:` line and exit 2 by default; the traceback with KD_DEBUG=1."""
    result = _python(FRIENDLY_SCRIPT, debug)
    culprit = r"logit_kl_temperature=-1.0 must be a number > 0"
    if debug:
        assert result.returncode == 1, result.stderr
        assert "Traceback (most recent call last)" in result.stderr
        assert re.search(culprit, result.stderr)
    else:
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert re.match(r"error: distill config <dict>: " + culprit, lines[0]), lines


NEMO = str(Path(sys.executable).with_name("nemo"))


@pytest.mark.parametrize("debug", [False, True], ids=["default", "KD_DEBUG=1"])
def test_nemo_kd_cli_refuses_bad_input_without_traceback(debug, files, tmp_path):
    """`nemo kd distill` with a bad override: one `error:` line naming it, exit 2, no traceback;
    KD_DEBUG=1 shows the traceback (kd_module.cli.errors.cli_errors around distill)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    environment.pop("KD_DEBUG", None)
    if debug:
        environment["KD_DEBUG"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            NEMO,
            "kd",
            "distill",
            "--factory",
            "tiny_cpu",
            "-y",
            "trainer.max_steps=-1",
            f"teacher.checkpoint={files['teacher']}",
            "data.paths=None",
            "data.mock=true",
            f"job.log_dir={tmp_path}",
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "trainer.max_steps=-1 must be a positive integer" in output, output[-3000:]
    assert ("Traceback (most recent call last)" in output) == debug, output[-3000:]
    if not debug:
        assert result.returncode == 2, output[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "trainer.max_steps=-1" in lines[0], result.stderr[-3000:]
