"""examples/distill_in_notebook.ipynb runs top to bottom in this environment's Jupyter kernel."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "distill_in_notebook.ipynb"


def _stdout(cell) -> str:
    return "".join(
        o.get("text", "")
        for o in cell.outputs
        if o.output_type == "stream" and o.get("name") == "stdout"
    )


@pytest.mark.timeout(600)
def test_notebook_fits_a_tiny_pair_and_prints_final_metrics(tmp_path, monkeypatch):
    """The notebook's Trainer.fit runs 8 steps on CPU in the venv's kernel; metrics are finite."""
    import nbclient
    import nbformat

    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=500,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # The kernel is this environment's python (python or python3 of the same bin directory).
    assert Path(_stdout(code[0]).strip()).parent == Path(sys.executable).parent
    lines = _stdout(code[-1]).strip().splitlines()
    values = dict(line.split() for line in lines)
    assert values.pop("steps") == "8"
    assert set(values) == {"lm_loss", "kd_loss", "logits_loss", "val_loss", "teacher_val_loss"}
    numbers = {key: float(value) for key, value in values.items()}
    assert all(math.isfinite(v) and v > 0 for v in numbers.values()), numbers
    # kd_loss = lm_loss + logits_loss with skip_lm_loss=False and kd_loss_scale=1.
    total = numbers["lm_loss"] + numbers["logits_loss"]
    assert numbers["kd_loss"] == pytest.approx(total, abs=2e-4)
