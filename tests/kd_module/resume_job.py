"""A small distillation run for the resume tests: ``python -m tests.kd_module.resume_job ...``.

It appends ``{"step": n, "kd_loss": x}`` per step to ``<run_dir>/losses.jsonl`` and can kill itself
with SIGKILL after a given step or during a given checkpoint save.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path


def job_models_and_data(steps: int = 8):
    """The job's student and teacher architectures and its data module."""
    from kd_module.data import GPTDataModule
    from kd_module.models.gpt import GPTModelConfig

    student = GPTModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, vocab_size=512
    )
    teacher = student.replace(num_layers=3, hidden_size=48)
    data = GPTDataModule(
        mock=True,
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=4,
        num_train_samples=steps * 4,
    )
    return student, teacher, data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--name", default="run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-during-save", type=int, help="SIGKILL inside the N-th save")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--teacher-cache", help="distill offline from this cache (no teacher)")
    args = parser.parse_args()

    import lightning as L

    from kd_module.api import distill
    from kd_module.training.optim import OptimizerConfig
    from kd_module.training.strategy import MegatronStrategy

    run_dir = Path(args.log_dir) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    losses = run_dir / "losses.jsonl"

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *rest):
            with losses.open("a") as handle:
                step = trainer.global_step
                handle.write(
                    json.dumps({"step": step, "kd_loss": pl_module.last_train_metrics["kd_loss"]})
                    + "\n"
                )
            if args.kill_after_step is not None and step == args.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    if args.kill_during_save is not None:
        from megatron.core import dist_checkpointing

        real_save = dist_checkpointing.save
        calls = {"n": 0}

        def save_then_die(*a, **k):
            calls["n"] += 1
            result = real_save(*a, **k)  # the files are written, the rename never happens
            if calls["n"] == args.kill_during_save:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        dist_checkpointing.save = save_then_die

    student, teacher, data = job_models_and_data(args.steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=MegatronStrategy(seed=7),
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    teacher_kwargs = {
        "teacher": teacher,
        "distill_config": {
            "intermediate_layer_pairs": [["decoder.final_layernorm", "decoder.final_layernorm"]]
        },
    }
    if args.teacher_cache:  # the teacher is replaced by its cache; logits only
        teacher_kwargs = {"teacher_cache": args.teacher_cache}
    distill(
        student,
        data,
        trainer,
        log_dir=args.log_dir,
        name=args.name,
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
        checkpoint_every_n_steps=args.every,
        keep_last=2,
        resume=args.resume,
        **teacher_kwargs,
    )


if __name__ == "__main__":
    main()
