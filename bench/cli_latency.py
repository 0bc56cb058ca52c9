"""Benchmark: the latency of ``nemo kd distill --factory tiny_cpu --dryrun`` against nemo-run's.

The dry run only prints a recipe, so its floor is starting Python and importing nemo-run (which
imports torch). It runs ``--repeats`` times, each in a fresh subprocess, interleaved with
``python -c "import nemo_run"``, and reports both medians and their ratio (dry run / import):
``ratio`` of wall time and, steadier on a shared machine, ``cpu_ratio`` of CPU time (user +
system time of the subprocess). One more, untimed, dry run inside ``python -c`` records which of
``lightning``, ``megatron``, ``modelopt`` and ``torch`` it imported (``sys.modules`` after
nemo-run's ``app()`` returns).

``--root`` points the subprocesses at another checkout (``PYTHONPATH``), e.g. an older commit
unpacked with ``git archive``, to measure before and after a change with the same script.

The last line of stdout is one JSON object::

    {"machine": {...}, "settings": {...},
     "dryrun": {"time_s": ..., "times_s": [...], "cpu_s": ...}, "import_nemo_run": {...},
     "ratio": ..., "cpu_ratio": ..., "imported": {"lightning": false, "megatron": false, ...}}

Examples:
    .venv/bin/python -m bench.cli_latency --quick
    .venv/bin/python -m bench.cli_latency --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import machine_description

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_REPEATS = 5
QUICK_REPEATS = 1
DRYRUN_ARGUMENTS = ("kd", "distill", "--factory", "tiny_cpu", "--dryrun")
"""The measured command line, after ``nemo``."""
WATCHED_MODULES = ("lightning", "megatron", "modelopt", "torch")
"""Top-level packages whose import by the dry run is recorded."""
_IMPORTED_CHECK = (
    "import json, sys\n"
    "from nemo_run.__main__ import app\n"
    "sys.argv = ['nemo', *sys.argv[1:]]\n"
    "try:\n"
    "    app()\n"
    "except SystemExit as exit:\n"
    "    assert not exit.code, exit.code\n"
    "loaded = {name.split('.')[0] for name in sys.modules}\n"
    f"print(json.dumps({{name: name in loaded for name in {WATCHED_MODULES!r}}}))\n"
)


def _nemo_script() -> str:
    """The ``nemo`` console script of this interpreter's environment."""
    return str(Path(sys.executable).with_name("nemo"))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], env: dict[str, str], cwd: str) -> tuple[float, float, str]:
    """Run ``command`` to completion; its wall time (s), CPU time (s) and stdout.

    Raises:
        RuntimeError: when the command fails.
    """
    cpu_before = _children_cpu_s()
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu_seconds = _children_cpu_s() - cpu_before
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {completed.returncode}: {completed.stderr[-2000:]}"
        )
    return seconds, cpu_seconds, completed.stdout


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its JSON summary as the last line of stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.cli_latency", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one repetition, for CI")
    parser.add_argument(
        "--repeats", type=int, help=f"runs of each command (default {FULL_REPEATS})"
    )
    parser.add_argument("--root", help="checkout whose recipes the CLI loads (default: this one)")
    options = parser.parse_args(argv)
    repeats = options.repeats or (QUICK_REPEATS if options.quick else FULL_REPEATS)
    if repeats < 1:
        parser.error(f"--repeats={repeats} must be at least 1")
    root = str(Path(options.root or REPO_ROOT).resolve())

    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    commands = {
        "dryrun": [sys.executable, _nemo_script(), *DRYRUN_ARGUMENTS],
        "import_nemo_run": [sys.executable, "-c", "import nemo_run"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    cpu_times: dict[str, list[float]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory(prefix="cli_latency_") as cwd:  # the dry run writes nothing
        _run(commands["dryrun"], env, cwd)  # warm the file cache and bytecode, untimed
        for _ in range(repeats):
            for name, command in commands.items():
                seconds, cpu_seconds, _ = _run(command, env, cwd)
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)
        *_, stdout = _run([sys.executable, "-c", _IMPORTED_CHECK, *DRYRUN_ARGUMENTS], env, cwd)
    imported = json.loads(stdout.strip().splitlines()[-1])
    results = {
        name: {
            "time_s": round(statistics.median(times[name]), 3),
            "times_s": [round(value, 3) for value in times[name]],
            "cpu_s": round(statistics.median(cpu_times[name]), 3),
        }
        for name in commands
    }
    summary = {
        "machine": machine_description(),
        "settings": {
            "command": "nemo " + " ".join(DRYRUN_ARGUMENTS),
            "baseline": 'python -c "import nemo_run"',
            "repeats": repeats,
            "root": root,
        },
        **results,
        "ratio": round(results["dryrun"]["time_s"] / results["import_nemo_run"]["time_s"], 3),
        "cpu_ratio": round(results["dryrun"]["cpu_s"] / results["import_nemo_run"]["cpu_s"], 3),
        "imported": imported,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
