"""Input rules shared by the entry points (``distill``, ``build_teacher_cache``, the recipes,
the configs and the callbacks).

:class:`Problems` collects every problem of one call, each a message naming the key, the bad
value and what is allowed, and raises them together, before any expensive work. The functions
below return the problems they find as lists of such messages. This module imports neither
torch nor Lightning, so the light CLI can check arguments without them.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from typing import Any


def close_matches(name: Any, choices: Iterable[Any], n: int = 3) -> str:
    """A ``" (did you mean 'x'?)"`` hint, or an empty string when nothing is close."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


def is_positive_int(value: Any) -> bool:
    """An ``int`` (not a ``bool``) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class Problems(list[str]):
    """Every problem of one call, collected so that they are reported together.

    A list of messages (so ``problems += other_check()`` works), with one method per shared
    rule, each of which records a message in the same words wherever the rule applies.

    Examples:
        >>> problems = Problems()
        >>> problems.positive_int("devices", 0)
        False
        >>> problems.one_of("precision", "bf61", ("fp32", "bf16"))
        False
        >>> problems[1]
        "precision='bf61' is not one of fp32, bf16 (did you mean 'bf16'?)"
        >>> problems.raise_if_any("trainer")
        Traceback (most recent call last):
        ValueError: trainer: devices=0 must be a positive integer; precision='bf61' is not ...
    """

    def add(self, message: str) -> None:
        """Record one problem."""
        self.append(message)

    def positive_int(self, name: str, value: Any, hint: str = "", or_none: str = "") -> bool:
        """Whether ``value`` is an ``int`` >= 1 (never a ``bool``); records a problem if not.

        Args:
            name: the key as the user spells it.
            value: the value given.
            hint: text appended to the message (``" (or set data.num_train_samples)"``).
            or_none: how the caller spells "no value" (``"None"``, ``"null"``); when set,
                ``None`` is accepted too and the message says so.
        """
        if (or_none and value is None) or is_positive_int(value):
            return True
        allowed = f" or {or_none}" if or_none else ""
        self.add(f"{name}={value!r} must be a positive integer{allowed}{hint}")
        return False

    def int_at_least(self, name: str, value: Any, minimum: int, hint: str = "") -> bool:
        """Whether ``value`` is an ``int`` (never a ``bool``) >= ``minimum``."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return True
        self.add(f"{name}={value!r} must be an integer >= {minimum}{hint}")
        return False

    def positive_number(self, name: str, value: Any) -> bool:
        """Whether ``value`` is an ``int`` or ``float`` (never a ``bool``) > 0."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return True
        self.add(f"{name}={value!r} must be a number > 0")
        return False

    def one_of(self, name: str, value: Any, allowed: Iterable[Any]) -> bool:
        """Whether ``value`` is in ``allowed``; the message suggests close spellings."""
        allowed = tuple(allowed)
        if value in allowed:
            return True
        hint = close_matches(value, allowed) if isinstance(value, str) else ""
        self.add(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}{hint}")
        return False

    def raise_if_any(self, prefix: str) -> None:
        """Raise ``ValueError("PREFIX: first; second; ...")`` when any problem was recorded."""
        if self:
            raise ValueError(f"{prefix}: " + "; ".join(self))


def positive_int_problems(**values: Any) -> list[str]:
    """``"NAME=VALUE must be a positive integer"`` for each value that is not one (nor a bool)."""
    problems = Problems()
    for name, value in values.items():
        problems.positive_int(name, value)
    return list(problems)


def tokenizer_problems(
    data_tokenizer: Any, teacher_tokenizer: dict[str, Any], data_vocab_size: int | None = None
) -> list[str]:
    """The teacher's NeMo ``tokenizer:`` section against the data's tokenizer.

    The libraries must agree, and when the section gives the teacher tokenizer's ``vocab_size``
    it must be the data tokenizer's (``data_vocab_size``): embedding tables may be padded
    differently, the tokenizers themselves must be one.
    """
    if not teacher_tokenizer:
        return []
    library = str(teacher_tokenizer.get("library") or "").lower() or None
    aliases = {"hf": "huggingface", "megatron": "huggingface", "byte-level": "byte"}
    library = aliases.get(library, library)
    if library and library != data_tokenizer.library:
        return [
            f"tokenizer: the teacher's model_config.yaml uses library={library!r} but the data "
            f"uses library={data_tokenizer.library!r}; teacher and student must share a tokenizer"
        ]
    teacher_size = teacher_tokenizer.get("vocab_size")
    if (
        data_vocab_size is not None
        and isinstance(teacher_size, int)
        and not isinstance(teacher_size, bool)
    ):
        if teacher_size != data_vocab_size:
            teacher_name = (
                teacher_tokenizer.get("type")
                or teacher_tokenizer.get("model")
                or teacher_tokenizer.get("library")
                or "?"
            )
            data_name = data_tokenizer.path or data_tokenizer.library
            return [
                f"tokenizer: the teacher's tokenizer {teacher_name!s} has vocab_size="
                f"{teacher_size} but the data's tokenizer {data_name!s} has vocab_size="
                f"{data_vocab_size}; teacher and student must share a tokenizer (only the "
                "padding of their embedding tables may differ)"
            ]
    return []


def checkpoint_problems(label: str, path: str | None, requested: str) -> list[str]:
    """The checkpoint at ``path`` exists and holds the requested format."""
    if path is None:
        return []
    from kd_module.checkpoints.model import detect_checkpoint_format, resolve_checkpoint_dir

    try:
        found = detect_checkpoint_format(resolve_checkpoint_dir(path))
    except (ValueError, FileNotFoundError) as error:
        return [f"{label}: {error}"]
    from kd_module.specs import CKPT_FORMATS

    if requested not in CKPT_FORMATS:
        return [f"{label}: ckpt_format={requested!r} is not one of {', '.join(CKPT_FORMATS)}"]
    if requested not in ("auto", found):
        return [
            f"{label}: ckpt_format={requested!r} was requested but {path} holds a "
            f"{found} checkpoint; use 'auto' or {found!r}"
        ]
    return []


def launch_problems(num_nodes: Any, devices: Any) -> list[str]:
    """``num_nodes x devices`` against the ranks this process was launched with."""
    problems = positive_int_problems(num_nodes=num_nodes, devices=devices)
    if problems:
        return problems
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if num_nodes * devices != world_size:
        how = (
            "this process was not launched with torchrun; run the recipe with "
            f"kd_module.launch.local_executor(devices={devices})"
            if "WORLD_SIZE" not in os.environ
            else f"the launch has {world_size} ranks"
        )
        return [f"num_nodes x devices = {num_nodes * devices} ranks are expected but {how}"]
    return []


# ---------------------------------------------------------------------- output directories
def writable_dir_problems(path: str | os.PathLike[str], what: str) -> list[str]:
    """Why ``path`` cannot be created or written (empty when it can), without creating it.

    The nearest existing ancestor must be a writable directory: a regular file on the way (or at
    ``path``) or a read-only directory is reported with ``what`` and the offending path.
    """
    target = os.path.abspath(os.fspath(path))
    current = target
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if not os.path.isdir(current):
        return [f"{what} {target}: cannot be created, {current} is a file; give a directory path"]
    if not os.access(current, os.W_OK | os.X_OK):
        return [f"{what} {target}: {current} is not writable; give a writable directory"]
    return []
