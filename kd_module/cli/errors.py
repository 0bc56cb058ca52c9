"""One-line errors on the command line: :func:`friendly_errors` turns a configuration error into one
line on stderr and exit code 2; ``KD_DEBUG=1`` (or ``--debug`` / ``-v`` / ``--verbose`` on the
command line) keeps the traceback. :func:`cli_errors` wraps the task functions (``distill``,
``build_teacher_cache``) so that they behave so when ``nemo kd`` runs them."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from kd_module.guards import USER_ERRORS

DEBUG_ENV = "KD_DEBUG"
"""Environment variable that keeps full tracebacks (``KD_DEBUG=1``)."""


DEBUG_FLAGS = ("--debug", "-v", "--verbose")
"""Command-line flags that keep full tracebacks."""


EXIT_CODE = 2
"""Exit status of a run refused for a configuration problem."""


CLI_ENV = "KD_CLI"
"""Environment variable marking a command-line process (``KD_CLI=1``)."""


CLI_PROGRAMS = ("nemo",)
"""Programs (``sys.argv[0]`` names) that are the command line."""


# ---------------------------------------------------------------------- command line
def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """Whether ``KD_DEBUG`` is set to a true value or the command line asks for tracebacks."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    argv = sys.argv[1:] if argv is None else argv
    return any(arg in DEBUG_FLAGS for arg in argv)


def cli_mode() -> bool:
    """Whether this process is the ``nemo`` command (or ``KD_CLI=1`` says it is a CLI)."""
    if os.environ.get(CLI_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return os.path.basename(sys.argv[0] if sys.argv else "") in CLI_PROGRAMS


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: :class:`friendly_errors` around ``fn`` when :func:`cli_mode`, else nothing.

    Python callers keep the exception; ``nemo kd distill`` prints one line and exits 2 instead
    of nemo-run's generic ``Unexpected error`` (exit 1). The wrapper keeps ``fn``'s name,
    signature and annotations, so nemo-run's factories and overrides see ``fn`` itself.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not cli_mode():
            return fn(*args, **kwargs)
        with friendly_errors():
            return fn(*args, **kwargs)

    return wrapper


class friendly_errors(contextlib.ContextDecorator):  # noqa: N801  (used like a function)
    """Context manager / decorator: a user error becomes one line on stderr and exit code 2.

    Errors in :data:`USER_ERRORS` are printed as ``error: <message>`` (one line) and the
    process exits with :data:`EXIT_CODE`. With ``debug`` (default: :func:`debug_requested`)
    the traceback is printed too and the error propagates unchanged. Other exceptions (bugs)
    always propagate with their traceback.

    Args:
        debug: keep tracebacks; ``None`` reads ``KD_DEBUG`` and the command line.
        stream: where the line goes (default ``sys.stderr``).

    Examples:
        >>> @friendly_errors()
        ... def main(): ...
    """

    def __init__(self, debug: bool | None = None, stream: Any = None) -> None:
        self.debug = debug
        self.stream = stream

    def __enter__(self) -> friendly_errors:
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> bool:
        if error is None or not isinstance(error, USER_ERRORS):
            return False
        stream = self.stream or sys.stderr
        debug = debug_requested() if self.debug is None else self.debug
        if debug:
            traceback.print_exception(kind, error, tb, file=stream)
            return False
        line = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {line}", file=stream, flush=True)
        raise SystemExit(EXIT_CODE) from None
