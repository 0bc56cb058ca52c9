"""Tests for kd_module.data.tokenizers: the byte tokenizer, config validation, vocab padding."""

from __future__ import annotations

import pytest

from kd_module.data.tokenizers import (
    BYTE_EOD_ID,
    BYTE_PAD_ID,
    TokenizerConfig,
    check_same_tokenizer,
    padded_vocab_size,
)


def test_byte_tokenizer_ids_are_utf8_bytes_and_round_trip():
    """Byte ids are the UTF-8 bytes; detokenize restores the text exactly (trailing newline too)."""
    tokenizer = TokenizerConfig().build()
    text = "héllo\n\tworld  \n"
    ids = tokenizer.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.tokenize("hi") == [104, 105]
    assert tokenizer.detokenize(ids + [tokenizer.eod]) == text


def test_byte_tokenizer_special_ids_sit_outside_the_byte_range():
    """EOD is 256 and pad 257, so no byte value (NUL included) is mistaken for them."""
    tokenizer = TokenizerConfig().build()
    assert (tokenizer.eod, tokenizer.pad, tokenizer.vocab_size) == (BYTE_EOD_ID, BYTE_PAD_ID, 258)
    assert tokenizer.tokenize("\x00") == [0]


def test_unknown_library_suggests_the_close_name():
    """A misspelt library names the bad value, a suggestion and the allowed values."""
    with pytest.raises(ValueError, match=r"unknown library 'bytes' \(did you mean 'byte'\?\)"):
        TokenizerConfig(library="bytes")


def test_library_with_a_file_needs_an_existing_path(tmp_path):
    """huggingface/sentencepiece without a path, or with a missing one, are refused by name."""
    with pytest.raises(ValueError, match="library 'huggingface' needs a path"):
        TokenizerConfig(library="huggingface")
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ValueError, match=r"path '.*nope\.model' does not exist"):
        TokenizerConfig(library="sentencepiece", path=missing)
    with pytest.raises(ValueError, match="is not used by library 'byte'"):
        TokenizerConfig(library="byte", path=str(tmp_path))


@pytest.mark.parametrize(
    ("vocab_size", "divisible_by", "tp", "expected"),
    [(258, 128, 1, 384), (258, 128, 2, 512), (256, 128, 2, 256), (50257, 128, 8, 51200)],
)
def test_padded_vocab_size_rounds_up_to_divisible_by_times_tp(
    vocab_size, divisible_by, tp, expected
):
    """The padded size is the next multiple of make_vocab_size_divisible_by x TP."""
    assert padded_vocab_size(vocab_size, divisible_by, tp) == expected


def test_padded_vocab_size_rejects_non_positive_arguments():
    """Zero or negative sizes are named in the error."""
    with pytest.raises(ValueError, match="tensor_model_parallel_size=0 must be a positive"):
        padded_vocab_size(258, 128, 0)


def test_check_same_tokenizer_accepts_equal_and_missing_teacher(tmp_path):
    """Equal configs (also as a dict, also by another spelling of the same path) and None pass."""
    model = tmp_path / "spm.model"
    model.write_bytes(b"x")
    student = TokenizerConfig(library="sentencepiece", path=str(model))
    check_same_tokenizer(student, None)
    check_same_tokenizer(
        student, {"library": "sentencepiece", "path": str(tmp_path / "." / "spm.model")}
    )
    check_same_tokenizer(TokenizerConfig(), TokenizerConfig())


def test_check_same_tokenizer_names_both_when_they_differ(tmp_path):
    """A teacher with another tokenizer is refused with both tokenizers in the message."""
    model = tmp_path / "spm.model"
    model.write_bytes(b"x")
    with pytest.raises(
        ValueError,
        match=r"student uses library='byte' path=None, teacher uses library='sentencepiece'",
    ):
        check_same_tokenizer(TokenizerConfig(), TokenizerConfig("sentencepiece", str(model)))
    with pytest.raises(ValueError, match=r"unknown key 'librar' \(did you mean 'library'\?\)"):
        check_same_tokenizer(TokenizerConfig(), {"librar": "byte"})
