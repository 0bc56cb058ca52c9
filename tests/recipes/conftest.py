"""Shared fixtures of the recipe tests: a tiny saved teacher matching the ``tiny_cpu`` student."""

from __future__ import annotations

import pytest

from kd_module.models.gpt import GPTModelConfig

SEQ_LENGTH = 128
"""The ``tiny_cpu`` recipe's sequence length."""
TINY_TEACHER = GPTModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    seq_length=SEQ_LENGTH,
    make_vocab_size_divisible_by=64,
)
"""A teacher small enough for CLI and launcher tests (random weights: nothing is trained)."""


def save_tiny_teacher(path: str, ckpt_format: str = "torch") -> str:
    """Build :data:`TINY_TEACHER` on one in-process rank and save it (``torch``: one file that
    loads at its own layout; ``torch_dist``: loads at any tensor-parallel size)."""
    from kd_module.checkpoints.model import save_model_checkpoint
    from kd_module.data.tokenizers import TokenizerConfig, padded_vocab_size
    from kd_module.models.gpt import build_model
    from kd_module.parallel import runtime
    from tests.helpers import init_weights_by_global_key

    vocab = padded_vocab_size(TokenizerConfig().build().vocab_size, 64)
    config = TINY_TEACHER.replace(vocab_size=vocab)
    runtime.initialize_distributed(seed=5)
    try:
        model = build_model(config)
        init_weights_by_global_key(model, seed=5, std=0.3)
        save_model_checkpoint(
            model, path, ckpt_format=ckpt_format, model_config=config, tokenizer={"library": "byte"}
        )
    finally:
        runtime.destroy_distributed()
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a saved tiny teacher (torch format, with ``model_config.yaml``)."""
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "checkpoint"))


@pytest.fixture(scope="session")
def tiny_teacher_dist(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny teacher as a ``torch_dist`` checkpoint (for tensor-parallel runs)."""
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "dist"), "torch_dist")
