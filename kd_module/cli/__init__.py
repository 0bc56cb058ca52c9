"""What the ``nemo kd`` command line needs besides nemo-run: one-line errors (:mod:`.errors`) and
known third-party notices kept quiet (:mod:`.quiet`). Importing it loads neither torch,
Lightning, megatron nor ModelOpt."""
