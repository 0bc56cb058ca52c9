"""``KD_REQUIRE_GPU=1`` turns the skips of ``gpu`` tests into failures (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

GENERATED_TESTS = textwrap.dedent(
    """
    import pytest


    @pytest.mark.gpu
    def test_marked_gpu():
        pass


    def test_skips_inside_once_marked_gpu(request):
        request.node.add_marker(pytest.mark.gpu)  # marked after collection: no collection skip
        pytest.importorskip("kd_no_such_module_for_this_test")


    def test_plain_skip():
        pytest.skip("not a gpu test")
    """
)


def _run_pytest(tmp_path: Path, require_gpu: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_generated.py").write_text(GENERATED_TESTS)
    env = dict(os.environ)
    env.pop("KD_REQUIRE_GPU", None)
    if require_gpu is not None:
        env["KD_REQUIRE_GPU"] = require_gpu
    env["CUDA_VISIBLE_DEVICES"] = ""  # the same outcome on a GPU machine
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-rA",
            "test_generated.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gpu_tests_skip_without_cuda(tmp_path):
    """Without KD_REQUIRE_GPU (or with KD_REQUIRE_GPU=0) gpu tests skip and the run is green."""
    for value in (None, "0"):
        result = _run_pytest(tmp_path, value)
        assert result.returncode == 0, result.stdout[-3000:]
        assert "3 skipped" in result.stdout, result.stdout[-3000:]


def test_kd_require_gpu_turns_every_gpu_skip_into_a_failure(tmp_path):
    """KD_REQUIRE_GPU=1: the marker's skip and a skip inside a gpu test fail; others still skip."""
    result = _run_pytest(tmp_path, "1")
    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert "1 skipped" in out, out[-3000:]
    assert "FAILED test_generated.py::test_skips_inside_once_marked_gpu" in out, out[-3000:]
    # The marker's skip happens at setup, so pytest counts that failure as an error.
    assert "ERROR test_generated.py::test_marked_gpu" in out, out[-3000:]
    assert "KD_REQUIRE_GPU=1: this gpu test was skipped (needs CUDA)" in out, out[-3000:]
    assert "kd_no_such_module_for_this_test" in out, out[-3000:]
    assert "SKIPPED [1] test_generated.py" in out and "not a gpu test" in out, out[-3000:]
