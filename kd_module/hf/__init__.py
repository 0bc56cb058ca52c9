"""Hugging Face checkpoints in and out.

- :mod:`kd_module.hf.config`: ``config.json`` <-> :class:`~kd_module.models.gpt.GPTModelConfig`
  for the supported architectures, and the checks made before any weights are read (light: no
  torch import).
- :mod:`kd_module.hf.weights`: the weight files of an HF directory (safetensors, sharded or not,
  or ``pytorch_model*.bin``), their tensor names and shapes, read from headers only.
- :mod:`kd_module.hf.importer`: HF weights into a megatron GPT stage at any TP/PP layout, through
  ModelOpt's importer (each rank reads only its slices, tensor by tensor).
- :mod:`kd_module.hf.exporter`: a megatron student checkpoint back to an HF directory.
"""
