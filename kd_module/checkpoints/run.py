"""Checkpoints of a training run: student-only megatron distributed checkpoints, exact resume.

A run checkpoint is a directory written collectively with ``megatron.core.dist_checkpointing``:

- ``model``: the student's sharded state (ModelOpt's megatron adjustments hide the teacher; the
  trainable projection of intermediate losses, if any, is kept so a resume is exact);
- ``optimizer``: megatron's optimizer state, sharded like the model;
- ``rng``: every rank's torch and megatron RNG states;
- common state (rank 0): Lightning's loop, callback and data-module state (step, consumed
  samples), the learning-rate schedule, the layout and world size.

It is written under a hidden temporary name and renamed when every rank has finished, so a crash
during a save never leaves a partial checkpoint under a checkpoint's name: the previous one stays
the latest complete checkpoint.

:class:`RunCheckpoint` is Lightning's ``ModelCheckpoint`` set up for these checkpoints: every N
steps and at the end of training, keeping the newest K, with ``last`` linking to the newest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_module.checkpoints.atomic import replace_directory
from kd_module.parallel.collectives import all_gather_object, barrier, rank
from kd_module.rules import Problems, positive_int_problems
from kd_module.upstream import lightning as upstream_lightning

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_LIGHTNING_KEYS_OUTSIDE_COMMON = ("state_dict", "optimizer_states")


def _all_agree(ok: bool) -> bool:
    """Whether every rank reports ``ok`` (works with gloo and NCCL)."""
    return all(all_gather_object(ok))


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    from kd_module.parallel import runtime

    if runtime.uses_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    from kd_module.parallel import runtime

    if "cuda" in state and runtime.uses_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_object(data: Any) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return ShardedObject("rng_state", data, (world,), (rank(),), replica_id=0)


def _sharded_state(module: Any, is_loading: bool) -> dict[str, Any]:
    core = module.core_model
    model_state = core.sharded_state_dict()
    optimizer = module.optimizers(use_pl_optimizer=False).megatron_optimizer
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading),
    }


def save_run_checkpoint(module: Any, checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a run checkpoint of ``module`` (a GPTModule/DistillationModule) collectively.

    Args:
        module: the LightningModule (its optimizer and LR scheduler are saved too).
        checkpoint: Lightning's checkpoint dict (loops, callbacks, data module state...).
        path: the checkpoint directory to create (replaced if it exists).

    Returns:
        The final directory.
    """
    from megatron.core import dist_checkpointing

    final = Path(path)
    staging = final.parent / f"{_TMP_PREFIX}{final.name}"
    failure: Exception | None = None
    if rank() == 0:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as error:
            failure = error
    # Every rank learns whether rank 0 could prepare the directory, instead of waiting at a
    # barrier for a rank that has already raised.
    if not _all_agree(failure is None):
        if failure is not None:
            raise failure
        raise OSError(f"save checkpoint {final}: rank 0 could not create {staging}")
    state = _sharded_state(module, is_loading=False)
    state["rng"] = _rng_object(_rng_state())
    common = {k: v for k, v in checkpoint.items() if k not in _LIGHTNING_KEYS_OUTSIDE_COMMON}
    common["lr_scheduler"] = module.lr_scheduler.state_dict()
    common["world_size"] = (
        torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    )
    state["lightning"] = common
    dist_checkpointing.save(state, str(staging))
    barrier()
    if rank() == 0:
        replace_directory(staging, final)
    barrier()
    return final


