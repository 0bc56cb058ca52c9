"""Smoke test of the CLI latency benchmark (no timing thresholds: timings vary by machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_cli_latency_quick_prints_json_and_the_dry_run_stays_light() -> None:
    """`python -m bench.cli_latency --quick` ends with JSON holding both medians and their ratio,
    and the dry run it measured imported none of lightning, megatron and modelopt."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.cli_latency", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    keys = {"machine", "settings", "dryrun", "import_nemo_run", "ratio", "cpu_ratio", "imported"}
    assert keys <= set(summary)
    assert summary["settings"]["repeats"] == 1
    for command in ("dryrun", "import_nemo_run"):
        assert summary[command]["time_s"] > 0 and len(summary[command]["times_s"]) == 1
        assert summary[command]["cpu_s"] > 0
    assert summary["ratio"] > 0 and summary["cpu_ratio"] > 0
    assert set(summary["imported"]) == {"lightning", "megatron", "modelopt", "torch"}
    heavy = [name for name in ("lightning", "megatron", "modelopt") if summary["imported"][name]]
    assert heavy == []
