"""`make gpu-check`: every GPU path of the project, checked in one command on a lent GPU machine.

Made for a machine with one NVIDIA GPU and no internet whose Python already has torch (a CUDA
build), lightning, pytest and pytest-timeout, but not megatron-core, ModelOpt or their small
dependencies. It:

1. installs what is missing from the wheels in ``.gpu-wheels/`` (see :data:`WHEELS`; fill the
   folder on a machine with internet: ``python -m bench.gpu_check --download-wheels``) with
   ``pip install --no-index --no-deps --target runs/gpu_check/site-packages``, and puts that
   folder and the repository on ``PYTHONPATH`` of every check;
2. runs the checks of :data:`CHECKS` one after another, each in its own process under a time
   budget (about 7 minutes in all on an H200), with ``KD_REQUIRE_GPU=1`` so that a gpu test that
   skips fails, and the multi-rank CPU tests with ``CUDA_VISIBLE_DEVICES=`` so that they stay on
   gloo (with one GPU, NCCL ranks would share it and fail);
3. writes one JSON summary, ``$OUT/gpu_check/summary.json`` when ``OUT`` is set (the GPU lending
   tool returns what is written under ``$OUT``), else ``runs/gpu_check/summary.json``: each
   check's status (``passed``, ``failed``, ``not verified``), duration and budget, the
   benchmarks' JSON, and the torch / CUDA / GPU versions. Transformer Engine, context
   parallelism and Mamba cannot be installed without internet there: they are listed as
   ``not verified``, never as passed.

``--dry-run`` works on any machine: it lists what would run and checks the wheel folder for this
Python (which required wheels are present, which are missing) without installing or running
anything. The test suite runs it.

Examples:
    make gpu-check                    # on the GPU machine
    make gpu-check DRYRUN=1           # anywhere: what would run, which wheels are missing
    python -m bench.gpu_check --download-wheels --python-versions 3.11 3.12   # with internet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIR = REPO_ROOT / ".gpu-wheels"
MEASUREMENTS_FILE = "measurements.jsonl"
"""gpu tests append their measurements here (``KD_MEASUREMENTS``); the summary includes them."""
BUDGET_S = 420.0
"""The whole check (installation included) must finish within 7 minutes on the GPU machine: a
session is lent 15 minutes of device time, starting the machine included, and a rerun must fit."""


@dataclass(frozen=True)
class Wheel:
    """One distribution the GPU machine lacks, carried as a wheel."""

    name: str
    """Distribution name as on the package index."""
    version: str
    """The exact version to carry (``--no-deps`` installs: versions must fit each other)."""
    why: str
    """Who imports it."""
    binary: bool = False
    """Built per Python version (download one wheel per ``--python-versions`` entry)."""
    any_version: bool = False
    """Any installed version will do: the GPU machine's own (which its other packages were
    installed with, e.g. transformers with its huggingface-hub) is kept; the wheel is installed
    only where the distribution is absent."""


# Found by installing these with --no-index --no-deps into a fresh venv that holds only torch,
# lightning, pytest and pytest-timeout, then importing megatron.core, modelopt.torch.distill
# (with its megatron plugin), every kd_module module, callbacks and the benchmarks, and running
# fits, the teacher cache and the callbacks' tests there. nemo-run is not needed: only recipes/
# and kd_module.launch's executors import it.
WHEELS = (
    Wheel("megatron-core", "0.16.1", "the models, parallel state and schedules", binary=True),
    Wheel("nvidia-modelopt", "0.47.0", "DistillationModel and its megatron plugin"),
    Wheel("pydantic", "2.14.4", "modelopt's configs"),
    Wheel("pydantic-core", "2.50.5", "pydantic", binary=True),
    Wheel("annotated-types", "0.8.0", "pydantic"),
    Wheel("typing-inspection", "0.4.5", "pydantic"),
    Wheel("typing-extensions", "4.16.0", "pydantic 2.14 needs >= 4.16"),
    Wheel("omegaconf", "2.4.0", "modelopt"),
    Wheel("pulp", "3.3.2", "modelopt (declared; imported by its search utilities)"),
    Wheel(
        "scipy",
        "1.17.1",
        "modelopt.torch.nas (imported by modelopt.torch.distill)",
        binary=True,
        any_version=True,
    ),
    Wheel("regex", "2026.11.19", "modelopt.torch.quantization", binary=True, any_version=True),
    Wheel("rich", "15.0.0", "modelopt.torch.trace", any_version=True),
    Wheel("markdown-it-py", "4.3.0", "rich", any_version=True),
    Wheel("mdurl", "0.1.2", "markdown-it-py", any_version=True),
    Wheel(
        "huggingface-hub", "0.26.5", "modelopt.torch.opt (undeclared by modelopt)", any_version=True
    ),
    Wheel("requests", "2.34.2", "modelopt.torch.utils, huggingface-hub", any_version=True),
    Wheel("charset-normalizer", "3.5.3", "requests", binary=True, any_version=True),
    Wheel("urllib3", "1.26.20", "requests", any_version=True),
    Wheel("idna", "3.20", "requests", any_version=True),
    Wheel("certifi", "2026.10.19.post1", "requests", any_version=True),
    Wheel(
        "psutil",
        "7.2.2",
        "callbacks.ManualGC, megatron dist_checkpointing saves",
        binary=True,
        any_version=True,
    ),
)

PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)


@dataclass(frozen=True)
class Check:
    """One step of the GPU check: a pytest selection or a benchmark, in its own process."""

    name: str
    """Short name, the key in the summary."""
    what: str
    """What passing it shows."""
    argv: tuple[str, ...]
    """Arguments after ``python -m``."""
    budget_s: float
    """Seconds it may take on the GPU machine (its timeout, capped by what is left)."""
    cpu_ranks: bool = False
    """Runs multi-rank CPU tests: ``CUDA_VISIBLE_DEVICES=`` keeps them on gloo."""
    bench: bool = False
    """A benchmark: its last stdout line is a JSON object kept in the summary."""
    optional: bool = False
    """Run only if the budget allows (else ``not verified``)."""


def _pytest(*selection: str, timeout_s: int = 240) -> tuple[str, ...]:
    return ("pytest", "-q", "-ra", "-p", "no:cacheprovider", f"--timeout={timeout_s}", *selection)


CHECKS = (
    Check(
        "runtime_nccl_and_bridge_inertness",
        "a CUDA run uses NCCL and megatron's real torch.cuda; no CPU bridge is installed; the "
        "step clock waits for queued CUDA work; a CUDA teacher hashes through one bounded buffer",
        _pytest(
            "tests/kd_module/test_runtime.py",
            "tests/kd_module/test_timing.py",
            "tests/reliability/test_guards.py",
            "-m",
            "gpu",
        ),
        40,
    ),
    Check(
        "bf16_fit",
        "a bf16 Lightning fit lowers kd_loss; megatron's optimizer keeps fp32 main params",
        _pytest("tests/kd_module/test_lightning.py::test_bf16_fit_on_gpu"),
        45,
    ),
    Check(
        "gpu_vs_cpu_parity",
        "kd/logits/intermediate losses on CUDA equal the CPU's (fp32, TF32 off, rtol 1e-4)",
        _pytest("tests/kd_module/test_distillation.py::test_kd_losses_on_gpu_match_cpu"),
        38,
    ),
    Check(
        "callbacks_on_cuda",
        "device-memory growth with and without manual GC over 500 micro-batches, a leak "
        "detected, the student-forward slowdown measured with CUDA events",
        _pytest("tests/callbacks/test_callbacks_gpu.py"),
        90,
    ),
    Check(
        "offline_cache_and_fit_bf16",
        "a bf16 teacher cache, and a bf16 offline fit that follows the online top-k curve",
        _pytest("tests/kd_module/test_offline_training.py::test_bf16_cache_and_offline_fit_on_gpu"),
        45,
    ),
    Check(
        "bench_kd_loss",
        "python -m bench.kd_loss on the GPU (TP=1: one GPU)",
        ("bench.kd_loss", "--tp", "1"),
        45,
        bench=True,
    ),
    Check(
        "bench_kd_overhead",
        "python -m bench.kd_overhead on the GPU (logit_loss_impl auto: chunked at vocab 8192)",
        ("bench.kd_overhead", "--repeats", "5"),
        22,
        bench=True,
    ),
    Check(
        "bench_kd_overhead_fused",
        "python -m bench.kd_overhead on the GPU with the fused logits loss",
        ("bench.kd_overhead", "--repeats", "5", "--logit-loss-impl", "fused"),
        23,
        bench=True,
    ),
    Check(
        "bench_step_memory",
        "python -m bench.step_memory on the GPU: whole KD step peak memory, fused vs chunked vs "
        "modelopt logits loss (vocab 131072, student width 512, 4096 tokens)",
        ("bench.step_memory",),
        22,
        bench=True,
    ),
    Check(
        "cpu_sanity",
        "fast CPU tests, multi-rank ones on gloo (CUDA_VISIBLE_DEVICES=)",
        _pytest(
            "tests/kd_module/test_losses.py",
            "tests/kd_module/test_distill_config.py",
            "-m",
            "not gpu",
            timeout_s=120,
        ),
        50,
        cpu_ranks=True,
        optional=True,
    ),
)

NOT_VERIFIED = (
    (
        "transformer_engine_spec",
        "tests/kd_module/test_distillation.py::test_transformer_engine_spec_distills_on_gpu",
        "Transformer Engine cannot be installed without internet on the GPU machine",
    ),
    (
        "context_parallel",
        "tests/kd_module/test_distillation.py::test_context_parallel_kd_loss_matches_cp1",
        "needs Transformer Engine attention and 2 GPUs",
    ),
    (
        "hf_import_on_cuda",
        "tests/kd_module/test_hf.py::test_hf_import_and_export_on_gpu",
        "needs transformers 5.x, whose huggingface-hub 1.x brings the httpx chain; those wheels "
        "are not carried yet (the GPU machine's modelopt wheels pin huggingface-hub 0.26.5)",
    ),
    (
        "mamba",
        "tests/kd_module/test_distillation.py::test_mamba_hybrid_student_distills_on_gpu",
        "needs mamba-ssm, causal-conv1d and Transformer Engine",
    ),
)


# ---------------------------------------------------------------- the wheel folder


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _interpreter_tags(python_version: tuple[int, int] | None = None) -> set[str]:
    """The wheel tags an interpreter accepts (this one, or CPython ``python_version`` on Linux)."""
    from packaging import tags

    if python_version is None:
        return {str(tag) for tag in tags.sys_tags()}
    platforms = list(PLATFORMS) + ["linux_x86_64"]
    found = set(tags.cpython_tags(python_version, platforms=platforms))
    found |= set(tags.compatible_tags(python_version, platforms=platforms))
    return {str(tag) for tag in found}


def check_wheels(
    folder: Path = WHEEL_DIR, python_version: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Which of :data:`WHEELS` the folder holds in a build this interpreter can install.

    Args:
        folder: the wheel folder.
        python_version: check for CPython ``(major, minor)`` on x86-64 Linux instead of the
            running interpreter.

    Returns:
        ``{"folder", "python", "present": {name: file}, "missing": [name==version, ...]}``.
    """
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    accepted = _interpreter_tags(python_version)
    files = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    present: dict[str, str] = {}
    for wheel in WHEELS:
        for path in files:
            try:
                name, version, _, wheel_tags = parse_wheel_filename(path.name)
            except InvalidWheelFilename:
                continue
            if _normalize(name) != _normalize(wheel.name) or str(version) != wheel.version:
                continue
            if any(str(tag) in accepted for tag in wheel_tags):
                present[wheel.name] = path.name
                break
    missing = [f"{w.name}=={w.version}" for w in WHEELS if w.name not in present]
    version = python_version or sys.version_info[:2]
    return {
        "folder": str(folder),
        "python": f"{version[0]}.{version[1]}",
        "present": present,
        "missing": missing,
    }


