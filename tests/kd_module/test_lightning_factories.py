"""The light recipe targets: importable without Lightning, same arguments as what they build."""

from __future__ import annotations

import inspect
import subprocess
import sys

import lightning

from kd_module.data.datamodule import GPTDataModule
from kd_module.lightning_factories import gpt_data_module, lightning_trainer, megatron_strategy
from kd_module.training.strategy import MegatronStrategy


def test_importing_the_factories_loads_neither_lightning_nor_megatron():
    """kd_module.lightning_factories is importable without Lightning, megatron or ModelOpt."""
    code = (
        "import sys, kd_module.lightning_factories\n"
        "heavy = [m for m in ('lightning', 'megatron', 'modelopt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_data_and_strategy_factories_repeat_their_class_signature():
    """gpt_data_module and megatron_strategy take exactly GPTDataModule's and MegatronStrategy's
    arguments: names, kinds, defaults, annotations."""
    for factory, cls in ((gpt_data_module, GPTDataModule), (megatron_strategy, MegatronStrategy)):
        expected = inspect.signature(cls, eval_str=True).parameters
        assert inspect.signature(factory, eval_str=True).parameters == expected, cls.__name__


def test_trainer_factory_names_trainer_arguments_with_lightning_defaults():
    """lightning_trainer's named arguments are lightning.Trainer arguments with its defaults."""
    trainer_parameters = inspect.signature(lightning.Trainer).parameters
    for parameter in inspect.signature(lightning_trainer).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert parameter.default == trainer_parameters[parameter.name].default, parameter.name


def test_trainer_factory_builds_the_trainer_with_extra_arguments():
    """Arguments beyond the named ones reach lightning.Trainer (here: no progress bar)."""
    trainer = lightning_trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False
    )
    assert type(trainer) is lightning.Trainer
    assert trainer.max_steps == 3 and trainer.progress_bar_callback is None
