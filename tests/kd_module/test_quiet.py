"""The command line hides known third-party notices, and only those, unless asked for."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, sys, warnings
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *a, **k: print("WARNING", message)
    from kd_module.cli.quiet import quiet_third_party
    print("installed", quiet_third_party(verbose=VERBOSE))
    warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch ...")
    warnings.warn("transformers 5.25.0 is not tested with current version of modelopt and may ...")
    warnings.warn("Found 43 module(s) in eval mode at the start of training. This may lead ...")
    warnings.warn("precision='bf16' needs accelerator='gpu'")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info(
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    logging.getLogger("megatron.core.datasets.gpt_dataset").warning(
        "Unable to save MockGPTDataset indexes because path_to_cache is None")
    """
)


def _run(verbose: bool) -> str:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("VERBOSE", repr(verbose))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_known_notices_are_hidden_and_everything_else_shows():
    """Known notices (TE/Apex fallbacks, ModelOpt's transformers notice, Lightning's eval-mode
    advice and cloud tip, megatron's mock-data index line) are dropped; others still print."""
    out = _run(verbose=False)
    assert "installed True" in out
    for hidden in ("Apex", "modelopt", "eval mode", "Tip", "MockGPTDataset"):
        assert hidden not in out, hidden
    assert "WARNING precision='bf16' needs accelerator='gpu'" in out
    assert "GPU available: False" in out


def test_verbose_shows_every_notice():
    """-v / --debug / KD_DEBUG=1 (verbose) leaves every filter off."""
    out = _run(verbose=True)
    assert "installed False" in out
    for shown in ("Apex", "modelopt", "eval mode", "Tip", "MockGPTDataset", "GPU available"):
        assert shown in out, shown
