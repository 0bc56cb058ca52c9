"""Executors for recipes: where and how many ranks run a task, chosen at launch time.

Recipes describe the run (:mod:`recipes`); these helpers describe the machines. Keeping the two
apart lets one recipe run on a laptop, on an 8-GPU box and on a Slurm cluster unchanged::

    recipe = tiny_cpu(num_gpus_per_node=2)
    run.run(recipe, executor=local_executor(devices=recipe_devices(recipe)))

The ranks are started by ``torchrun``; Lightning's ``TorchElasticEnvironment`` then reads the
rank and world size it sets. nemo-run is imported only by the functions that take or make its
objects: ``import kd_module`` stays free of it, and so do the input checks
(:mod:`kd_module.rules`) that ``distill`` and ``build_teacher_cache`` run, which therefore
work where nemo-run is not installed (the wheels of ``make gpu-check`` leave it out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kd_module.rules import positive_int_problems

if TYPE_CHECKING:
    import nemo_run as run

LAUNCHER = "torchrun"
"""Launcher of every executor made here: one process per device, with torch.distributed's env."""


def recipe_devices(recipe: run.Partial) -> int:
    """Ranks per node of a recipe: its trainer's ``devices`` (or its own, for a cache recipe).

    Args:
        recipe: a ``run.Partial`` whose ``trainer`` is a ``run.Config`` with ``devices``,
            or one with a ``devices`` argument (``build_teacher_cache``).

    Returns:
        ``recipe.trainer.devices`` (``recipe.devices``).

    Raises:
        ValueError: when the recipe has no trainer config or its ``devices`` is not a positive
            integer (``"auto"`` cannot size an executor).
    """
    import nemo_run as run

    trainer = getattr(recipe, "trainer", None)
    if trainer is None and hasattr(recipe, "devices"):  # a recipe without a trainer (caching)
        trainer = recipe
    elif not isinstance(trainer, run.Config):
        raise ValueError(f"recipe_devices: recipe.trainer={trainer!r} is not a run.Config")
    devices = getattr(trainer, "devices", None)
    problems = positive_int_problems(devices=devices)
    if problems:
        raise ValueError(f"recipe_devices: trainer.{problems[0]} to size an executor")
    return devices


def recipe_num_nodes(recipe: run.Partial) -> int:
    """Machines of a recipe: its trainer's ``num_nodes`` (1 when unset)."""
    import nemo_run as run

    trainer = getattr(recipe, "trainer", None)
    if trainer is None and hasattr(recipe, "num_nodes"):  # a recipe without a trainer (caching)
        trainer = recipe
    elif not isinstance(trainer, run.Config):
        raise ValueError(f"recipe_num_nodes: recipe.trainer={trainer!r} is not a run.Config")
    num_nodes = getattr(trainer, "num_nodes", 1)
    problems = positive_int_problems(num_nodes=num_nodes)
    if problems:
        raise ValueError(f"recipe_num_nodes: trainer.{problems[0]}")
    return num_nodes


def local_executor(
    devices: int = 1,
    env_vars: dict[str, str] | None = None,
) -> run.LocalExecutor:
    """Run a task on this machine with ``devices`` ranks started by ``torchrun``.

    Args:
        devices: ranks (GPUs, or CPU processes with ``accelerator="cpu"``); must equal the
            trainer's ``devices`` (:func:`recipe_devices`).
        env_vars: extra environment of every rank.

    Returns:
        ``run.LocalExecutor(ntasks_per_node=devices, launcher="torchrun")``.

    Raises:
        ValueError: when ``devices`` is not a positive integer.

    Examples:
        >>> executor = local_executor(devices=recipe_devices(recipe))
        >>> run.run(recipe, executor=executor)
    """
    import nemo_run as run

    problems = positive_int_problems(devices=devices)
    if problems:
        raise ValueError("local_executor: " + "; ".join(problems))
    return run.LocalExecutor(
        ntasks_per_node=devices, launcher=LAUNCHER, env_vars=dict(env_vars or {})
    )


