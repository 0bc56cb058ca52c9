"""Atomic writes: a reader sees the old file (or directory) or the whole new one, never a part.

Each write goes to a hidden sibling first and is renamed into place (``os.replace`` is atomic
within one filesystem), so a job killed mid-write leaves the previous version intact and at most
a stray temporary next to it. Checkpoints, the teacher cache's manifest and shard markers, the
run summary and the corpus manifest are written through here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling renamed into place.

    Raises:
        OSError: when the temporary cannot be written; ``path`` is then unchanged and the
            temporary removed.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON to ``path``, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def replace_directory(staging: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename the finished ``staging`` directory to ``final``.

    An existing ``final`` (directory, file or link) is moved aside first and removed only once
    ``staging`` has taken its name, so a crash in between leaves the old one (as
    ``.NAME.replaced``) rather than nothing.
    """
    staging, final = Path(staging), Path(final)
    previous = final.parent / f".{final.name}.replaced"
    if final.is_symlink() or final.exists():
        _remove(previous)
        final.rename(previous)
    staging.rename(final)
    _remove(previous)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
