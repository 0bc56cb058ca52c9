"""The HF conversions as commands: ``nemo kd export-hf``, ``nemo kd import-hf`` and
``python -m kd_module.hf {export,import}``.

Importing this module is cheap (no megatron, Lightning or ModelOpt), so the ``nemo`` command's
``--help`` stays fast; the conversions import them when they run.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from kd_module.cli.errors import cli_errors
from kd_module.guards import USER_ERRORS


@cli_errors
def export_hf_command(
    checkpoint: str,
    output: str,
    architecture: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
) -> str:
    """Write a megatron-kd checkpoint (a distilled student) as a Hugging Face model directory.

    Args:
        checkpoint: a checkpoint with its ``model_config.yaml`` (``<run>/student``), saved at
            any TP/PP layout.
        output: the HF directory to write (replaced only once the new one is complete).
        architecture: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``Qwen3ForCausalLM`` (default: from the model's features).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (default: the checkpoint's precision).
        tokenizer_dir: HF tokenizer to copy in (default: the one ``model_config.yaml`` names).

    Returns:
        The output directory.

    Examples:
        ``nemo kd export-hf checkpoint=runs/exp1/student output=/models/student-hf``
    """
    from kd_module.hf.exporter import export_hf

    return os.fspath(export_hf(checkpoint, output, architecture, dtype, tokenizer_dir))


@cli_errors
def import_hf_command(
    hf_dir: str, output: str, seq_length: int | None = None, dtype: str | None = None
) -> str:
    """Convert a Hugging Face model directory once into a ``torch_dist`` checkpoint with its
    ``model_config.yaml`` (teachers and students also load HF directories directly).

    Args:
        hf_dir: local HF model directory (``config.json``, safetensors or ``.bin`` weights).
        output: the checkpoint directory to write.
        seq_length: recorded in ``model_config.yaml`` (default: ``max_position_embeddings``,
            capped at 4096).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (default: ``config.json``'s).

    Returns:
        The checkpoint directory.

    Examples:
        ``nemo kd import-hf hf_dir=/models/Qwen3-8B output=/ckpt/qwen3-8b``
    """
    from kd_module.hf.importer import import_hf

    return os.fspath(import_hf(hf_dir, output, seq_length, dtype))


def main(argv: list[str] | None = None) -> Any:
    """``python -m kd_module.hf export CHECKPOINT OUTPUT`` / ``import HF_DIR OUTPUT``."""
    parser = argparse.ArgumentParser(
        prog="python -m kd_module.hf", description="Hugging Face checkpoints in and out."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="megatron-kd checkpoint -> HF directory")
    export.add_argument("checkpoint")
    export.add_argument("output")
    export.add_argument("--architecture", default=None)
    export.add_argument("--dtype", default=None)
    export.add_argument("--tokenizer-dir", default=None)
    convert = commands.add_parser("import", help="HF directory -> torch_dist checkpoint")
    convert.add_argument("hf_dir")
    convert.add_argument("output")
    convert.add_argument("--seq-length", type=int, default=None)
    convert.add_argument("--dtype", default=None)
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    try:
        if command == "export":
            return export_hf_command(**args)
        return import_hf_command(**args)
    except USER_ERRORS as error:
        parser.exit(2, f"error: {error}\n")
