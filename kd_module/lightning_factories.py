"""Recipe targets that build the Lightning objects of a run, importable without Lightning.

A recipe is ``run.Config`` pieces, and ``run.Config`` needs a callable with a signature when the
recipe is made. Were those callables :class:`lightning.Trainer`,
:class:`~kd_module.training.strategy.MegatronStrategy` and
:class:`~kd_module.data.datamodule.GPTDataModule` themselves, ``nemo kd distill --dryrun``,
``--to-yaml`` and ``--help`` would import Lightning (about 3 s of a 8 s command) only to print a
config. The functions here take the same arguments, import Lightning when they are called (by
``fdl.build`` when the task starts on its ranks) and return those very objects, so a run is
unchanged.

:func:`gpt_data_module` and :func:`megatron_strategy` repeat their class's ``__init__``
signature (``tests/kd_module/test_lightning_factories.py`` checks that they stay equal).
:func:`lightning_trainer` names the ``Trainer`` arguments the recipes set and passes any other
through ``**kwargs``, typed as scalars so that nemo-run parses ``trainer.enable_progress_bar=false``
as ``False``. The return annotations are ``Any``: the CLI evaluates every annotation (nemo-run
parses overrides by them), and naming the built classes would import Lightning.
"""

from __future__ import annotations

from typing import Any

from kd_module.data.tokenizers import TokenizerConfig


def lightning_trainer(
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    strategy: Any = "auto",
    max_steps: int = -1,
    val_check_interval: int | float | None = None,
    limit_val_batches: int | float | None = None,
    log_every_n_steps: int | None = None,
    num_sanity_val_steps: int | None = None,
    logger: bool | None = None,
    enable_checkpointing: bool | None = None,
    callbacks: list[Any] | None = None,
    default_root_dir: str | None = None,
    **kwargs: int | float | bool | str | None,
) -> Any:
    """``lightning.Trainer(...)`` with these arguments (Lightning's defaults) and ``kwargs``.

    Args:
        accelerator: ``gpu``, ``cpu`` or ``auto``.
        devices: ranks per machine.
        num_nodes: machines.
        strategy: the built strategy (a :func:`megatron_strategy` config in a recipe).
        max_steps: optimizer steps.
        val_check_interval: steps between validations.
        limit_val_batches: validation batches per validation.
        log_every_n_steps: steps between logged rows.
        num_sanity_val_steps: validation batches before training.
        logger: Lightning's logger switch.
        enable_checkpointing: Lightning's ``ModelCheckpoint`` switch.
        callbacks: built Lightning callbacks.
        default_root_dir: Lightning's root directory.
        **kwargs: any other ``lightning.Trainer`` argument.

    Returns:
        The ``lightning.Trainer``.
    """
    import lightning

    return lightning.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        limit_val_batches=limit_val_batches,
        log_every_n_steps=log_every_n_steps,
        num_sanity_val_steps=num_sanity_val_steps,
        logger=logger,
        enable_checkpointing=enable_checkpointing,
        callbacks=callbacks,
        default_root_dir=default_root_dir,
        **kwargs,
    )


def megatron_strategy(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    virtual_pipeline_model_parallel_size: int | None = None,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    grad_reduce_in_fp32: bool = True,
    precision: str = "fp32",
    seed: int = 1234,
    timeout_minutes: int = 10,
    **kwargs: Any,
) -> Any:
    """:class:`~kd_module.training.strategy.MegatronStrategy` with these arguments (its own)."""
    from kd_module.training.strategy import MegatronStrategy

    return MegatronStrategy(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=overlap_grad_reduce,
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        precision=precision,
        seed=seed,
        timeout_minutes=timeout_minutes,
        **kwargs,
    )


def gpt_data_module(
    paths: str | list[Any] | dict[str, Any] | None = None,
    seq_length: int = 2048,
    micro_batch_size: int = 1,
    global_batch_size: int = 8,
    tokenizer: TokenizerConfig | None = None,
    split: str = "969,30,1",
    index_mapping_dir: str | None = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    mock: bool = False,
    seed: int = 1234,
    num_workers: int = 0,
    num_train_samples: int | None = None,
    num_val_samples: int | None = None,
    consumed_samples: int = 0,
) -> Any:
    """:class:`~kd_module.data.datamodule.GPTDataModule` with these arguments (its own)."""
    from kd_module.data.datamodule import GPTDataModule

    return GPTDataModule(
        paths=paths,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        tokenizer=tokenizer,
        split=split,
        index_mapping_dir=index_mapping_dir,
        eod_mask_loss=eod_mask_loss,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        mock=mock,
        seed=seed,
        num_workers=num_workers,
        num_train_samples=num_train_samples,
        num_val_samples=num_val_samples,
        consumed_samples=consumed_samples,
    )


