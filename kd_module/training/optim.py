"""Optimizer config and megatron-core's optimizer behind Lightning's optimizer interface.

megatron's ``MegatronOptimizer`` (mixed precision, gradient clipping, optional distributed
optimizer) is not a ``torch.optim.Optimizer``. :class:`MegatronOptimizerAdapter` presents it as
one, so Lightning counts steps, logs the learning rate and calls hooks as usual, while the step
itself (unscale, clip, update) is megatron's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kd_module.rules import Problems

LR_DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass
class OptimizerConfig:
    """Adam with weight decay, gradient clipping and a warmup + decay learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW); not applied to biases and norms."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.95
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to ``lr``."""
    decay_steps: int | None = None
    """Steps over which the rate decays to ``min_lr``; ``None`` means ``trainer.max_steps``."""
    lr_decay_style: str = "cosine"
    """``cosine``, ``linear`` or ``constant``."""

    def __post_init__(self) -> None:
        problems = Problems()
        for name in ("lr", "adam_eps"):
            problems.positive_number(name, getattr(self, name))
        for name in ("min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"{name}={value!r} must be a number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                problems.append(f"{name}={value!r} must be a number in [0, 1)")
        problems.int_at_least("warmup_steps", self.warmup_steps, 0)
        problems.positive_int("decay_steps", self.decay_steps, or_none="null")
        problems.one_of("lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        if (
            not problems
            and isinstance(self.min_lr, (int, float))
            and isinstance(self.lr, (int, float))
            and self.min_lr > self.lr
        ):
            problems.append(f"min_lr={self.min_lr} is larger than lr={self.lr}")
        problems.raise_if_any("optimizer config")


def build_megatron_optimizer(
    config: OptimizerConfig,
    model: Any,
    use_distributed_optimizer: bool = False,
    params_dtype: Any = torch.float32,
) -> Any:
    """megatron-core's optimizer (``get_megatron_optimizer``) for a DDP-wrapped model chunk.

    megatron's gloo process groups exist only for CPU runs (see
    :func:`kd_module.parallel.runtime.initialize_distributed`); the optimizer is told so, as it
    would
    otherwise ask for groups a CUDA run never created.
    """
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    from kd_module.parallel import runtime

    megatron_config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=config.lr,
        min_lr=config.min_lr,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_eps=config.adam_eps,
        clip_grad=config.clip_grad,
        use_distributed_optimizer=use_distributed_optimizer,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
    )
    return get_megatron_optimizer(
        megatron_config, [model], use_gloo_process_groups=runtime.gloo_process_groups()
    )


def build_lr_scheduler(config: OptimizerConfig, optimizer: Any, max_steps: int) -> Any:
    """megatron's ``OptimizerParamScheduler``: linear warmup, then decay to ``min_lr``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = config.decay_steps or max(max_steps, config.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if config.warmup_steps else config.lr,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=config.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=config.lr_decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


class MegatronOptimizerAdapter(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` face on megatron's optimizer, for Lightning.

    ``step()`` runs megatron's step (unscale, clip, update) and keeps its results in
    ``last_step`` (``update_successful``, ``grad_norm``, ``num_zeros_in_grad``).
    """

    def __init__(self, megatron_optimizer: Any) -> None:
        self.megatron_optimizer = megatron_optimizer
        self.last_step: dict[str, Any] = {}
        # torch.optim.Optimizer.__init__ would re-register parameters; share megatron's groups.
        self.defaults = {}
        self.state = megatron_optimizer.state
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.megatron_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.megatron_optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        update_successful, grad_norm, num_zeros = self.megatron_optimizer.step()
        self.last_step = {
            "update_successful": update_successful,
            "grad_norm": grad_norm,
            "num_zeros_in_grad": num_zeros,
        }
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.megatron_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.megatron_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"MegatronOptimizerAdapter({type(self.megatron_optimizer).__name__})"
