"""Distillation proper: the YAML config (:mod:`.config`), the ModelOpt ``DistillationModel`` build
(:mod:`.model`), the KD losses (:mod:`.losses`) and the training objectives (:mod:`.objectives`)."""
