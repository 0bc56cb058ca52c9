"""The package's face: about ten stable names, the moved ones still resolved with a warning."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kd_module


def test_the_package_exports_about_ten_stable_names():
    assert 8 <= len(kd_module.__all__) <= 12, kd_module.__all__
    assert {"distill", "prune", "DistillationModule", "MegatronStrategy", "GPTModelConfig"} <= set(
        kd_module.__all__
    )
    from kd_module.pruning.job import prune

    assert kd_module.prune is prune


def test_a_moved_name_resolves_with_a_warning_naming_its_home():
    with pytest.warns(DeprecationWarning, match="import it from kd_module.checkpoints.run"):
        moved = kd_module.RunCheckpoint
    from kd_module.checkpoints.run import RunCheckpoint

    assert moved is RunCheckpoint


def test_importing_the_package_loads_no_heavy_dependency():
    code = (
        "import sys, kd_module, kd_module.rules, kd_module.cli\n"
        "heavy = [m for m in ('torch', 'lightning', 'megatron', 'modelopt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
