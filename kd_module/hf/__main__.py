"""``python -m kd_module.hf export CHECKPOINT OUTPUT`` and ``import HF_DIR OUTPUT``."""

from kd_module.hf.commands import main

if __name__ == "__main__":
    main()
