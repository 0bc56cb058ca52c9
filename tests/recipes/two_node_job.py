"""One node's rank of a two-node ``tiny_cpu`` run (started by ``torchrun --nnodes 2``).

``python tests/recipes/two_node_job.py TEACHER LOG_DIR NAME`` under torchrun: the recipe of
``tests/recipes/test_launch.py``'s DP runs with ``num_nodes=2`` and one device per node.
"""

from __future__ import annotations

import sys


def main(teacher: str, log_dir: str, name: str) -> None:
    import fiddle as fdl

    from recipes.tiny_cpu import tiny_cpu

    config = tiny_cpu(
        teacher_path=teacher,
        mock_data=True,
        num_gpus_per_node=1,
        max_steps=3,
        micro_batch_size=4,
        global_batch_size=8,
        dir=log_dir,
        name=name,
    )
    config.trainer.num_nodes = 2
    config.trainer.log_every_n_steps = 1
    config.trainer.enable_progress_bar = False
    config.trainer.enable_model_summary = False
    fdl.build(config)()


if __name__ == "__main__":
    main(*sys.argv[1:4])
