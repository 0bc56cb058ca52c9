"""Tokenizers for distillation data, built through megatron-core's tokenizer library.

Three sources are supported, all returning a ``megatron.core.tokenizers`` text tokenizer with
``tokenize``, ``detokenize``, ``eod``, ``pad`` and ``vocab_size`` (what megatron's ``GPTDataset``
reads):

- ``"byte"``: megatron's byte-level tokenizer (UTF-8 bytes 0..255, then ``<eod>`` = 256 and
  ``<pad>`` = 257); needs no file and works offline.
- ``"huggingface"``: a HuggingFace tokenizer saved in a local directory (needs ``transformers``).
- ``"sentencepiece"``: a SentencePiece ``.model`` file (needs ``sentencepiece``).

Teacher and student must share a tokenizer: logit distillation compares distributions over the
same vocabulary, so :func:`check_same_tokenizer` refuses a mismatch before anything is built.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from kd_module.rules import Problems, close_matches, positive_int_problems

LIBRARIES = ("byte", "huggingface", "sentencepiece")
"""Tokenizer sources accepted by :class:`TokenizerConfig`."""

# megatron-core's name for each library, see megatron/core/tokenizers/text/text_tokenizer.py.
_MEGATRON_LIBRARY = {"huggingface": "huggingface", "sentencepiece": "sentencepiece"}
_REQUIRED_MODULE = {"huggingface": "transformers", "sentencepiece": "sentencepiece"}

BYTE_VOCAB_SIZE = 258
"""Byte tokenizer vocabulary: 256 byte values, then ``<eod>`` and ``<pad>``."""
BYTE_EOD_ID = 256
"""End-of-document id of the byte tokenizer (outside the byte range, so no byte is taken for it)."""
BYTE_PAD_ID = 257
"""Padding id of the byte tokenizer."""


@dataclass
class TokenizerConfig:
    """Which tokenizer to build; teacher and student must use the same one."""

    library: str = "byte"
    """One of ``"byte"`` (offline UTF-8 bytes), ``"huggingface"`` or ``"sentencepiece"``."""
    path: str | None = None
    """Local directory of a HuggingFace tokenizer, or a SentencePiece ``.model`` file; unused by
    ``"byte"``."""

    def __post_init__(self) -> None:
        problems = []
        if self.library not in LIBRARIES:
            problems.append(
                f"unknown library {self.library!r}{close_matches(self.library, LIBRARIES)}; "
                f"allowed: {', '.join(LIBRARIES)}"
            )
        elif self.library == "byte":
            if self.path is not None:
                problems.append(f"path {self.path!r} is not used by library 'byte'; leave it None")
        elif self.path is None:
            problems.append(f"library {self.library!r} needs a path (got None)")
        elif not os.path.exists(self.path):
            problems.append(f"path {self.path!r} does not exist")
        elif self.library == "huggingface" and not os.path.isdir(self.path):
            problems.append(
                f"path {self.path!r} must be a directory holding a HuggingFace tokenizer"
            )
        elif self.library == "sentencepiece" and not os.path.isfile(self.path):
            problems.append(f"path {self.path!r} must be a SentencePiece .model file")
        if problems:
            raise ValueError("tokenizer config: " + "; ".join(problems))

    def build(self) -> Any:
        """Build the tokenizer.

        Returns:
            A megatron-core text tokenizer (``MegatronTokenizerText``) with ``tokenize(text)``,
            ``detokenize(ids)``, ``eod``, ``pad`` and ``vocab_size``.

        Raises:
            ImportError: when the library's Python package is not installed.

        Examples:
            >>> tokenizer = TokenizerConfig().build()
            >>> tokenizer.tokenize("hi")
            [104, 105]
        """
        if self.library == "byte":
            return _build_byte_tokenizer()
        module = _REQUIRED_MODULE[self.library]
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"tokenizer library {self.library!r} needs the Python package {module!r}; "
                f"install it with `pip install {module}`"
            )
        from megatron.core.tokenizers import MegatronTokenizer

        return MegatronTokenizer.from_pretrained(
            tokenizer_path=self.path,
            metadata_path={"library": _MEGATRON_LIBRARY[self.library]},
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what a checkpoint or a teacher config stores)."""
        return asdict(self)

    def identity(self) -> tuple[str, str | None]:
        """``(library, resolved path)``: equal identities build equal tokenizers."""
        path = None if self.path is None else os.path.realpath(os.path.expanduser(self.path))
        return self.library, path


