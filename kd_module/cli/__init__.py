"""What the ``nemo kd`` command line needs besides nemo-run: known third-party notices kept quiet
(:mod:`.quiet`). Importing it loads neither Lightning, megatron nor ModelOpt."""
