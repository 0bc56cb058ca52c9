"""Atomic writes (kd_module.checkpoints.atomic) and the single-rank collectives."""

from __future__ import annotations

import json

import pytest

from kd_module.checkpoints import atomic
from kd_module.checkpoints.atomic import replace_directory, write_json_atomic, write_text_atomic
from kd_module.parallel.collectives import all_gather_object, barrier, free_port


def test_write_text_atomic_replaces_the_file(tmp_path):
    """The new text replaces the old one and no temporary is left next to it."""
    path = tmp_path / "latest_checkpointed_iteration.txt"
    path.write_text("1\n")
    write_text_atomic(path, "2\n")
    assert path.read_text() == "2\n"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_failure_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    """A write that dies half-way (disk full) keeps the old content and removes the partial."""
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"complete": True, "k": 8})
    before = path.read_text()

    real_open = open

    class DiesHalfWay:
        def __init__(self, handle):
            self._handle = handle

        def write(self, text):
            self._handle.write(text[: len(text) // 2])
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    monkeypatch.setattr(
        atomic, "open", lambda *a, **k: DiesHalfWay(real_open(*a, **k)), raising=False
    )
    with pytest.raises(OSError, match="No space left on device"):
        write_json_atomic(path, {"complete": False, "k": 16})
    assert path.read_text() == before
    assert json.loads(before) == {"complete": True, "k": 8}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_json_atomic_writes_sorted_indented_json(tmp_path):
    """The JSON is key-sorted, indented and ends with a newline (diff-friendly summaries)."""
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_replace_directory_swaps_in_the_new_directory(tmp_path):
    """An existing directory is replaced whole; its aside copy is gone afterwards."""
    final, staging = tmp_path / "iter_0000002", tmp_path / ".iter_0000002.incomplete"
    final.mkdir()
    (final / "old.pt").write_text("old")
    staging.mkdir()
    (staging / "new.pt").write_text("new")
    replace_directory(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002"]


def test_replace_directory_over_a_file_or_a_link(tmp_path):
    """A file or a (dangling) link at the final name is replaced too."""
    for make in ("file", "link"):
        final, staging = tmp_path / f"step={make}", tmp_path / f".tmp-step={make}"
        if make == "file":
            final.write_text("not a directory")
        else:
            final.symlink_to(tmp_path / "missing")
        staging.mkdir()
        replace_directory(staging, final)
        assert final.is_dir() and not final.is_symlink()


def test_collectives_on_one_rank():
    """Without a process group the collectives are no-ops; a free port can be bound."""
    import socket

    barrier()
    assert all_gather_object({"rank": 0}) == [{"rank": 0}]
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
