"""Tests for kd_module.data.corpus: the standard-library corpus, its split and its cache."""

from __future__ import annotations

import os

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from kd_module.data.corpus import embedded_corpus, stdlib_sources
from kd_module.data.datamodule import GPTDataModule
from kd_module.data.tokenizers import TokenizerConfig

MAX_BYTES = 150_000


def test_selection_is_sorted_deterministic_and_within_the_limits():
    """The stdlib .py files come in sorted order, the same twice, and stay within max_bytes."""
    files = stdlib_sources(max_bytes=MAX_BYTES)
    assert files == stdlib_sources(max_bytes=MAX_BYTES)
    assert all(path.endswith(".py") and "site-packages" not in path for path in files)
    assert sum(os.path.getsize(p) for p in files) <= MAX_BYTES
    assert len(stdlib_sources(max_files=7)) == 7


def test_corpus_splits_by_file_round_trips_and_is_reused(tmp_path):
    """Every 5th file is validation; documents decode to the files; a second call is cached."""
    first = embedded_corpus(cache_dir=str(tmp_path), max_bytes=MAX_BYTES, validation_every=5)
    files = stdlib_sources(max_bytes=MAX_BYTES)
    assert first["cached"] is False and first["files"] == len(files)
    assert first["validation_documents"] == len(files) // 5
    assert first["train_documents"] == len(files) - len(files) // 5
    total_bytes = sum(os.path.getsize(p) for p in files)
    assert first["train_tokens"] + first["validation_tokens"] == total_bytes + len(files)

    tokenizer = TokenizerConfig().build()
    train, validation = (
        IndexedDataset(first["train_prefix"]),
        IndexedDataset(first["validation_prefix"]),
    )
    with open(files[0], encoding="utf-8") as handle:
        assert tokenizer.detokenize(train[0].tolist()) == handle.read()
    with open(files[4], encoding="utf-8") as handle:
        assert tokenizer.detokenize(validation[0].tolist()) == handle.read()

    second = embedded_corpus(cache_dir=str(tmp_path), max_bytes=MAX_BYTES, validation_every=5)
    assert second == {**first, "cached": True}


def test_changed_settings_retokenize_into_another_directory(tmp_path, monkeypatch):
    """Other settings get their own cache entry; $KD_CACHE_DIR is the default cache directory."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path))
    small = embedded_corpus(max_bytes=60_000, validation_every=4)
    other = embedded_corpus(max_bytes=60_000, validation_every=3)
    assert other["cached"] is False and other["directory"] != small["directory"]
    assert os.path.dirname(small["directory"]) == str(tmp_path)


def test_corpus_feeds_the_data_module(tmp_path):
    """The train/validation prefixes load as per-split paths of GPTDataModule."""
    corpus = embedded_corpus(cache_dir=str(tmp_path), max_bytes=MAX_BYTES, validation_every=5)
    module = GPTDataModule(
        paths={"train": corpus["train_prefix"], "validation": corpus["validation_prefix"]},
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=4,
        num_train_samples=8,
        num_val_samples=4,
        index_mapping_dir=str(tmp_path / "index"),
    )
    batch = next(iter(module.train_dataloader()))
    assert batch["tokens"].shape == (2, 32) and int(batch["tokens"].max()) <= 256
    assert len(list(module.val_dataloader())) == 2


def test_bad_limits_are_named(tmp_path):
    """A non-positive limit, validation_every=1 and a selection too small to split are refused."""
    with pytest.raises(ValueError, match="max_bytes=0 must be a positive integer"):
        embedded_corpus(cache_dir=str(tmp_path), max_bytes=0)
    with pytest.raises(ValueError, match="validation_every=1 leaves no training files"):
        embedded_corpus(cache_dir=str(tmp_path), validation_every=1)
    with pytest.raises(
        ValueError, match=r"select 3 file\(s\), too few for a validation file every 20"
    ):
        embedded_corpus(cache_dir=str(tmp_path), max_files=3)
