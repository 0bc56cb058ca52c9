"""NeMo's ``model_config.yaml``: the key tables, the reader, checkpoint discovery and the writer.

Teachers and students both come from (and go back to) this format; see
:mod:`kd_module.nemo_format.model_config`.
"""
