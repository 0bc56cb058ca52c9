"""Tests for kd_module.data.prepare: .jsonl/.txt to megatron .bin/.idx, and its input checks."""

from __future__ import annotations

import io
import json

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from kd_module.data.prepare import main, prepare_data, prepare_data_cli
from kd_module.data.tokenizers import TokenizerConfig

TEXTS = ["first document\n", "zweite Größe ✓", "  trailing spaces and tabs\t\n\n"]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _assert_round_trip(prefix, tokenizer, texts):
    documents = _documents(prefix)
    assert len(documents) == len(texts)
    for ids, text in zip(documents, texts, strict=True):
        assert ids[-1] == tokenizer.eod
        assert tokenizer.detokenize(ids[:-1]) == text


@pytest.mark.parametrize("workers", [1, 2])
def test_byte_dataset_round_trips_to_the_original_text(tmp_path, workers):
    """Each stored document is its text's UTF-8 bytes plus EOD, in input order, 1 or 2 workers."""
    jsonl = _write_jsonl(
        tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS[:2])]
    )
    (tmp_path / "b.txt").write_text(TEXTS[2], encoding="utf-8")
    summary = prepare_data(
        [jsonl, str(tmp_path / "b.txt")], str(tmp_path / "out" / "ds"), workers=workers
    )

    tokenizer = TokenizerConfig().build()
    _assert_round_trip(summary["output_prefix"], tokenizer, TEXTS)
    expected_tokens = sum(len(t.encode("utf-8")) + 1 for t in TEXTS)
    assert (summary["documents"], summary["tokens"], summary["files"]) == (3, expected_tokens, 2)
    assert _documents(summary["output_prefix"])[0] == list(b"first document\n") + [256]


def test_directory_input_is_read_recursively_in_sorted_order(tmp_path):
    """A directory contributes its .jsonl/.txt files sorted by path; other files are ignored."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "in" / "sub" / "a.txt").write_text("C", encoding="utf-8")
    _write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "A"}])
    (tmp_path / "in" / "notes.md").write_text("ignored", encoding="utf-8")
    summary = prepare_data(str(tmp_path / "in"), str(tmp_path / "ds"), workers=1, append_eod=False)
    assert _documents(summary["output_prefix"]) == [[ord("A")], [ord("B")], [ord("C")]]


def test_cli_writes_the_dataset_and_reports_counts(tmp_path, capsys):
    """`python -m kd_module.data.prepare` takes the same arguments and prints the final counts."""
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"body": "abc"}, {"body": "de"}])
    summary = main(
        [jsonl, "--output-prefix", str(tmp_path / "ds"), "--json-key", "body", "--workers", "1"]
    )
    assert (summary["documents"], summary["tokens"]) == (2, 7)
    assert "wrote 2 documents, 7 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])


def test_cli_reports_bad_arguments_by_name(tmp_path, capsys):
    """A misspelt tokenizer library exits with status 2 and the config error on stderr."""
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"text": "abc"}])
    with pytest.raises(SystemExit) as exit_info:
        main([jsonl, "--output-prefix", str(tmp_path / "ds"), "--tokenizer-library", "bytes"])
    assert exit_info.value.code == 2
    assert "unknown library 'bytes' (did you mean 'byte'?)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="library 'sentencepiece' needs a path"):
        prepare_data_cli([jsonl], str(tmp_path / "ds"), tokenizer_library="sentencepiece")


def test_huggingface_tokenizer_dataset_round_trips(tmp_path):
    """A tiny byte-level BPE saved with transformers prepares data that decodes to the input."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tests.helpers import save_hf_tokenizer

    save_hf_tokenizer(tmp_path / "hf", TEXTS * 10, vocab_size=300)

    config = TokenizerConfig(library="huggingface", path=str(tmp_path / "hf"))
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    summary = prepare_data(jsonl, str(tmp_path / "ds"), tokenizer=config, workers=2)
    tokenizer = config.build()
    _assert_round_trip(summary["output_prefix"], tokenizer, TEXTS)
    assert summary["tokens"] < sum(len(t.encode("utf-8")) + 1 for t in TEXTS)


def test_sentencepiece_tokenizer_dataset_round_trips(tmp_path):
    """A tiny SentencePiece model prepares data that decodes to the input."""
    sentencepiece = pytest.importorskip("sentencepiece")
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 20),
        model_writer=model,
        vocab_size=40,
        model_type="bpe",
        unk_id=0,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "spm.model").write_bytes(model.getvalue())

    config = TokenizerConfig(library="sentencepiece", path=str(tmp_path / "spm.model"))
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    summary = prepare_data(jsonl, str(tmp_path / "ds"), tokenizer=config, workers=1)
    _assert_round_trip(summary["output_prefix"], config.build(), texts)


def _assert_nothing_written(tmp_path):
    leftovers = (
        sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    )
    assert leftovers == []


def test_missing_input_path_is_named(tmp_path):
    """A path that does not exist stops the run with its name."""
    with pytest.raises(ValueError, match=r"input path '.*missing\.jsonl' does not exist"):
        prepare_data(str(tmp_path / "missing.jsonl"), str(tmp_path / "out" / "ds"))


def test_empty_file_is_named_and_nothing_is_written(tmp_path):
    """An empty input file stops the run with its name; no output or temporary file is left."""
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        prepare_data([good, str(tmp_path / "empty.txt")], str(tmp_path / "out" / "ds"), workers=1)
    _assert_nothing_written(tmp_path)


def test_jsonl_of_blank_lines_has_no_documents(tmp_path):
    """A .jsonl file holding only blank lines is refused by name."""
    (tmp_path / "blank.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank\.jsonl holds no documents"):
        prepare_data(str(tmp_path / "blank.jsonl"), str(tmp_path / "out" / "ds"), workers=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_json_line_is_named_by_file_and_line(tmp_path, workers):
    """A line that is not JSON stops the run at file:line for any worker count, writing nothing."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: bad JSON line"):
        prepare_data(str(path), str(tmp_path / "out" / "ds"), workers=workers)
    _assert_nothing_written(tmp_path)


def test_missing_key_is_named_with_the_keys_present(tmp_path):
    """A record without json_key names file:line, the key and the keys it has."""
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"content": "x", "id": 3}])
    with pytest.raises(
        ValueError, match=r"a\.jsonl:2: missing key 'text' \(keys present: 'content', 'id'\)"
    ):
        prepare_data(path, str(tmp_path / "out" / "ds"), workers=1)


def test_failed_rerun_keeps_the_previous_complete_dataset(tmp_path):
    """A failing run over an existing prefix leaves the earlier .bin/.idx untouched."""
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "abc"}])
    prefix = str(tmp_path / "out" / "ds")
    prepare_data(good, prefix, workers=1)
    before = (tmp_path / "out" / "ds.bin").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        prepare_data([good, str(bad)], prefix, workers=1)
    assert (tmp_path / "out" / "ds.bin").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds.bin", "ds.idx"]