def load_run_checkpoint(module: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Load model, optimizer, LR schedule and RNG into ``module``; return Lightning's state.

    The model and optimizer must already be built (megatron's optimizer state is sharded like the
    model), which is why ``MegatronStrategy`` restores after setup.

    Raises:
        ValueError: when ``path`` is not a complete run checkpoint.
    """
    from megatron.core import dist_checkpointing

    directory = Path(path).resolve()
    if not is_complete(directory):
        raise ValueError(
            f"resume: {path} is not a complete run checkpoint (expected a directory written by "
            "MegatronStrategy.save_checkpoint, with metadata.json and common.pt)"
        )
    common = dist_checkpointing.load_common_state_dict(str(directory))
    lightning_state = dict(common["lightning"])
    state = _sharded_state(module, is_loading=True)
    same_world = lightning_state.get("world_size") == (
        torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    )
    if same_world:
        state["rng"] = _rng_object(None)
    loaded = dist_checkpointing.load(state, str(directory))
    module.core_model.load_state_dict(loaded["model"])
    module.optimizers(use_pl_optimizer=False).megatron_optimizer.load_state_dict(
        loaded["optimizer"]
    )
    module.lr_scheduler.load_state_dict(lightning_state.pop("lr_scheduler"))
    if same_world:
        _set_rng_state(loaded["rng"].data if hasattr(loaded["rng"], "data") else loaded["rng"])
    else:
        logger.warning("resume: world size changed; RNG states restart from the seed")
    lightning_state["state_dict"] = {}
    lightning_state.setdefault("lr_schedulers", [])
    return lightning_state


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished run checkpoint (never a temporary one)."""
    directory = Path(path)
    return (
        directory.is_dir()
        and not directory.name.startswith(_TMP_PREFIX)
        and (directory / "metadata.json").exists()
        and (directory / "common.pt").exists()
    )


_STEP = re.compile(r"step=(\d+)")


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete run checkpoint with the highest step under ``directory`` (or ``None``)."""
    root = Path(directory)
    if not root.is_dir():
        return None
    best: tuple[int, float, Path] | None = None
    for candidate in root.iterdir():
        if candidate.is_symlink() or not is_complete(candidate):
            continue
        match = _STEP.search(candidate.name)
        step = int(match.group(1)) if match else -1
        key = (step, candidate.stat().st_mtime, candidate)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def remove_run_checkpoint(path: str | os.PathLike) -> None:
    """Delete a run checkpoint (rank 0; Lightning's ModelCheckpoint rotation)."""
    target = Path(path)
    if rank() != 0:
        return
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)


class RunCheckpoint(ModelCheckpoint):
    """Save every N steps and at the end, keep the last K.

    Args:
        dirpath: directory of the checkpoints (``<run_dir>/checkpoints`` from ``distill``).
        every_n_train_steps: steps between saves.
        keep_last: how many checkpoints to keep (the newest ones).

    Raises:
        ValueError: for a non-positive interval or count.

    Examples:
        >>> trainer = L.Trainer(..., callbacks=[RunCheckpoint("runs/a/checkpoints", 100, 3)])
    """

    FILE_EXTENSION = ""

    def __init__(
        self, dirpath: str | None = None, every_n_train_steps: int = 100, keep_last: int = 2
    ):
        problems = positive_int_problems(
            every_n_train_steps=every_n_train_steps, keep_last=keep_last
        )
        Problems(problems).raise_if_any("RunCheckpoint")
        super().__init__(
            dirpath=dirpath,
            filename="step={step}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps,
            save_top_k=keep_last,
            monitor="step",
            mode="max",
            save_last="link",
            save_on_train_epoch_end=False,
        )
        self.keep_last = keep_last

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Adopt the ``last`` link a previous fit left in the directory (a resumed run).

        Runs after the callback state is restored. Lightning keeps the link's path in its state
        only once it has made one; a run resumed from a checkpoint saved before that would find
        ``last`` taken and link ``last-v1`` instead, leaving ``last`` at an old step.
        """
        super().on_train_start(trainer, pl_module)
        if self.dirpath is not None:
            last = Path(self.dirpath) / self.CHECKPOINT_NAME_LAST
            if last.is_symlink():
                self.last_model_path = str(last)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Save the final state unless the last interval already did."""
        if (
            trainer.global_step == 0
            or upstream_lightning.last_checkpoint_step(self) == trainer.global_step
        ):
            return
        upstream_lightning.save_checkpoint_now(self, trainer)
