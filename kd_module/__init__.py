"""megatron-kd: knowledge distillation of LLMs on megatron-core and NVIDIA ModelOpt.

Importing this package is cheap: megatron-core, ModelOpt and Lightning are imported only
when a name that needs them is first used.
"""

from __future__ import annotations

__version__ = "0.1.0"
