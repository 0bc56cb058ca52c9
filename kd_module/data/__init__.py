"""Data for distillation: tokenizers, prepared megatron datasets, the data module, a default corpus.

Names are imported on first use, so ``import kd_module.data`` loads neither torch, Lightning nor
megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TokenizerConfig": "kd_module.data.tokenizers",
    "check_same_tokenizer": "kd_module.data.tokenizers",
    "padded_vocab_size": "kd_module.data.tokenizers",
    "prepare_data": "kd_module.data.prepare",
    "MegatronPretrainingSampler": "kd_module.data.sampler",
    "GPTDataModule": "kd_module.data.datamodule",
    "check_seq_length": "kd_module.data.datamodule",
    "embedded_corpus": "kd_module.data.corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kd_module.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
