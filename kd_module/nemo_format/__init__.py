"""NeMo's ``model_config.yaml``: the key tables (:mod:`.keys`), the reader (:mod:`.reader`),
checkpoint discovery (:mod:`.discovery`) and the writer (:mod:`.writer`). Teachers and students
both come from, and go back to, this format."""
