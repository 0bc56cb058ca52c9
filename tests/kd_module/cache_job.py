"""A teacher-cache run for the interruption test: ``python -m tests.kd_module.cache_job OUT``.

With ``--kill-after-shards N`` it SIGKILLs itself right after the N-th shard is marked complete
(while the next shard's files are already open), as a preempted job would die.
"""

from __future__ import annotations

import argparse
import os
import signal


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--kill-after-shards", type=int)
    args = parser.parse_args()

    from kd_module.data import GPTDataModule
    from kd_module.models.gpt import GPTModelConfig
    from kd_module.offline import writer as offline
    from kd_module.offline.job import build_teacher_cache
    from tests.helpers import init_weights_by_global_key

    if args.kill_after_shards is not None:
        real_write = offline.write_json_atomic
        done = {"n": 0}

        def write_then_die(path, payload):
            real_write(path, payload)
            if path.name.endswith(".done"):
                done["n"] += 1
                if done["n"] == args.kill_after_shards:
                    os.kill(os.getpid(), signal.SIGKILL)

        offline.write_json_atomic = write_then_die

    teacher = GPTModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, vocab_size=512
    )
    data = GPTDataModule(
        mock=True, seq_length=32, micro_batch_size=2, global_batch_size=2, num_train_samples=20
    )
    build_teacher_cache(
        data,
        args.out_dir,
        teacher=teacher,
        k=8,
        dtype="bf16",
        shard_size=6,
        accelerator="cpu",
        precision="fp32",
        teacher_init_fn=lambda model: init_weights_by_global_key(model, seed=4, std=0.3),
    )


if __name__ == "__main__":
    main()
