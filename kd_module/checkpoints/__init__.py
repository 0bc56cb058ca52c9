"""Checkpoints: model weights in megatron's distributed format (:mod:`.model`), whole-run
checkpoints for resume (:mod:`.run`) and atomic file writes (:mod:`.atomic`)."""
