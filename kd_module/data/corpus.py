"""A default corpus that exists offline wherever Python does: the standard library's own source.

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded) are
selected in sorted order up to ``max_files``/``max_bytes``, split by file into training and a
held-out validation set (every ``validation_every``-th file), and tokenized once with the byte
tokenizer into megatron ``.bin``/``.idx`` under a cache directory. The cache key hashes the
settings and the selected files (names and sizes), so another Python or other settings
re-tokenize, and a second call with the same settings reuses the files.

Examples:
    >>> corpus = embedded_corpus(max_bytes=2_000_000)
    >>> data = GPTDataModule(paths={"train": corpus["train_prefix"],
    ...                             "validation": corpus["validation_prefix"]}, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from typing import Any

from kd_module.checkpoints.atomic import write_text_atomic
from kd_module.data.prepare import prepare_data
from kd_module.data.tokenizers import TokenizerConfig
from kd_module.rules import Problems

CACHE_ENV = "KD_CACHE_DIR"
"""Environment variable naming the cache directory."""
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "megatron-kd", "corpus")
"""Cache directory when neither ``cache_dir`` nor ``$KD_CACHE_DIR`` is set."""
_FORMAT_VERSION = 1


def stdlib_sources(max_files: int | None = None, max_bytes: int | None = None) -> list[str]:
    """The standard library's ``.py`` files in sorted order, up to the limits.

    Files that are not valid UTF-8 are skipped. Files are taken in order while the running total
    stays within ``max_bytes``; a file that would overflow it is skipped.

    Args:
        max_files: Most files to take; all when ``None``.
        max_bytes: Most bytes in total; unlimited when ``None``.

    Returns:
        Absolute paths.
    """
    root = sysconfig.get_paths()["stdlib"]
    candidates = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(
            d for d in subdirectories if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        candidates.extend(os.path.join(directory, n) for n in names if n.endswith(".py"))
    candidates.sort(key=lambda path: os.path.relpath(path, root))
    selected, total = [], 0
    for path in candidates:
        if max_files is not None and len(selected) >= max_files:
            break
        size = os.path.getsize(path)
        if size == 0 or (max_bytes is not None and total + size > max_bytes):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                handle.read()
        except (UnicodeDecodeError, OSError):
            continue
        selected.append(path)
        total += size
    return selected


def embedded_corpus(
    cache_dir: str | None = None,
    max_bytes: int = 4_000_000,
    max_files: int | None = None,
    validation_every: int = 20,
    workers: int = 1,
) -> dict[str, Any]:
    """Tokenize (once) the standard library's source into train and validation datasets.

    Args:
        cache_dir: Where the datasets are kept; ``$KD_CACHE_DIR`` or
            ``~/.cache/megatron-kd/corpus`` when ``None``.
        max_bytes: Most bytes of source to take.
        max_files: Most files to take; no limit when ``None``.
        validation_every: Every this-many-th selected file goes to validation, the rest to train.
        workers: Tokenizing processes on the first call.

    Returns:
        ``{"train_prefix", "validation_prefix", "train_documents", "validation_documents",
        "train_tokens", "validation_tokens", "files", "bytes", "directory", "cached"}``;
        ``cached`` is True when the datasets were reused.

    Raises:
        ValueError: for a bad limit, or when the selection leaves no training or no validation
            file.
    """
    problems = Problems()
    problems.positive_int("max_bytes", max_bytes)
    if max_files is not None:
        problems.positive_int("max_files", max_files)
    problems.positive_int("validation_every", validation_every)
    if isinstance(validation_every, int) and validation_every == 1:
        problems.append("validation_every=1 leaves no training files; use 2 or more")
    if problems:
        raise ValueError("embedded corpus: " + "; ".join(problems))

    files = stdlib_sources(max_files=max_files, max_bytes=max_bytes)
    validation_files = files[validation_every - 1 :: validation_every]
    train_files = [f for i, f in enumerate(files) if (i + 1) % validation_every]
    if not validation_files or not train_files:
        raise ValueError(
            f"embedded corpus: max_files={max_files}, max_bytes={max_bytes} select {len(files)} "
            f"file(s), too few for a validation file every {validation_every}; raise the limits"
        )

    root = sysconfig.get_paths()["stdlib"]
    key = {
        "version": _FORMAT_VERSION,
        "python": sys.version,
        "stdlib": root,
        "validation_every": validation_every,
        "tokenizer": TokenizerConfig().to_dict(),
        "files": [(os.path.relpath(f, root), os.path.getsize(f)) for f in files],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    directory = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"stdlib-{digest}")
    manifest_path = os.path.join(directory, "manifest.json")

    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            summary = json.load(handle)
        prefixes = (summary["train_prefix"], summary["validation_prefix"])
        if all(os.path.isfile(p + suffix) for p in prefixes for suffix in (".bin", ".idx")):
            return {**summary, "cached": True}

    summaries = {
        split: prepare_data(split_files, os.path.join(directory, split), workers=workers)
        for split, split_files in (("train", train_files), ("validation", validation_files))
    }
    summary = {
        "train_prefix": summaries["train"]["output_prefix"],
        "validation_prefix": summaries["validation"]["output_prefix"],
        "train_documents": summaries["train"]["documents"],
        "validation_documents": summaries["validation"]["documents"],
        "train_tokens": summaries["train"]["tokens"],
        "validation_tokens": summaries["validation"]["tokens"],
        "files": len(files),
        "bytes": sum(size for _, size in key["files"]),
        "directory": directory,
    }
    # The manifest goes last and atomically: its presence means both datasets are complete.
    write_text_atomic(manifest_path, json.dumps(summary, indent=2))
    return {**summary, "cached": False}
