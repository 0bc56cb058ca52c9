"""The entry points' grouped arguments (kd_module.specs): checks, and the one mapping of the
deprecated flat keywords onto the groups."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kd_module.models.gpt import GPTModelConfig
from kd_module.specs import OfflineConfig, RunConfig, TeacherSpec, fold_flat_keywords

GROUPS = {"teacher": None, "job": None, "offline": None}


def test_specs_import_no_torch_or_lightning():
    """The CLI builds these configs, so importing them stays light."""
    code = (
        "import sys, kd_module.specs\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'lightning', 'megatron', 'modelopt'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TeacherSpec(ckpt_format="zarr"), r"teacher spec: ckpt_format='zarr' is not one"),
        (
            lambda: RunConfig(keep_last=0, checkpoint_every_n_steps=-1),
            r"run config: keep_last=0 must be a positive integer; checkpoint_every_n_steps=-1",
        ),
        (lambda: OfflineConfig("/c", "ful"), r"offline config: loss_mode='ful' is not one of"),
        (
            lambda: RunConfig(export=False, export_hf="/hf"),
            r"run config: export_hf='/hf' needs export=True",
        ),
    ],
)
def test_each_group_checks_its_fields(make, message):
    """A bad field is one ValueError naming the group, the key and what is allowed."""
    with pytest.raises(ValueError, match=message):
        make()


def test_flat_keywords_fold_into_their_groups_with_a_deprecation_warning():
    """Each old keyword lands on its group's field; the warning names the new spelling."""
    teacher = GPTModelConfig(num_layers=3)
    flat = {"teacher_checkpoint": "/t", "keep_last": 4, "teacher_cache": "/c"}
    with pytest.warns(DeprecationWarning, match=r"teacher_checkpoint= \(use teacher.checkpoint=\)"):
        groups = fold_flat_keywords("distill", {**GROUPS, "teacher": teacher}, flat)
    assert groups["teacher"] == TeacherSpec(checkpoint="/t", config=teacher)
    assert groups["job"] == RunConfig(keep_last=4)
    assert groups["offline"] == OfflineConfig(teacher_cache="/c")


def test_grouped_arguments_pass_unchanged_and_without_warning(recwarn):
    """No flat keyword: the groups come back as given, and nothing warns."""
    groups = {"teacher": TeacherSpec(checkpoint="/t"), "job": None, "offline": None}
    assert fold_flat_keywords("distill", groups, {}) == groups
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_a_loss_mode_without_a_cache_makes_no_offline_run():
    """offline_loss_mode= alone was ignored before (online run); it still is."""
    with pytest.warns(DeprecationWarning):
        groups = fold_flat_keywords("distill", GROUPS, {"offline_loss_mode": "renormalized"})
    assert groups["offline"] is None


def test_build_teacher_cache_refuses_both_spellings_and_the_run_keywords(tmp_path):
    """build_teacher_cache takes the teacher group: teacher_checkpoint= with teacher.checkpoint
    names both; a run keyword (log_dir=) is no argument of it."""
    from kd_module.data import GPTDataModule
    from kd_module.offline.job import build_teacher_cache

    data = GPTDataModule(mock=True, seq_length=32, micro_batch_size=1, global_batch_size=1)
    with pytest.raises(ValueError, match=r"teacher_checkpoint='/b' and teacher.checkpoint='/a'"):
        build_teacher_cache(
            data, str(tmp_path), TeacherSpec(checkpoint="/a"), teacher_checkpoint="/b"
        )
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'log_dir'"):
        build_teacher_cache(data, str(tmp_path), log_dir="/runs")
    assert list(tmp_path.iterdir()) == []
