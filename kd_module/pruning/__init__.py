"""Students pruned from their teacher (Minitron), before distillation.

- :mod:`kd_module.pruning.minitron`: the target architecture and its checks, parameter counts,
  activation importance from calibration batches, and the pruned model's weights.
- :mod:`kd_module.pruning.job`: :func:`~kd_module.pruning.job.prune`, the task behind
  ``nemo kd prune``.
"""
