"""Faults: a rank killed mid-step (no hang, exact resume) and checkpoints that cannot be written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kd_module.parallel.collectives import free_port

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 300
"""Hard limit on one 2-rank launch; a hang after a rank dies fails the test instead of CI."""


def _launch(log_dir: Path, name: str, *extra: str) -> int:
    """Run the 2-rank job under torchrun; wait for it (hard timeout), then kill what it left."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "tests.reliability.fault_job",
        "--log-dir",
        str(log_dir),
        "--name",
        name,
        *extra,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (log_dir / f"{name}.log").open("a") as handle:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return process.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: still running after {JOB_TIMEOUT_S} s (a rank hangs)")
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _losses(log_dir: Path, name: str) -> list[dict]:
    lines = (log_dir / name / "losses.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _tail(log_dir: Path, name: str) -> str:
    return (log_dir / f"{name}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """The 2-rank job run to its end on one torchrun agent: its log directory and losses."""
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    assert _launch(log_dir, "full") == 0, _tail(log_dir, "full")
    return log_dir, {item["step"]: item for item in _losses(log_dir, "full")}


EXACT_KEYS = ("kd_loss", "logits_loss", "grad_norm", "lr")


def _assert_exact(items: list[dict], reference: dict[int, dict]) -> None:
    for item in items:
        for key in EXACT_KEYS:
            assert item[key] == reference[item["step"]][key], (item["step"], key)


@pytest.mark.multirank
def test_multi_rank_checkpoints_rotate_to_the_last_step(uninterrupted):
    """On 2 ranks every-2-steps saves keep the newest 2 (steps 4 and 6) with ``last`` at step 6.

    Lightning's top-k vote went through the strategy's ``reduce``, which leaves tensors alone:
    one vote never equalled the world size, so once 2 checkpoints existed no rank saved again
    and a 6-step run ended with steps 2 and 4 only.
    """
    log_dir, reference = uninterrupted
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    checkpoints = log_dir / "full" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last", "step=4", "step=6"]
    assert (checkpoints / "last").resolve() == (checkpoints / "step=6").resolve()


@pytest.mark.multirank
def test_sigkill_of_one_rank_ends_every_rank_and_resume_is_exact(uninterrupted, tmp_path):
    """DP=2: rank 1 SIGKILLed inside step 4 makes the whole launch exit (no hang, non-zero);
    resuming from the step-2 checkpoint repeats an uninterrupted run's losses exactly."""
    from kd_module.checkpoints.run import latest_checkpoint

    full_dir, reference = uninterrupted
    returncode = _launch(tmp_path, "killed", "--kill-rank", "1", "--kill-at-step", "4")
    assert returncode != 0, _tail(tmp_path, "killed")
    assert "SIGKILL" in _tail(tmp_path, "killed")
    before = _losses(tmp_path, "killed")
    assert [item["step"] for item in before] == [1, 2, 3]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step=2"

    assert _launch(tmp_path, "killed", "--resume") == 0, _tail(tmp_path, "killed")
    resumed = _losses(tmp_path, "killed")[len(before) :]
    assert [item["step"] for item in resumed] == [3, 4, 5, 6]
    _assert_exact(before + resumed, reference)
    # The teacher hash is combined over both ranks; the same seed gives the same teacher.
    hashes = {
        json.loads((directory / "summary.json").read_text())["teacher_sha256"]
        for directory in (full_dir / "full", tmp_path / "killed")
    }
    assert len(hashes) == 1 and len(hashes.pop()) == 64


# ---------------------------------------------------------------------------- a lost node

PEER_EXIT_BOUND_S = 90
"""How long the surviving node may take to exit after the other one died: the job's collective
timeout (``MegatronStrategy(timeout_minutes=1)``) plus margin. gloo notices a closed connection
at once; the timeout bounds a peer that stops answering without closing it."""


def _launch_two_nodes(
    log_dir: Path, name: str, *extra: str, store_node: int = 0
) -> tuple[list[int], list[float]]:
    """The job on two torchrun agents (``--nnodes 2 --nproc-per-node 1``, c10d rendezvous on
    127.0.0.1), each its own session as on two machines; logs in ``<name>.node<i>.log``.

    ``store_node``'s agent hosts the rendezvous store, as the machine named by the endpoint does
    on a cluster. Both agents here match 127.0.0.1, so without ``is_host`` whichever binds first
    hosts it; when that was the node a test kills, the survivor's agent lost the store and
    SIGTERMed its rank before the rank could say that its peer is gone (a CI flake).

    Returns:
        Each agent's return code and the time it ended (``time.monotonic``).
    """
    import time

    endpoint = f"127.0.0.1:{free_port()}"
    agents, handles = [], []
    for node in (0, 1):
        handle = (log_dir / f"{name}.node{node}.log").open("a")
        handles.append(handle)
        agents.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    "--nproc-per-node=1",
                    f"--node-rank={node}",
                    "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={endpoint}",
                    f"--rdzv-id={name}",
                    f"--rdzv-conf=is_host={int(node == store_node)}",
                    "--max-restarts=0",
                    "-m",
                    "tests.reliability.fault_job",
                    "--nodes",
                    "2",
                    "--log-dir",
                    str(log_dir),
                    "--name",
                    name,
                    *extra,
                ],
                cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    ended: list[float | None] = [None, None]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while None in ended and time.monotonic() < deadline:
            for node, agent in enumerate(agents):
                if ended[node] is None and agent.poll() is not None:
                    ended[node] = time.monotonic()
            time.sleep(0.2)
        if None in ended:
            pytest.fail(f"{name}: an agent still runs after {JOB_TIMEOUT_S} s (a rank hangs)")
    finally:
        for agent in agents:
            try:
                os.killpg(agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for handle in handles:
            handle.close()
    return [agent.returncode for agent in agents], ended


def _node_log(log_dir: Path, name: str, node: int) -> str:
    return (log_dir / f"{name}.node{node}.log").read_text()


def _lose_a_node_then_resume(
    log_dir: Path, name: str, dead: int, *kill: str, after_kill=lambda: None
) -> list[dict]:
    """Kill node ``dead`` (``kill`` says when); check the survivor's exit and ``after_kill``;
    resume; every loss record of both launches.

    The survivor hosts the rendezvous store. Losing the store's own node is torchrun's failure,
    not the job's: every other agent then ends its ranks (SIGTERM) as soon as it notices, which
    can be before a rank's collective reports the lost peer."""
    survivor = 1 - dead
    codes, ended = _launch_two_nodes(
        log_dir, name, "--kill-rank", str(dead), "--kill-node", *kill, store_node=survivor
    )
    assert codes[dead] == -signal.SIGKILL, _node_log(log_dir, name, dead)[-3000:]
    survivor_log = _node_log(log_dir, name, survivor)
    assert codes[survivor] not in (0, None), survivor_log[-3000:]
    assert ended[survivor] - ended[dead] < PEER_EXIT_BOUND_S
    checkpoints = log_dir / name / "checkpoints"
    assert f"rank {survivor} of 2: a peer rank is gone" in survivor_log, survivor_log[-3000:]
    assert f"resume to continue from the last complete checkpoint {checkpoints / 'step=2'}" in (
        survivor_log
    )
    after_kill()
    before = _losses(log_dir, name)
    codes, _ = _launch_two_nodes(log_dir, name, "--resume")
    assert codes == [0, 0], _node_log(log_dir, name, 0)[-3000:]
    assert (checkpoints / "last").resolve() == (checkpoints / "step=6").resolve()
    assert not (checkpoints / "last-v1").exists()  # the resumed run took over ``last``
    return before + _losses(log_dir, name)[len(before) :]


@pytest.mark.multirank
def test_a_node_lost_mid_step_stops_the_other_and_resume_is_exact(uninterrupted, tmp_path):
    """Two nodes (torchrun agents) of one rank each: node 1's whole process tree SIGKILLed at
    the start of step 4. Node 0 exits within the bound, saying a peer is gone and where a
    rerun resumes; the rerun continues from step 2 with the uninterrupted run's losses."""
    _, reference = uninterrupted
    items = _lose_a_node_then_resume(tmp_path, "node", 1, "--kill-at-step", "4")
    assert [item["step"] for item in items] == [1, 2, 3, 3, 4, 5, 6]
    _assert_exact(items, reference)


@pytest.mark.multirank
def test_a_node_lost_in_a_checkpoint_save_leaves_the_previous_one(uninterrupted, tmp_path):
    """Node 0 (rank 0, which completes checkpoints) SIGKILLed in the step-4 save, after writing
    its shards: step 4 stays a hidden temporary, node 1 exits naming step 2, and the rerun
    from step 2 repeats the uninterrupted run's losses."""
    from kd_module.checkpoints.run import is_complete

    _, reference = uninterrupted
    checkpoints = tmp_path / "save" / "checkpoints"

    def step_4_unfinished() -> None:
        assert not (checkpoints / "step=4").exists()
        assert not is_complete(checkpoints / ".tmp-step=4")

    items = _lose_a_node_then_resume(
        tmp_path, "save", 0, "--kill-at-step", "4", "--kill-in-save", after_kill=step_4_unfinished
    )
    assert [item["step"] for item in items] == [1, 2, 3, 4, 3, 4, 5, 6]
    _assert_exact(items, reference)
    assert is_complete(checkpoints / "step=4") and is_complete(checkpoints / "step=6")


# ---------------------------------------------------------------------------- unwritable


def _distill(log_dir: Path, max_steps: int, resume: bool = False) -> dict:
    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.models.gpt import GPTModelConfig
    from kd_module.training.strategy import MegatronStrategy

    student = GPTModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, vocab_size=512
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(seed=7),
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = GPTDataModule(
        mock=True, seq_length=32, micro_batch_size=2, global_batch_size=4, num_train_samples=32
    )
    return distill(
        student,
        data,
        trainer,
        teacher=student.replace(num_layers=3, hidden_size=48),
        log_dir=str(log_dir),
        name="run",
        checkpoint_every_n_steps=2,
        keep_last=2,
        resume=resume,
        export=False,
    )


def test_checkpoint_directory_under_a_file_is_refused_before_building(tmp_path, monkeypatch):
    """A checkpoint path that cannot be created (a regular file in the way) is refused up front,
    naming both paths, with no model built.

    Tests run as root, where chmod 0o500 does not stop writes: a file in the path simulates an
    unwritable directory.
    """
    import kd_module.distillation.model

    built = []
    monkeypatch.setattr(
        kd_module.distillation.model, "build_model", lambda *a, **k: built.append(a)
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a directory")
    with pytest.raises(
        ValueError,
        match=r"checkpoint directory .*run/checkpoints: cannot be created, .*run/checkpoints "
        r"is a file; give a directory path",
    ):
        _distill(tmp_path, max_steps=2)
    assert built == []


def test_unwritable_directory_message_names_it(tmp_path, monkeypatch):
    """writable_dir_problems names a read-only ancestor (os.access mocked: root bypasses modes)."""
    from kd_module.rules import writable_dir_problems

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert writable_dir_problems(tmp_path / "a" / "b", "checkpoint directory") == [
        f"checkpoint directory {tmp_path / 'a' / 'b'}: {tmp_path} is not writable; "
        "give a writable directory"
    ]


def test_failing_save_raises_and_the_last_good_checkpoint_resumes(tmp_path, monkeypatch):
    """When writing step 6 fails with EACCES the fit raises it naming the path; step=4 stays
    the latest complete checkpoint and a resumed run from it finishes.

    The failure is injected into megatron's ``dist_checkpointing.save`` (root ignores modes).
    """
    from megatron.core import dist_checkpointing

    from kd_module.checkpoints.run import is_complete, latest_checkpoint

    _distill(tmp_path, max_steps=4)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step=4"

    def denied(state, directory, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(directory))

    monkeypatch.setattr(dist_checkpointing, "save", denied)
    with pytest.raises(PermissionError, match=r"Permission denied: '.*\.tmp-step=6'"):
        _distill(tmp_path, max_steps=8, resume=True)
    monkeypatch.undo()
    assert latest_checkpoint(checkpoints) == checkpoints / "step=4"
    assert is_complete(checkpoints / "step=4")

    summary = _distill(tmp_path, max_steps=8, resume=True)
    assert summary["steps"] == 8
    assert latest_checkpoint(checkpoints) == checkpoints / "step=8"
