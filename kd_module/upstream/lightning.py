"""Private Lightning internals we rely on, one named accessor each (written against 2.6.6).

Every function takes the upstream object it reads or changes and imports nothing, so calling
one costs what the attribute access costs.
"""

from __future__ import annotations

from typing import Any


def attached_trainer(module: Any) -> Any | None:
    """The Trainer a LightningModule is attached to, or ``None`` before it is attached.

    Lightning 2.6.6: ``LightningModule.trainer`` raises ``RuntimeError`` when no Trainer is
    attached, so the strategy, which runs before and after a fit, reads the backing attribute
    ``LightningModule._trainer`` instead.

    Args:
        module: a ``LightningModule``.

    Returns:
        The attached ``Trainer``, or ``None``.
    """
    return getattr(module, "_trainer", None)


def disable_distributed_sampler(trainer: Any) -> None:
    """Stop Lightning from wrapping the data loaders' samplers in a ``DistributedSampler``.

    Lightning 2.6.6 fixes ``Trainer(use_distributed_sampler=...)`` at construction, in the private
    ``trainer._accelerator_connector.use_distributed_sampler``, which its data connector
    (``_DataConnector._requires_distributed_sampler``) reads. The megatron-style sampler already
    splits batches across data-parallel ranks, so ``MegatronStrategy`` turns the flag off for
    every Trainer it runs in, whatever the user passed.

    Args:
        trainer: the ``Trainer``.
    """
    trainer._accelerator_connector.use_distributed_sampler = False


def clear_launcher(strategy: Any) -> None:
    """Run a strategy in the current process: no launcher.

    Lightning 2.6.6: a strategy's ``_configure_launcher`` hook sets the private
    ``Strategy._launcher`` (read back by the public ``Strategy.launcher``), and the Trainer spawns
    processes through it when it is not ``None``. ``DDPStrategy`` always sets one, and its
    launcher refuses an interactive environment; a single in-process rank (a notebook, a plain
    script) needs none.

    Args:
        strategy: the strategy whose ``_configure_launcher`` is running.
    """
    strategy._launcher = None


def callback_state_key(callback: Any, **arguments: Any) -> str:
    """The ``state_key`` of a callback whose state depends on its arguments.

    Lightning 2.6.6 offers subclasses the protected ``Callback._generate_state_key`` (the class
    qualname followed by the arguments' ``repr``), so that two instances with different
    arguments keep their own entry in a checkpoint's ``callbacks`` section.

    Args:
        callback: the callback.
        **arguments: the arguments that tell instances apart.

    Returns:
        The key.
    """
    return callback._generate_state_key(**arguments)


def last_checkpoint_step(checkpoint: Any) -> int:
    """The global step a ``ModelCheckpoint`` last saved at (0 before its first save).

    Lightning 2.6.6 keeps it in the private ``ModelCheckpoint._last_global_step_saved``; nothing
    public says whether the end of a fit still needs a save.

    Args:
        checkpoint: the ``ModelCheckpoint``.

    Returns:
        The step of its last save.
    """
    return checkpoint._last_global_step_saved


def save_checkpoint_now(checkpoint: Any, trainer: Any) -> None:
    """Save the current state through a ``ModelCheckpoint``: its top-k bookkeeping and ``last``.

    Lightning 2.6.6 saves only on its own schedule (every N steps, epoch ends); the sequence it
    runs then is private: ``_monitor_candidates`` (the logged metrics plus ``epoch`` and
    ``step``), ``_save_topk_checkpoint`` and ``_save_last_checkpoint``. ``RunCheckpoint`` runs
    the same sequence at the end of a fit, so a final save keeps the file names, the top-k
    pruning and the ``last`` link of the scheduled ones.

    Args:
        checkpoint: the ``ModelCheckpoint``.
        trainer: the running ``Trainer``.
    """
    candidates = checkpoint._monitor_candidates(trainer)
    checkpoint._save_topk_checkpoint(trainer, candidates)
    checkpoint._save_last_checkpoint(trainer, candidates)