LOGGERS = {
    "csv": ("CSVLogger", None),
    "tensorboard": ("TensorBoardLogger", "tensorboard"),
    "wandb": ("WandbLogger", "wandb"),
    "mlflow": ("MLFlowLogger", "mlflow"),
}
"""Loggers a run can name (``logger=tensorboard``): Lightning's class and the package it needs."""


def _logger_names(logger: Any) -> list[Any]:
    """``logger`` as a list; a string may list several names (``tensorboard,wandb`` or
    ``[tensorboard,wandb]``, which is how nemo-run passes ``logger=[tensorboard,wandb]``)."""
    if logger is None:
        return []
    if isinstance(logger, str):
        names = logger.strip().removeprefix("[").removesuffix("]").split(",")
        return [name.strip().strip("'\"") for name in names if name.strip()]
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]


def logger_problems(logger: Any) -> list[str]:
    """Why ``logger`` (a name of :data:`LOGGERS`, a Lightning logger, or a list of them) cannot
    be built, checked before any model is: unknown names and packages that are not installed."""
    import importlib.util

    from kd_module.rules import Problems

    problems = Problems()
    for entry in _logger_names(logger):
        if not isinstance(entry, str):
            continue  # a Lightning logger object, used as it is
        if problems.one_of("logger", entry, tuple(LOGGERS)):
            package = LOGGERS[entry][1]
            if package and importlib.util.find_spec(package) is None:
                problems.add(
                    f"logger={entry!r} needs the {package!r} package; pip install "
                    f"{'mlflow-skinny' if package == 'mlflow' else package}"
                )
    return problems


def build_loggers(logger: Any, run_dir: Any) -> list[Any]:
    """The run's Lightning loggers: always the CSV logger at ``run_dir`` (``metrics.csv``), plus
    each one ``logger`` names, all writing under ``run_dir`` unless their own settings say
    otherwise (``WANDB_MODE``, ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``).

    - ``tensorboard``: event files in ``<run_dir>/tensorboard``;
    - ``wandb``: project ``$WANDB_PROJECT`` (default ``megatron-kd``), run named after the run,
      files in ``<run_dir>/wandb`` (``WANDB_MODE=offline`` keeps it off the network);
    - ``mlflow``: experiment ``megatron-kd``, run named after the run, tracking at
      ``$MLFLOW_TRACKING_URI`` or, without it, MLflow's file store in ``<run_dir>/mlruns``
      (``MLFLOW_ALLOW_FILE_STORE=true`` is set for it: MLflow 3 refuses that backend otherwise).

    Lightning loggers log on global rank 0 only.
    """
    import os
    from pathlib import Path

    from lightning.pytorch import loggers

    run_dir = Path(run_dir)
    built = [loggers.CSVLogger(save_dir=str(run_dir.parent), name=run_dir.name, version="")]
    for entry in _logger_names(logger):
        if not isinstance(entry, str):
            built.append(entry)
        elif entry == "tensorboard":
            built.append(
                loggers.TensorBoardLogger(
                    save_dir=str(run_dir.parent), name=run_dir.name, version="tensorboard"
                )
            )
        elif entry == "wandb":
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            built.append(
                loggers.WandbLogger(
                    name=run_dir.name,
                    save_dir=str(run_dir),
                    project=os.environ.get("WANDB_PROJECT", "megatron-kd"),
                )
            )
        elif entry == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                # A file store in the run directory needs no server. MLflow 3 keeps the file
                # backend in maintenance mode and refuses it unless this opt-out is set; give
                # MLFLOW_TRACKING_URI (a server or sqlite:///...) to use another backend.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (run_dir / "mlruns").resolve().as_uri()
            built.append(
                loggers.MLFlowLogger(
                    experiment_name="megatron-kd", run_name=run_dir.name, tracking_uri=uri
                )
            )
    return built