def slurm_executor(
    account: str,
    partition: str,
    nodes: int,
    gpus_per_node: int,
    container_image: str | None = None,
    mounts: list[str] | None = None,
    time: str = "04:00:00",
    job_dir: str | None = None,
    env_vars: dict[str, str] | None = None,
    job_name_prefix: str | None = None,
    exclusive: bool = True,
    packager: run.Packager | None = None,
    rdzv_port: int = 29500,
) -> run.SlurmExecutor:
    """Run a task as one Slurm job: ``nodes`` x ``gpus_per_node`` ranks under ``torchrun``.

    Submission goes through a local tunnel (run from a login node); use nemo-run's
    ``run.SSHTunnel`` on the returned executor's ``tunnel`` to submit from elsewhere.

    Args:
        account: Slurm account (``--account``).
        partition: Slurm partition (``--partition``).
        nodes: machines; must equal the trainer's ``num_nodes``.
        gpus_per_node: GPUs (ranks) per machine; must equal the trainer's ``devices``.
        container_image: pyxis/enroot image holding this package and its dependencies;
            ``None`` runs on the nodes' own environment.
        mounts: container mounts, ``"/host/path:/container/path"``.
        time: wall-clock limit, ``HH:MM:SS`` (``--time``).
        job_dir: where the job's sbatch script, configs and logs are, as the cluster's nodes
            see them. With the local tunnel used here nemo-run copies nothing: this must be
            the ``experiments`` folder of the experiment's base directory, which is what
            ``None`` gives for ``run.run`` (``$NEMORUN_HOME/experiments``, by default
            ``~/.nemo_run/experiments``; put ``NEMORUN_HOME`` on a shared file system). A
            ``run.Experiment(base_dir=B)`` needs ``job_dir=B + "/experiments"``.
        env_vars: extra environment of every rank.
        job_name_prefix: prefix of the Slurm job name.
        exclusive: ask for whole nodes (``--exclusive``).
        packager: how the code reaches the nodes; nemo-run's ``GitArchivePackager`` (the
            committed tree) when ``None``.
        rdzv_port: port of torchrun's c10d rendezvous on the job's first node.

    Returns:
        A ``run.SlurmExecutor``.

    Raises:
        ValueError: naming every bad argument.

    Examples:
        >>> recipe = llama31_8b_to_llama32_1b(num_nodes=2, num_gpus_per_node=8)
        >>> executor = slurm_executor("my_account", "batch", nodes=2, gpus_per_node=8,
        ...                           container_image="nvcr.io/nvidia/nemo:25.09",
        ...                           mounts=["/lustre:/lustre"])
        >>> run.run(recipe, executor=executor)
    """
    problems = positive_int_problems(nodes=nodes, gpus_per_node=gpus_per_node, rdzv_port=rdzv_port)
    for name, value in (("account", account), ("partition", partition), ("time", time)):
        if not isinstance(value, str) or not value:
            problems.append(f"{name}={value!r} must be a non-empty string")
    for mount in mounts or []:
        if not isinstance(mount, str) or mount.count(":") not in (1, 2):
            problems.append(f"mount {mount!r} must look like '/host/path:/container/path'")
    if problems:
        raise ValueError("slurm_executor: " + "; ".join(problems))
    import nemo_run as run

    kwargs: dict[str, Any] = {}
    if packager is not None:
        kwargs["packager"] = packager
    return run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node,
        container_image=container_image,
        container_mounts=list(mounts or []),
        time=time,
        exclusive=exclusive or None,
        job_name_prefix=job_name_prefix,
        env_vars=dict(env_vars or {}),
        tunnel=run.LocalTunnel(job_dir=job_dir or ""),  # "": nemo-run's experiments folder
        launcher=run.Torchrun(rdzv_port=rdzv_port),
        **kwargs,
    )
