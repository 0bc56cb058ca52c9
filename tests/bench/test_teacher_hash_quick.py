"""Smoke test of the teacher hash benchmark (no timing thresholds: timings vary by machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SLACK_MB = 8.0


@pytest.mark.timeout(120)
def test_teacher_hash_quick_prints_json_summary() -> None:
    """`python -m bench.teacher_hash --quick` ends with JSON for both methods, the same digests,
    and the streamed hash adding less host memory than its buffer plus slack."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.teacher_hash", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["settings"]["total_mb"] == 32
    assert summary["digests_equal"] is True
    for method in ("old", "new"):
        assert {"time_s", "peak_host_mb"} <= summary[method].keys()
    assert {"time_ratio", "memory_ratio"} <= summary.keys()
    assert summary["new"]["peak_host_mb"] < summary["settings"]["chunk_mb"] + SLACK_MB, summary
