"""Turn text files into megatron ``.bin``/``.idx`` indexed datasets.

Inputs are ``.jsonl`` files (one JSON object per line, the text under ``json_key``), ``.txt``
or other text files (the whole file is one document) or directories holding ``.jsonl``/``.txt``
files (searched recursively, in
sorted order). Documents are tokenized in worker processes and written with megatron-core's
``IndexedDatasetBuilder``; outputs appear only when the whole run succeeded.

Examples:
    CLI::

        nemo kd prepare-data --inputs data/train.jsonl --output-prefix data/train
        python -m kd_module.data.prepare data/train.jsonl --output-prefix data/train

    Python::

        from kd_module.data.prepare import prepare_data
        prepare_data("data/train.jsonl", "data/train")
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from kd_module.data.tokenizers import LIBRARIES, TokenizerConfig
from kd_module.rules import Problems, positive_int_problems

SUFFIXES = (".jsonl", ".txt")
"""File types :func:`prepare_data` reads."""

_worker_tokenizer: Any = None


def _init_worker(tokenizer: TokenizerConfig, append_eod: bool) -> None:
    global _worker_tokenizer
    _worker_tokenizer = (tokenizer.build(), append_eod)


def _tokenize(text: str) -> list[int]:
    tokenizer, append_eod = _worker_tokenizer
    ids = list(tokenizer.tokenize(text))
    if append_eod:
        ids.append(tokenizer.eod)
    return ids


def collect_files(inputs: list[str] | str) -> list[str]:
    """The input files, directories expanded recursively and sorted.

    Args:
        inputs: Files and directories.

    Returns:
        File paths in the order given; a directory contributes its ``.jsonl``/``.txt`` files,
        sorted.

    Raises:
        ValueError: naming a missing path or a directory without ``.jsonl``/``.txt`` files.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("prepare_data: no inputs given")
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(SUFFIXES)
            )
            if not found:
                raise ValueError(
                    f"prepare_data: directory {path!r} holds no {' or '.join(SUFFIXES)} files"
                )
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"prepare_data: input path {path!r} does not exist")
    return files


def iter_documents(files: list[str], json_key: str = "text") -> Iterator[str]:
    """Yield each document's text, checking the input as it goes.

    Args:
        files: ``.jsonl`` paths (JSON lines) and other text files (one document each).
        json_key: The key holding the text in each JSON line.

    Yields:
        Document texts; blank JSON lines are skipped.

    Raises:
        ValueError: an empty file, a ``.jsonl`` file without documents, a line that is not a
            JSON object (``file:line``), or a line without ``json_key`` (``file:line``, the keys
            present).
    """
    for path in files:
        if os.path.getsize(path) == 0:
            raise ValueError(f"prepare_data: {path} is empty")
        if not path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as handle:
                yield handle.read()
            continue
        documents = 0
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"prepare_data: {path}:{line_number}: bad JSON line ({error.msg})"
                    ) from None
                if not isinstance(record, dict):
                    raise ValueError(
                        f"prepare_data: {path}:{line_number}: expected a JSON object, "
                        f"got {type(record).__name__}"
                    )
                if json_key not in record:
                    raise ValueError(
                        f"prepare_data: {path}:{line_number}: missing key {json_key!r} "
                        f"(keys present: {', '.join(map(repr, record)) or 'none'})"
                    )
                text = record[json_key]
                if not isinstance(text, str):
                    raise ValueError(
                        f"prepare_data: {path}:{line_number}: key {json_key!r} holds "
                        f"{type(text).__name__}, expected a string"
                    )
                documents += 1
                yield text
        if documents == 0:
            raise ValueError(f"prepare_data: {path} holds no documents (only blank lines)")


