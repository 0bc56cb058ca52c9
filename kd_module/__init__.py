"""megatron-kd: knowledge distillation of LLMs on megatron-core and NVIDIA ModelOpt.

Importing this package is cheap: megatron-core, ModelOpt and Lightning are imported only
when a name that needs them is first used (``kd_module.MegatronStrategy`` etc.).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__version__ = "0.1.0"

# The stable names: what a recipe, a notebook or the README needs. Everything else lives in the
# subpackage that owns it (see ARCHITECTURE.md): kd_module.models, .distillation, .offline, ...
_EXPORTS = {
    "distill": "kd_module.api",
    "build_teacher_cache": "kd_module.offline.job",
    "prune": "kd_module.pruning.job",
    "DistillationModule": "kd_module.training.module",
    "MegatronStrategy": "kd_module.training.strategy",
    "OptimizerConfig": "kd_module.training.optim",
    "GPTModelConfig": "kd_module.models.gpt",
    "ParallelLayout": "kd_module.models.gpt",
    "DistillConfig": "kd_module.distillation.config",
    "load_distill_config": "kd_module.distillation.config",
    "LogitsKDLoss": "kd_module.distillation.losses",
    "GPTDataModule": "kd_module.data.datamodule",
}

# Names this package exported before the re-layout (2026-12): still resolved, with a
# DeprecationWarning that gives their home.
_MOVED = {
    "TeacherModelConfig": "kd_module.nemo_format.reader",
    "load_teacher_model_config": "kd_module.nemo_format.discovery",
    "to_nemo_model_config": "kd_module.nemo_format.writer",
    "TokenizerConfig": "kd_module.data.tokenizers",
    "prepare_data": "kd_module.data.prepare",
    "embedded_corpus": "kd_module.data.corpus",
    "initialize_distributed": "kd_module.parallel.runtime",
    "destroy_distributed": "kd_module.parallel.runtime",
    "export_student": "kd_module.checkpoints.model",
    "load_model_checkpoint": "kd_module.checkpoints.model",
    "save_model_checkpoint": "kd_module.checkpoints.model",
    "GPTModule": "kd_module.training.module",
    "RunCheckpoint": "kd_module.checkpoints.run",
    "local_executor": "kd_module.launch",
    "slurm_executor": "kd_module.launch",
    "KDLogitsCriterion": "kd_module.distillation.losses",
    "reference_logits_kd_loss": "kd_module.distillation.losses",
    "OfflineDistillationModule": "kd_module.offline.module",
    "TeacherCache": "kd_module.offline.reader",
    "cache_teacher": "kd_module.offline.writer",
    "offline_topk_kd_loss": "kd_module.offline.loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MOVED:
        warnings.warn(
            f"kd_module.{name} moved: import it from {_MOVED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'kd_module' has no attribute {name!r}")
