"""A golden curve: the ``tiny_cpu`` recipe's first five steps pinned to recorded values.

Every layout test compares one path with another; a change that moves every path the same way
(a new default learning-rate schedule, loss reduction, initialization or data order) passes
them all. This test does not: it builds the recipe as users get it (mock data, the tiny saved
teacher of ``conftest.py``), runs it in this process and compares the logged metrics with
numbers recorded from the code of 2026-12-04 (unchanged since the start of that day's work:
the same run on the previous commit gave the same bits). If a change is meant to move them,
record the new values in the same commit and say why in its message.
"""

from __future__ import annotations

import csv

import pytest

RECORDED = {
    # step: (kd_loss, logits_loss, lm_loss, grad_norm, lr)
    0: (8.7859525680542, 2.9808239936828613, 5.805129528045654, 2.395411252975464, 3.0e-4),
    1: (8.763357162475586, 2.97318959236145, 5.790168285369873, 2.3762929439544678, 6.0e-4),
    2: (8.72065258026123, 2.948997735977173, 5.771655559539795, 2.3283743858337402, 9.0e-4),
    3: (8.616601943969727, 2.895857095718384, 5.720745086669922, 2.298288345336914, 1.2e-3),
    4: (8.481017112731934, 2.8173511028289795, 5.663666248321533, 2.3064651489257812, 1.5e-3),
}
RECORDED_VALIDATION = {
    "val_loss": 5.609013557434082,
    "val_kd_loss": 2.6734628677368164,
    "teacher_val_loss": 10.663248062133789,
}
RTOL = 2e-5
"""fp32 on the same kind of CPU repeats these bit for bit; the slack covers another BLAS kernel."""


def test_tiny_cpu_first_five_steps_match_recorded_values(tiny_teacher, tmp_path):
    """tiny_cpu (mock data, the tiny saved teacher) logs the recorded losses, gradient norms
    and learning rates at steps 0-4, and the recorded validation losses after step 4."""
    import fiddle as fdl

    from recipes.tiny_cpu import tiny_cpu

    recipe = tiny_cpu(
        teacher_path=tiny_teacher,
        mock_data=True,
        max_steps=5,
        dir=str(tmp_path / "runs"),
        name="golden",
        limit_val_batches=1,
    )
    recipe.trainer.enable_progress_bar = False
    recipe.trainer.log_every_n_steps = 1
    fdl.build(recipe)()

    with open(tmp_path / "runs" / "golden" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    train = {int(row["step"]): row for row in rows if row.get("kd_loss")}
    assert sorted(train) == sorted(RECORDED)
    names = ("kd_loss", "logits_loss", "lm_loss", "grad_norm", "lr")
    for step, expected in RECORDED.items():
        for name, value in zip(names, expected, strict=True):
            assert float(train[step][name]) == pytest.approx(value, rel=RTOL), (step, name)
    (validation,) = [row for row in rows if row.get("val_loss")]
    for name, value in RECORDED_VALIDATION.items():
        assert float(validation[name]) == pytest.approx(value, rel=RTOL), name
