"""megatron-kd: knowledge distillation of LLMs on megatron-core and NVIDIA ModelOpt.

Importing this package is cheap: megatron-core, ModelOpt and Lightning are imported only
when a name that needs them is first used (``kd_module.MegatronStrategy`` etc.).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "distill": "kd_module.api",
    "DistillationModule": "kd_module.module",
    "MegatronStrategy": "kd_module.strategy",
    "GPTModelConfig": "kd_module.models",
    "ParallelLayout": "kd_module.models",
    "DistillConfig": "kd_module.distill_config",
    "load_distill_config": "kd_module.distill_config",
    "TeacherModelConfig": "kd_module.teacher_config",
    "load_teacher_model_config": "kd_module.teacher_config",
    "to_nemo_model_config": "kd_module.teacher_config",
    "OptimizerConfig": "kd_module.optim",
    "GPTDataModule": "kd_module.data.datamodule",
    "TokenizerConfig": "kd_module.data.tokenizers",
    "prepare_data": "kd_module.data.prepare",
    "embedded_corpus": "kd_module.data.corpus",
    "LogitsKDLoss": "kd_module.losses",
    "initialize_distributed": "kd_module.runtime",
    "destroy_distributed": "kd_module.runtime",
    "export_student": "kd_module.checkpoint",
    "load_model_checkpoint": "kd_module.checkpoint",
    "save_model_checkpoint": "kd_module.checkpoint",
    "GPTModule": "kd_module.module",
    "RunCheckpoint": "kd_module.run_checkpoint",
    "local_executor": "kd_module.launch",
    "slurm_executor": "kd_module.launch",
    "KDLogitsCriterion": "kd_module.losses",
    "reference_logits_kd_loss": "kd_module.losses",
    "build_teacher_cache": "kd_module.api",
    "OfflineDistillationModule": "kd_module.offline_module",
    "TeacherCache": "kd_module.offline",
    "cache_teacher": "kd_module.offline",
    "offline_topk_kd_loss": "kd_module.offline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kd_module' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
