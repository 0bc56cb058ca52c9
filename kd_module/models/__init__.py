"""megatron-core GPT models: the model config, layer specs (local / Transformer Engine / Mamba),
the implementation checks, and the build (:mod:`kd_module.models.gpt`); norms (:mod:`.norms`)."""
