"""LayerNorm and RMSNorm for megatron's local (non-Transformer-Engine) layer spec.

megatron's ``WrappedTorchNorm`` refuses sequence parallelism and zero-centered gamma (NeMo's
``layernorm1p``). These norms support both: with sequence parallelism their parameters carry
``sequence_parallel = True``, so megatron's ``finalize_model_grads`` all-reduces their gradients
across tensor-parallel ranks, as it does for Transformer Engine's norms. Parameter names
(``weight``, ``bias``) match TE's and torch's, so checkpoints move between specs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class _LocalNormBase(torch.nn.Module):
    def __init__(self, config: Any, hidden_size: int, eps: float, with_bias: bool) -> None:
        super().__init__()
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        self.eps = eps
        init = 0.0 if self.zero_centered_gamma else 1.0
        self.weight = torch.nn.Parameter(
            torch.full((hidden_size,), init, dtype=config.params_dtype)
        )
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if with_bias
            else None
        )
        for param in self.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)

    def gamma(self) -> torch.Tensor:
        return self.weight + 1 if self.zero_centered_gamma else self.weight

    def extra_repr(self) -> str:
        size = self.weight.shape[0]
        return f"{size}, eps={self.eps}, zero_centered_gamma={self.zero_centered_gamma}"


class LocalLayerNorm(_LocalNormBase):
    """LayerNorm (optionally zero-centered gamma, i.e. LayerNorm1p)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config, hidden_size, eps, with_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.gamma(), self.bias, self.eps)


class LocalRMSNorm(_LocalNormBase):
    """RMSNorm (optionally zero-centered gamma)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config, hidden_size, eps, with_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.gamma(), self.eps)
