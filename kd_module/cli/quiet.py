"""Known third-party notices that a command-line user did not cause, hidden unless asked for.

A ``nemo kd distill`` run printed a dozen lines from megatron-core, ModelOpt and Lightning that say
nothing about the user's run: fallbacks for packages a CPU machine cannot have, a version notice
of ModelOpt's about ``transformers``, a cloud-logging tip, and Lightning's advice about patterns
this project uses on purpose. Each one is listed here with the reason it is noise. Everything
else (the user's own configuration, real problems) still prints. ``-v`` / ``--verbose`` /
``--debug`` or ``KD_DEBUG=1`` shows them all (:func:`kd_module.cli.errors.debug_requested`).

Only entry points call :func:`quiet_third_party` (the ``nemo kd`` command); importing the
library changes no filter.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    """A third-party message that is noise for a user of this project."""

    pattern: str
    """Regular expression matched against the start of the message."""
    source: str
    """Who emits it (for a reader)."""
    why: str
    """Why hiding it hides nothing the user needs."""


KNOWN_WARNINGS = (
    Notice(
        r"Transformer Engine and Apex are not installed",
        "megatron-core (optimizer, FSDP mixed precision, clip_grads)",
        "the torch fallbacks are what a machine without TE/Apex runs; the README says when TE is "
        "used",
    ),
    Notice(
        r"Apex is not installed\. Falling back to Torch Norm",
        "megatron-core (layer specs)",
        "the local spec uses kd_module.models.norms, not Apex",
    ),
    Notice(
        r"transformers \S+ is not tested with current version of modelopt",
        "ModelOpt 0.47.0 (modelopt/torch/__init__.py)",
        "the tokenizers extra pins transformers to ModelOpt's tested range; this covers "
        "environments that bring another",
    ),
    Notice(
        r"full scope is deprecated",
        "megatron-core 0.16.1 TransformerConfig.__post_init__",
        "megatron's own default cuda_graph_scope; megatron-kd sets no CUDA graph option",
    ),
    Notice(
        r"You are using the `dataloader_iter` step flavor",
        "Lightning (configuration validator)",
        "the modules pull exactly one global batch of micro-batches per step, by design",
    ),
    Notice(
        r"Found `dataloader_iter` argument in the `(training|validation)_step`",
        "Lightning (loops)",
        "megatron's schedule consumes micro-batches from the iterator, by design",
    ),
    Notice(
        r"It is recommended to use `self\.log\('[a-z_]+', \.\.\., sync_dist=True\)`",
        "Lightning (logger connector)",
        "every logged metric is already reduced across data-parallel and pipeline ranks",
    ),
    Notice(
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "Lightning (fit loop)",
        "the frozen teacher is in eval mode on purpose",
    ),
)
"""Python warnings (any category) hidden on the command line."""

KNOWN_LOG_LINES = (
    (
        "lightning.pytorch.utilities.rank_zero",
        Notice(
            r"💡 Tip: For seamless cloud logging",
            "Lightning (logger connector)",
            "an advertisement for a hosted service",
        ),
    ),
    (
        "megatron.core.datasets.gpt_dataset",
        Notice(
            r"Unable to save MockGPTDataset indexes",
            "megatron-core (mock data)",
            "mock data is generated, not cached, on purpose",
        ),
    ),
)
"""``(logger name, notice)`` log records hidden on the command line."""


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.match(record.getMessage())


_installed = False


def quiet_third_party(verbose: bool | None = None) -> bool:
    """Hide :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_LINES` in this process (idempotent).

    Args:
        verbose: show everything; ``None`` asks
            :func:`kd_module.cli.errors.debug_requested` (``-v``, ``--debug``, ``KD_DEBUG=1``).

    Returns:
        Whether the filters are in place.
    """
    global _installed
    if verbose is None:
        from kd_module.cli.errors import debug_requested

        verbose = debug_requested()
    if verbose:
        return False
    if _installed:
        return True
    for notice in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=notice.pattern)
    for logger_name, notice in KNOWN_LOG_LINES:
        logging.getLogger(logger_name).addFilter(_DropMatching(notice.pattern))
    _installed = True
    return True
