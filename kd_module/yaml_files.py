"""Reading YAML files: ``yaml.safe_load`` with errors that name the file and the line.

The distill config, a teacher's ``model_config.yaml`` (plain or inside a ``.nemo`` archive) and
the other YAML inputs are read through :func:`read_yaml` or :func:`parse_yaml`, so a typo in
any of them is reported the same way: ``distill config kd.yaml: not valid YAML at line 3,
column 7: mapping values are not allowed here``.
"""

from __future__ import annotations

import os
from typing import IO, Any

import yaml


def parse_yaml(stream: str | bytes | IO[Any], where: str) -> Any:
    """Parse YAML text or an open stream with ``yaml.safe_load``.

    Args:
        stream: the YAML text, or a file object opened for reading.
        where: what and where the text is, put first in an error (``"distill config kd.yaml"``).

    Returns:
        The parsed value (``None`` for an empty document).

    Raises:
        ValueError: for a syntax error, naming ``where`` and, when YAML gives it, the line and
            column.
    """
    try:
        return yaml.safe_load(stream)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{where}: not valid YAML{line}: {problem}") from None


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """Read and parse the YAML file at ``path``.

    Args:
        path: the file.
        what: what the file is, put first in an error (``"distill config"``).

    Returns:
        The parsed value (``None`` for an empty file).

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: for a syntax error, as :func:`parse_yaml`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        return parse_yaml(handle, f"{what} {path}")
