"""`make gpu-check`'s dry run (bench/gpu_check.py): the listing and the wheel-folder check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def _fill(folder: Path, skip: str | None = None) -> None:
    """Empty files named like the wheels pip download saves for this Python on x86-64 Linux."""
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in gpu_check.WHEELS:
        if wheel.name == skip:
            continue
        name = wheel.name.replace("-", "_")
        tags = f"{_tag()}-{_tag()}-manylinux_2_17_x86_64" if wheel.binary else "py3-none-any"
        (folder / f"{name}-{wheel.version}-{tags}.whl").write_bytes(b"")


def test_dry_run_lists_every_check_and_installs_nothing(tmp_path):
    """--dry-run lists each check with its command and environment, and the not-verified paths."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--wheels", str(tmp_path / "none")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for check in gpu_check.CHECKS:
        assert f"would run {check.name} " in out, check.name
    assert "KD_REQUIRE_GPU=1 python -m pytest" in out
    assert "CUDA_VISIBLE_DEVICES= python -m pytest" in out  # multi-rank CPU tests stay on gloo
    for name in ("transformer_engine_spec", "context_parallel", "mamba"):
        assert f"not verified {name}:" in out, name
    assert f"0 of {len(gpu_check.WHEELS)} present" in out
    assert "missing wheel megatron-core==0.16.1" in out
    listing = json.loads(out.strip().splitlines()[-1])
    assert [c["name"] for c in listing["checks"]] == [c.name for c in gpu_check.CHECKS]
    assert sum(c.budget_s for c in gpu_check.CHECKS) <= gpu_check.BUDGET_S
    assert not (tmp_path / "none").exists()


def test_every_gpu_test_named_by_a_check_exists():
    """The pytest node ids the checks and the not-verified list name are real tests."""
    for check in gpu_check.CHECKS:
        if check.argv[0] != "pytest":
            continue
        for arg in check.argv:
            if arg.startswith("tests/"):
                path, _, test = arg.partition("::")
                assert (REPO_ROOT / path).exists(), arg
                if test:
                    assert f"def {test}(" in (REPO_ROOT / path).read_text(), arg
    for _, node, _ in gpu_check.NOT_VERIFIED:
        path, _, test = node.partition("::")
        assert f"def {test}(" in (REPO_ROOT / path).read_text(), node


def test_wheel_check_accepts_a_complete_folder(tmp_path):
    """A folder with every wheel for this Python reports nothing missing."""
    _fill(tmp_path)
    report = gpu_check.check_wheels(tmp_path)
    assert report["missing"] == []
    assert set(report["present"]) == {wheel.name for wheel in gpu_check.WHEELS}


def test_wheel_check_names_a_missing_wheel(tmp_path):
    """A folder without scipy's wheel reports scipy by name and version, and only it."""
    _fill(tmp_path, skip="scipy")
    version = next(w.version for w in gpu_check.WHEELS if w.name == "scipy")
    assert gpu_check.check_wheels(tmp_path)["missing"] == [f"scipy=={version}"]


def test_wheel_check_refuses_builds_for_another_python(tmp_path):
    """A binary wheel built for another CPython version does not count; a pure one does."""
    _fill(tmp_path)
    other = (3, 99)
    report = gpu_check.check_wheels(tmp_path, other)
    binary = {f"{w.name}=={w.version}" for w in gpu_check.WHEELS if w.binary and w.name != "psutil"}
    assert binary <= set(report["missing"]), report["missing"]
    assert "nvidia-modelopt" in report["present"]


@pytest.mark.parametrize("version", ["3.11", "3.12"])
def test_download_command_pins_every_wheel_for_the_python_version(tmp_path, version):
    """--download-wheels runs pip download of exactly WHEELS, binary-only, for each version."""
    (command,) = gpu_check.download_commands(tmp_path, [version])
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert command[command.index("--python-version") + 1] == version
    assert command[command.index("--abi") + 1] == "cp" + version.replace(".", "")
    assert command[command.index("-d") + 1] == str(tmp_path)
    assert command[-len(gpu_check.WHEELS) :] == [f"{w.name}=={w.version}" for w in gpu_check.WHEELS]


def _covers(check: gpu_check.Check, nodeid: str) -> bool:
    """Whether ``check``'s pytest selection runs the gpu test ``nodeid``."""
    selection = [arg for arg in check.argv if arg.startswith("tests/")]
    path = nodeid.split("::")[0]
    # A file runs all its tests (a ``-m gpu`` filter keeps the gpu ones, which ``nodeid`` is).
    return any(nodeid == arg or nodeid.startswith(arg + "[") or arg == path for arg in selection)


def test_every_gpu_marked_test_is_run_or_listed_as_not_verified():
    """A new ``gpu`` test that no check runs would never run anywhere: collect them and match."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    nodeids = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(nodeids) >= 13, result.stdout[-3000:] + result.stderr[-3000:]
    not_verified = {node for _, node, _ in gpu_check.NOT_VERIFIED}
    uncovered = [
        nodeid
        for nodeid in nodeids
        if nodeid.split("[")[0] not in not_verified
        and not any(_covers(check, nodeid) for check in gpu_check.CHECKS)
    ]
    assert uncovered == []


def test_only_refuses_an_unknown_check_by_name():
    """``--only`` names checks; a typo is refused with the allowed names before anything runs."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--only", "bf16_fit", "bf16_fits"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--only: unknown check(s) bf16_fits; allowed: runtime_nccl_and_bridge_inertness" in (
        result.stderr
    )
