"""A 2-rank DP=2 distillation run for the fault tests.

Launched with ``python -m torch.distributed.run --nproc_per_node=2 -m
tests.reliability.fault_job --log-dir D --name N [--kill-rank R --kill-at-step S] [--resume]``,
or as two nodes of one rank each (two ``torchrun --nnodes 2 --nproc-per-node 1`` agents,
``--nodes 2``). Rank 0 appends ``{"step": n, "kd_loss": x}`` per step to
``<run_dir>/losses.jsonl``. With ``--kill-rank`` that rank kills itself with SIGKILL at the start
of step ``S``, inside the step its peer is already running; ``--kill-node`` kills its whole node
instead (the torchrun agent's process group, then itself), and ``--kill-in-save`` moves the kill
to the checkpoint save after step ``S``: once this rank has written its shards, before the
checkpoint is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--name", default="run")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-node", action="store_true")
    parser.add_argument("--kill-in-save", action="store_true")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    import lightning as L

    from kd_module.api import distill
    from kd_module.data import GPTDataModule
    from kd_module.models.gpt import GPTModelConfig
    from kd_module.specs import RunConfig, TeacherSpec
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy

    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.log_dir) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    losses = run_dir / "losses.jsonl"

    def die() -> None:
        if args.kill_node:  # the agent (its own session, as on another machine) and its worker
            os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    if args.kill_in_save and rank == args.kill_rank:
        from megatron.core import dist_checkpointing

        save = dist_checkpointing.save

        def save_then_die(state, directory, *rest, **kwargs):
            result = save(state, directory, *rest, **kwargs)
            if f"step={args.kill_at_step}" in str(directory):
                die()
            return result

        dist_checkpointing.save = save_then_die

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *rest):
            step = trainer.global_step + 1
            if rank == args.kill_rank and step == args.kill_at_step and not args.kill_in_save:
                die()

        def on_train_batch_end(self, trainer, pl_module, *rest):
            if rank == 0:
                record = {"step": trainer.global_step, **pl_module.last_train_metrics}
                with losses.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")

    student = GPTModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, vocab_size=512
    )
    data = GPTDataModule(
        mock=True,
        seq_length=32,
        micro_batch_size=1,
        global_batch_size=4,
        num_train_samples=args.steps * 4,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 // args.nodes,
        num_nodes=args.nodes,
        strategy=MegatronStrategy(seed=7, timeout_minutes=1),
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    distill(
        student,
        data,
        trainer,
        teacher=TeacherSpec(config=student.replace(num_layers=3, hidden_size=48)),
        job=RunConfig(
            log_dir=args.log_dir,
            name=args.name,
            checkpoint_every_n_steps=args.every,
            keep_last=2,
            resume=args.resume,
            export=False,
        ),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
    )


if __name__ == "__main__":
    main()
