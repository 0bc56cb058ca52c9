"""The ``kd`` namespace of nemo-run's ``nemo`` command.

``pyproject.toml`` names this module in the ``nemo_run.cli`` entry-point group, so ``nemo`` loads
it and offers::

    nemo kd distill --factory tiny_cpu -y trainer.max_steps=50
    nemo kd distill --factory llama31_8b_to_llama32_1b --dryrun
    nemo kd distill --factory tiny_cpu --to-yaml tiny_cpu.yaml
    nemo kd prepare-data inputs='["data/train.jsonl"]' output_prefix=data/train
    nemo kd cache-teacher --factory tiny_cpu out_dir=runs/tiny_cpu_cache
    nemo kd distill --factory "tiny_cpu(teacher_cache='runs/tiny_cpu_cache')"
    nemo kd distill --factory tiny_cpu teacher.checkpoint=/ckpt job.name=exp1 --dryrun
    nemo kd prune --factory tiny_cpu output=runs/pruned
    nemo kd export-hf checkpoint=runs/exp1/student output=/models/student-hf
    nemo kd import-hf hf_dir=/models/Qwen3-8B output=/ckpt/qwen3-8b

``distill`` takes the recipes (factories) registered by the modules in :data:`RECIPE_MODULES`
and dotted overrides of their fields (``teacher.checkpoint=``, ``job.name=``,
``trainer.max_steps=``). Importing this module imports nemo-run (and with it torch) but neither
Lightning nor megatron-core nor ModelOpt (the recipes' Lightning pieces are configs
of :mod:`kd_module.lightning_factories`): ``--help``, ``--dryrun`` and ``--to-yaml`` stay cheap,
and the heavy imports happen when the task runs.
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import Any

import nemo_run as run
from nemo_run.cli.cli_parser import type_parser

from kd_module.api import distill
from kd_module.cli.quiet import quiet_third_party
from kd_module.data.prepare import prepare_data_cli
from kd_module.data.tokenizers import TokenizerConfig
from kd_module.distillation.config import DistillConfig
from kd_module.hf.commands import export_hf_command, import_hf_command
from kd_module.lightning_factories import gpt_data_module, lightning_trainer, megatron_strategy
from kd_module.models.gpt import GPTModelConfig
from kd_module.offline.job import build_teacher_cache
from kd_module.pruning.job import prune
from kd_module.specs import OfflineConfig, RunConfig, TeacherSpec
from kd_module.training.optim import OptimizerConfig

# This module is the command line: hide the known third-party notices before the task imports
# megatron or ModelOpt or nemo-run builds a Trainer (``-v`` / ``KD_DEBUG=1`` shows them).
quiet_third_party()

NAMESPACE = "kd"
"""The ``nemo`` sub-command this module provides."""
RECIPE_MODULES = (
    "recipes.tiny_cpu",
    "recipes.llama31_8b_to_llama32_1b",
    "recipes.qwen3_8b_to_qwen3_1p7b",
)
"""Modules whose ``@run.cli.factory(target=distill | build_teacher_cache | prune, name=NAME)``
recipes the CLI offers."""
OVERRIDABLE = (
    distill,
    build_teacher_cache,
    prune,
    prepare_data_cli,
    export_hf_command,
    import_hf_command,
    GPTModelConfig,
    gpt_data_module,
    TokenizerConfig,
    OptimizerConfig,
    lightning_trainer,
    megatron_strategy,
    DistillConfig,
    TeacherSpec,
    RunConfig,
    OfflineConfig,
)
"""Callables whose arguments the command line sets (``student.num_layers=4``, ...)."""


@type_parser.register_parser(types.UnionType)
def _parse_pep604_union(value: str, annotation: Any) -> Any:
    """Parse ``X | None`` like ``Optional[X]``.

    nemo-run 0.11.1 parses ``typing.Union`` but not PEP 604 unions (``types.UnionType``).
    """
    return type_parser.parse_union(value, annotation)


def evaluate_annotations(obj: Any) -> None:
    """Give ``obj`` a signature with evaluated annotations, for nemo-run's argument parser.

    Modules with ``from __future__ import annotations`` (all of this package) keep annotations
    as strings; nemo-run 0.11.1 does not evaluate them and refuses every override with
    "Unsupported type: str | None". ``__signature__`` is what ``inspect.signature`` returns, so
    setting it changes nothing else. An object whose annotations cannot be evaluated (a name
    imported only under ``TYPE_CHECKING``) is left as it is.
    """
    try:
        signature = inspect.signature(obj, eval_str=True)
    except (NameError, TypeError, ValueError):
        return
    obj.__signature__ = signature
    if inspect.isclass(obj) and inspect.isfunction(obj.__dict__.get("__init__")):
        # nemo-run reads the __init__ of a class with exactly two parameters instead
        # (cli_parser.parse_cli_args, 0.11.1): a two-field dataclass such as OfflineConfig.
        evaluate_annotations(obj.__init__)


def _factories(module: Any) -> list[Any]:
    return [value for value in vars(module).values() if getattr(value, "__factory__", False)]


for _name in RECIPE_MODULES:
    _module = importlib.import_module(_name)
    for _factory in _factories(_module):
        evaluate_annotations(_factory)
    for _value in vars(_module).values():
        if inspect.isfunction(_value) and _value.__module__ == _name:
            evaluate_annotations(_value)
for _callable in OVERRIDABLE:
    evaluate_annotations(_callable)

COMMANDS = (
    # (name, task, help, runs on an executor: --factory recipes, torchrun, Slurm)
    (
        "distill",
        distill,
        "Distill a teacher into a student (pick a recipe with --factory NAME).",
        True,
    ),
    (
        "prepare-data",
        prepare_data_cli,
        "Tokenize .jsonl/.txt files into a megatron .bin/.idx dataset.",
        False,
    ),
    (
        "cache-teacher",
        build_teacher_cache,
        "Cache a teacher's top-k logits for offline distillation (--factory NAME).",
        True,
    ),
    ("prune", prune, "Prune a teacher into a smaller student (Minitron; --factory NAME).", True),
    (
        "export-hf",
        export_hf_command,
        "Write a student checkpoint as a Hugging Face model directory.",
        False,
    ),
    (
        "import-hf",
        import_hf_command,
        "Convert a Hugging Face model directory into a torch_dist checkpoint.",
        False,
    ),
)
"""The ``nemo kd`` sub-commands."""

for _command, _task, _help, _executor in COMMANDS:
    run.cli.entrypoint(namespace=NAMESPACE, name=_command, help=_help, enable_executor=_executor)(
        _task
    )