def download_commands(folder: Path, python_versions: list[str]) -> list[list[str]]:
    """The ``pip download`` commands that fill ``folder`` for each CPython version."""
    specs = [f"{wheel.name}=={wheel.version}" for wheel in WHEELS]
    commands = []
    for version in python_versions:
        abi = "cp" + version.replace(".", "")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", version, "--implementation", "cp", "--abi", abi]
        for platform_tag in PLATFORMS:
            command += ["--platform", platform_tag]
        command += ["-d", str(folder), *specs]
        commands.append(command)
    return commands


def _missing_distributions() -> list[Wheel]:
    """Wheels whose distribution is not installed at the carried version."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for wheel in WHEELS:
        try:
            installed = version(wheel.name)
        except PackageNotFoundError:
            installed = None
        if installed is None or (installed != wheel.version and not wheel.any_version):
            missing.append(wheel)
    return missing


def install_wheels(folder: Path, target: Path) -> dict[str, Any]:
    """Install the missing distributions from ``folder`` into ``target`` (no index, no deps)."""
    start = time.perf_counter()
    needed = _missing_distributions()
    report = check_wheels(folder)
    unavailable = [f"{w.name}=={w.version}" for w in needed if w.name not in report["present"]]
    files = [str(folder / report["present"][w.name]) for w in needed if w.name in report["present"]]
    result: dict[str, Any] = {
        "folder": str(folder),
        "target": str(target),
        "already_installed": [w.name for w in WHEELS if w not in needed],
        "installed": [Path(f).name for f in files],
        "missing_wheels": unavailable,
    }
    if files:
        target.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q"]
        completed = subprocess.run(
            [*pip, "--upgrade", "--target", str(target), *files],
            capture_output=True,
            text=True,
        )
        result["method"] = "pip"
        if completed.returncode != 0:
            # No pip on this Python: a wheel is a zip of its files (all of these are plain ones).
            result["method"] = "unzip"
            result["pip_error"] = completed.stderr[-2000:]
            for path in files:
                with zipfile.ZipFile(path) as archive:
                    archive.extractall(target)
    result["duration_s"] = round(time.perf_counter() - start, 2)
    return result


# ---------------------------------------------------------------- running the checks


def environment() -> dict[str, Any]:
    """Python, torch, CUDA and GPU versions of this machine (without importing megatron)."""
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["gpu_count"] = torch.cuda.device_count()
            out["gpu_memory_gb"] = round(
                torch.cuda.get_device_properties(0).total_memory / 1024**3, 1
            )
            out["nccl"] = ".".join(str(part) for part in torch.cuda.nccl.version())
            out["cudnn"] = torch.backends.cudnn.version()
    except Exception as error:  # the summary says what is wrong instead of failing
        out["torch_error"] = repr(error)
    for name in ("lightning", "pytest", "pytest-timeout", "megatron-core", "nvidia-modelopt"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return out


def check_env(check: Check, site_packages: Path, log_dir: Path) -> dict[str, str]:
    """The environment of one check's process."""
    env = dict(os.environ)
    env["KD_MEASUREMENTS"] = str(log_dir / MEASUREMENTS_FILE)
    paths = [str(site_packages), str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["KD_REQUIRE_GPU"] = "1"
    env.setdefault("OMP_NUM_THREADS", "4")
    if check.cpu_ranks:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _last_json(text: str) -> Any:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _pytest_counts(text: str) -> str | None:
    for line in reversed(text.strip().splitlines()):
        if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            return line.strip("= ").strip()
    return None


def run_check(check: Check, timeout_s: float, site_packages: Path, log_dir: Path) -> dict[str, Any]:
    """Run one check; its status, duration and output tail (and JSON for a benchmark)."""
    command = [sys.executable, "-m", *check.argv]
    log_path = log_dir / f"{check.name}.log"
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=check_env(check, site_packages, log_dir),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        returncode: int | None = completed.returncode
        stdout, stderr = completed.stdout, completed.stderr
    except subprocess.TimeoutExpired as expired:
        returncode = None
        stdout = _text(expired.stdout)
        stderr = _text(expired.stderr) + f"\n[gpu_check] timed out after {timeout_s:.0f} s"
    duration = time.perf_counter() - start
    log_path.write_text(f"$ {' '.join(command)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    result: dict[str, Any] = {
        "name": check.name,
        "what": check.what,
        "command": "python -m " + " ".join(check.argv),
        "status": "passed" if returncode == 0 else "failed",
        "returncode": returncode,
        "duration_s": round(duration, 1),
        "budget_s": check.budget_s,
        "timeout_s": round(timeout_s, 1),
        "log": str(log_path),
    }
    if returncode is None:
        result["status"] = "failed"
        result["reason"] = f"timed out after {timeout_s:.0f} s"
    if check.argv[0] == "pytest":
        result["pytest"] = _pytest_counts(stdout)
    if check.bench:
        result["result"] = _last_json(stdout)
        if returncode == 0 and result["result"] is None:
            result["status"] = "failed"
            result["reason"] = "no JSON on the last line of stdout"
    if result["status"] != "passed":
        result["output_tail"] = (stdout[-3000:] + "\n" + stderr[-3000:]).strip()
    return result


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def summary_dir() -> Path:
    """``$OUT/gpu_check`` when ``OUT`` is set, else ``runs/gpu_check`` in the repository."""
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check" if out else REPO_ROOT / "runs" / "gpu_check"


def plan(folder: Path) -> dict[str, Any]:
    """What a run would do: the checks, the not-verified paths and the wheel-folder report."""
    return {
        "budget_s": BUDGET_S,
        "checks": [
            {
                "name": check.name,
                "what": check.what,
                "command": "python -m " + " ".join(check.argv),
                "budget_s": check.budget_s,
                "env": {"KD_REQUIRE_GPU": "1"}
                | ({"CUDA_VISIBLE_DEVICES": ""} if check.cpu_ranks else {}),
                "optional": check.optional,
            }
            for check in CHECKS
        ],
        "not_verified": [
            {"name": name, "test": test, "reason": reason} for name, test, reason in NOT_VERIFIED
        ],
        "wheels": check_wheels(folder),
    }


def run_all(folder: Path, budget_s: float = BUDGET_S, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Install, run every check (or those named in ``only``) within ``budget_s`` and write the
    summary; returns it."""
    start = time.perf_counter()
    out_dir = summary_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    # The logs go into one archive beside the summary: the lending tool returns at most 8 files.
    log_dir = REPO_ROOT / "runs" / "gpu_check" / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    site_packages = REPO_ROOT / "runs" / "gpu_check" / "site-packages"
    summary: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": budget_s,
        "environment": environment(),
    }
    summary["install"] = install_wheels(folder, site_packages)
    results = []
    for check in CHECKS:
        if only and check.name not in only:
            results.append(_not_run(check, "not selected by --only"))
            continue
        left = budget_s - (time.perf_counter() - start)
        if check.optional and left < check.budget_s:
            results.append(_not_run(check, f"{left:.0f} s of the budget left"))
            continue
        if left < 10:
            results.append(_not_run(check, "the time budget is spent"))
            continue
        print(f"[gpu_check] {check.name} (budget {check.budget_s:.0f} s) ...", flush=True)
        result = run_check(check, min(2 * check.budget_s, left), site_packages, log_dir)
        print(
            f"[gpu_check] {check.name}: {result['status']} in {result['duration_s']} s", flush=True
        )
        results.append(result)
    summary["checks"] = results
    measurements = log_dir / MEASUREMENTS_FILE
    summary["measurements"] = (
        [json.loads(line) for line in measurements.read_text().splitlines() if line.strip()]
        if measurements.exists()
        else []
    )
    summary["not_verified"] = plan(folder)["not_verified"]
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary["within_budget"] = summary["wall_s"] <= budget_s
    required = [r for r in results if r["status"] != "not verified"]
    summary["passed"] = bool(required) and all(r["status"] == "passed" for r in required)
    summary["summary"] = {
        status: [r["name"] for r in results if r["status"] == status]
        for status in ("passed", "failed", "not verified")
    }
    summary["summary"]["not verified"] += [name for name, _, _ in NOT_VERIFIED]
    with tarfile.open(out_dir / "logs.tar.gz", "w:gz") as archive:
        archive.add(log_dir, arcname="logs")
    summary["logs"] = str(out_dir / "logs.tar.gz")
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["path"] = str(path)
    return summary


def _not_run(check: Check, reason: str) -> dict[str, Any]:
    return {
        "name": check.name,
        "what": check.what,
        "command": "python -m " + " ".join(check.argv),
        "status": "not verified",
        "reason": f"not run: {reason}",
        "duration_s": 0.0,
        "budget_s": check.budget_s,
    }


def main(argv: list[str] | None = None) -> int:
    """Run ``make gpu-check`` (or its dry run, or the wheel download); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the checks, check the wheel folder, run nothing",
    )
    parser.add_argument("--wheels", type=Path, default=WHEEL_DIR, help="the wheel folder")
    parser.add_argument(
        "--download-wheels",
        action="store_true",
        help="fill the wheel folder with pip download (needs the package index)",
    )
    parser.add_argument(
        "--python-versions",
        nargs="+",
        default=["3.11", "3.12"],
        help="CPython versions to download wheels for (--download-wheels)",
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything")
    parser.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="CHECK",
        help="run only these checks (a rerun of the failed ones; the others are 'not verified')",
    )
    options = parser.parse_args(argv)
    unknown = sorted(set(options.only) - {check.name for check in CHECKS})
    if unknown:
        parser.error(
            f"--only: unknown check(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(check.name for check in CHECKS)}"
        )

    if options.download_wheels:
        options.wheels.mkdir(parents=True, exist_ok=True)
        for command in download_commands(options.wheels, options.python_versions):
            print("$ " + " ".join(command), flush=True)
            subprocess.run(command, check=True)
        for version in options.python_versions:
            major, minor = (int(part) for part in version.split("."))
            report = check_wheels(options.wheels, (major, minor))
            print(f"[gpu_check] Python {version}: missing {report['missing'] or 'nothing'}")
        return 0

    if options.dry_run:
        listing = plan(options.wheels)
        for check in listing["checks"]:
            env = " ".join(f"{k}={v}" for k, v in check["env"].items())
            optional = ", if time allows" if check["optional"] else ""
            print(
                f"would run {check['name']} (budget {check['budget_s']:.0f} s{optional}): "
                f"{env} {check['command']}"
            )
        for item in listing["not_verified"]:
            print(f"not verified {item['name']}: {item['reason']} ({item['test']})")
        wheels = listing["wheels"]
        print(
            f"wheels for Python {wheels['python']} in {wheels['folder']}: "
            f"{len(wheels['present'])} of {len(WHEELS)} present"
        )
        for name in wheels["missing"]:
            print(f"missing wheel {name}")
        print(json.dumps(listing))
        return 0

    summary = run_all(options.wheels, options.budget, tuple(options.only))
    print(json.dumps(summary["summary"]))
    print(f"[gpu_check] summary: {summary['path']} ({summary['wall_s']} s)")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