def _progress(items: Iterable[list[int]], description: str) -> Iterator[list[int]]:
    """Wrap ``items`` in a tqdm bar, or count on stderr when tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc=description, unit="doc", file=sys.stderr)
        return
    count = 0
    for count, item in enumerate(items, start=1):
        if count % 1000 == 0:
            print(f"\r{description}: {count} documents", end="", file=sys.stderr)
        yield item
    print(f"\r{description}: {count} documents", file=sys.stderr)


def prepare_data(
    inputs: list[str] | str,
    output_prefix: str,
    tokenizer: TokenizerConfig | None = None,
    json_key: str = "text",
    workers: int = 2,
    append_eod: bool = True,
) -> dict[str, Any]:
    """Tokenize text files into a megatron indexed dataset ``<output_prefix>.bin``/``.idx``.

    Args:
        inputs: ``.jsonl`` files, ``.txt`` or other text files (one document each), or
            directories of ``.jsonl``/``.txt`` files.
        output_prefix: Path prefix of the outputs; its directory is created.
        tokenizer: The tokenizer; the offline byte tokenizer when ``None``. Use the same one the
            student and the teacher are trained with.
        json_key: Key of the text in each JSON line.
        workers: Tokenizing processes; 1 tokenizes in this process.
        append_eod: Append the tokenizer's end-of-document id to every document.

    Returns:
        ``{"output_prefix", "bin_path", "idx_path", "files", "documents", "tokens"}``.

    Raises:
        ValueError: on malformed input (see :func:`collect_files` and :func:`iter_documents`);
            nothing is written then.

    Examples:
        CLI::

            nemo kd prepare-data --inputs data/ --output-prefix out/corpus --workers 4
            python -m kd_module.data.prepare data/ --output-prefix out/corpus --workers 4

        Python::

            summary = prepare_data(["a.jsonl", "b.txt"], "out/corpus")
            summary["tokens"]
    """
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    Problems(positive_int_problems(workers=workers)).raise_if_any("prepare_data")
    tokenizer = tokenizer if tokenizer is not None else TokenizerConfig()
    files = collect_files(inputs)
    built = tokenizer.build()
    output_prefix = os.path.abspath(output_prefix)
    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    bin_path, idx_path = get_bin_path(output_prefix), get_idx_path(output_prefix)
    temporary_bin = f"{bin_path}.tmp-{os.getpid()}"
    temporary_idx = f"{idx_path}.tmp-{os.getpid()}"

    builder = IndexedDatasetBuilder(temporary_bin, dtype=DType.optimal_dtype(built.vocab_size))
    documents = tokens = 0
    pool = None
    try:
        texts = iter_documents(files, json_key)
        if workers == 1:
            _init_worker(tokenizer, append_eod)
            tokenized: Iterable[list[int]] = map(_tokenize, texts)
        else:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(tokenizer, append_eod)
            )
            tokenized = pool.imap(_tokenize, texts, chunksize=16)
        for ids in _progress(tokenized, f"tokenizing {len(files)} file(s)"):
            if not ids:
                continue
            builder.add_document(ids, [len(ids)])
            documents += 1
            tokens += len(ids)
        if documents == 0:
            raise ValueError(f"prepare_data: no documents with any tokens in {', '.join(files)}")
        builder.finalize(temporary_idx)
        os.replace(temporary_bin, bin_path)
        os.replace(temporary_idx, idx_path)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        builder.data_file.close()
        for path in (temporary_bin, temporary_idx):
            if os.path.exists(path):
                os.remove(path)

    summary = {
        "output_prefix": output_prefix,
        "bin_path": bin_path,
        "idx_path": idx_path,
        "files": len(files),
        "documents": documents,
        "tokens": tokens,
    }
    print(
        f"prepare_data: wrote {documents} documents, {tokens} tokens from {len(files)} file(s) "
        f"to {output_prefix}.{{bin,idx}}"
    )
    return summary


def prepare_data_cli(
    inputs: list[str],
    output_prefix: str,
    tokenizer_library: str = "byte",
    tokenizer_path: str | None = None,
    json_key: str = "text",
    workers: int = 2,
    append_eod: bool = True,
) -> dict[str, Any]:
    """:func:`prepare_data` with the tokenizer as plain arguments, for command lines.

    Args:
        inputs: ``.jsonl`` files, ``.txt`` or other text files, or directories of them.
        output_prefix: Writes ``<output_prefix>.bin`` and ``<output_prefix>.idx``.
        tokenizer_library: ``"byte"``, ``"huggingface"`` or ``"sentencepiece"``.
        tokenizer_path: HuggingFace tokenizer directory or SentencePiece ``.model`` file.
        json_key: Key of the text in each JSON line.
        workers: Tokenizing processes.
        append_eod: End each document with the end-of-document token.

    Returns:
        The summary of :func:`prepare_data`.

    Examples:
        CLI::

            nemo kd prepare-data inputs='["data/train.jsonl"]' output_prefix=data/train
            python -m kd_module.data.prepare data/train.jsonl --output-prefix data/train

        Python::

            prepare_data_cli(["data/train.jsonl"], "data/train", workers=4)
    """
    tokenizer = TokenizerConfig(library=tokenizer_library, path=tokenizer_path)
    return prepare_data(
        inputs,
        output_prefix,
        tokenizer=tokenizer,
        json_key=json_key,
        workers=workers,
        append_eod=append_eod,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line of :func:`prepare_data`."""
    parser = argparse.ArgumentParser(
        prog="python -m kd_module.data.prepare",
        description="Tokenize .jsonl/.txt files into a megatron .bin/.idx indexed dataset.",
    )
    parser.add_argument("inputs", nargs="+", help=".jsonl or .txt files, or directories of them")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument(
        "--tokenizer-library", default="byte", help=f"one of {', '.join(LIBRARIES)}"
    )
    parser.add_argument(
        "--tokenizer-path", default=None, help="HuggingFace directory or SentencePiece .model"
    )
    parser.add_argument("--json-key", default="text", help="key of the text in each JSON line")
    parser.add_argument("--workers", type=int, default=2, help="tokenizing processes")
    parser.add_argument(
        "--no-append-eod",
        dest="append_eod",
        action="store_false",
        help="do not end each document with the end-of-document token",
    )
    args = parser.parse_args(argv)
    try:
        return prepare_data_cli(**vars(args))
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