@functools.cache
def _byte_tokenizer_class() -> type:
    """The byte tokenizer class, defined on first use so that importing this module stays cheap."""
    from megatron.core.tokenizers.text.models import DefaultTokenizerText

    class ByteTokenizer(DefaultTokenizerText):
        """megatron's byte-level tokenizer with a lossless ``detokenize``.

        megatron's ``ByteLevelTokenizer.ids_to_text`` strips trailing whitespace from the decoded
        text, so ``detokenize(tokenize(text)) != text`` for most files (they end in a newline).
        Only that method is replaced; tokenization and the special ids are megatron's.
        """

        def detokenize(self, ids: list[int]) -> str:
            """UTF-8 text of the byte ids, with special ids (EOD, pad) dropped."""
            return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    ByteTokenizer.__qualname__ = "ByteTokenizer"
    return ByteTokenizer


def _build_byte_tokenizer() -> Any:
    """megatron-core's byte-level tokenizer with EOD/pad ids outside the byte range."""

    # megatron numbers the listed special tokens downwards from 256 + len(special_tokens) - 1,
    # so "<pad>" gets 257 and "<eod>" 256; its default (eos 0, pad 1) would collide with bytes.
    return _byte_tokenizer_class()(
        path=None,
        config={"library": "byte-level"},
        vocab_size=256,
        special_tokens=["<pad>", "<eod>"],
        _eos_id=BYTE_EOD_ID,
        _pad_id=BYTE_PAD_ID,
    )


def padded_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Round a vocabulary size up to a multiple of ``make_vocab_size_divisible_by`` x TP.

    Megatron pads the embedding table so that every tensor-parallel rank holds an equal,
    well-aligned slice of it.

    Args:
        vocab_size: The tokenizer's vocabulary size.
        make_vocab_size_divisible_by: Alignment per tensor-parallel rank.
        tensor_model_parallel_size: Number of tensor-parallel ranks.

    Returns:
        The smallest multiple of ``make_vocab_size_divisible_by * tensor_model_parallel_size``
        that is at least ``vocab_size``.

    Raises:
        ValueError: when an argument is not a positive integer.

    Examples:
        >>> padded_vocab_size(258, 128, 2)
        512
    """
    problems = positive_int_problems(
        vocab_size=vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )
    Problems(problems).raise_if_any("padded_vocab_size")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


def check_same_tokenizer(
    student: TokenizerConfig, teacher: TokenizerConfig | dict[str, Any] | None
) -> None:
    """Refuse a teacher whose tokenizer differs from the student's.

    Args:
        student: The student's tokenizer.
        teacher: The teacher's tokenizer, as a config or a dict of its fields; ``None`` means the
            teacher uses the student's tokenizer.

    Raises:
        ValueError: naming both tokenizers when they differ, or when the teacher's dict is not a
            valid tokenizer config.
    """
    if teacher is None:
        return
    if isinstance(teacher, dict):
        unknown = sorted(set(teacher) - {"library", "path"})
        if unknown:
            raise ValueError(
                f"teacher tokenizer: unknown key {unknown[0]!r}"
                f"{close_matches(unknown[0], ['library', 'path'])}; allowed: library, path"
            )
        teacher = TokenizerConfig(**teacher)
    if student.identity() != teacher.identity():
        raise ValueError(
            "teacher and student must share a tokenizer: student uses "
            f"library={student.library!r} path={student.path!r}, teacher uses "
            f"library={teacher.library!r} path={teacher.path!r}"
        )
