"""How the demo's random-init KD student responds to the KD loss's weight and temperature.

Every variant distills :data:`examples.demo.TINY_STUDENT` from the demo's cached teacher (trained
first when there is none) from the same initial weights, on the same tokens in the same order,
with the demo's optimizer unless a variant changes it; one LM-only run gives the baseline. Each
row reports its held-out loss (the mean of its last validations, as the demo) and the share of
the LM-only student's gap to the teacher it closes. One run per variant on a noisy machine: read
differences of a few percent as ties.

The last line of stdout is one JSON object::

    {"machine": {...}, "teacher_val_loss": ..., "lm_only_val_loss": ...,
     "variants": [{"name": "kd_scale_5", "distill": {...}, "optimizer": {...},
                   "val_loss": ..., "gap_closed": ...}, ...]}

Examples:
    .venv/bin/python -m bench.demo_sweep               # the README's numbers (about 2 minutes)
    .venv/bin/python -m bench.demo_sweep --quick       # a few steps, for CI
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "kd_scale_1": {"distill": {"kd_loss_scale": 1.0}},
    "kd_scale_3": {"distill": {"kd_loss_scale": 3.0}},
    "kd_scale_5": {"distill": {"kd_loss_scale": 5.0}},
    "kd_scale_10": {"distill": {"kd_loss_scale": 10.0}},
    "temperature_2": {"distill": {"kd_loss_scale": 1.0, "logit_kl_temperature": 2.0}},
    "kd_only": {"distill": {"skip_lm_loss": True}},
    "lr_1e-2": {"distill": {"kd_loss_scale": 1.0}, "optimizer": {"lr": 1e-2, "min_lr": 1e-3}},
}
"""Changes to the demo's distillation config (temperature 1, LM loss kept) and optimizer."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_sweep", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the demo's --quick settings")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only"
    )
    parser.add_argument("--out", default=None, help="logs (default: a temporary directory)")
    args = parser.parse_args(argv)

    from bench._common import machine_description
    from examples import demo
    from kd_module.data.corpus import embedded_corpus
    from kd_module.distillation.config import DistillConfig
    from kd_module.training.module import DistillationModule, GPTModule
    from kd_module.training.optim import OptimizerConfig

    demo._quiet()
    settings = demo.QUICK if args.quick else demo.FULL
    out = Path(args.out or tempfile.mkdtemp(prefix="kd_demo_sweep_"))
    corpus = embedded_corpus(
        max_bytes=settings.corpus_max_bytes, validation_every=demo.CORPUS_VALIDATION_EVERY
    )
    teacher = demo.obtain_teacher(settings, corpus, out)
    lm_only = demo._fit(
        GPTModule(settings.student, optimizer=OptimizerConfig(**demo.STUDENT_OPTIMIZER)),
        settings.student_steps,
        settings,
        corpus,
        out / "lm_only",
    )
    baseline = demo.held_out_loss(lm_only)
    rows, teacher_loss = [], None
    base = dataclasses.asdict(demo.TINY_DISTILL)
    for name in args.only or list(VARIANTS):
        variant = VARIANTS[name]
        distill = DistillConfig(**{**base, **variant.get("distill", {})})
        optimizer = {**demo.STUDENT_OPTIMIZER, **variant.get("optimizer", {})}
        module = DistillationModule(
            settings.student,
            settings.teacher,
            teacher_checkpoint=teacher["checkpoint"],
            distill_config=distill,
            optimizer=OptimizerConfig(**optimizer),
        )
        record = demo._fit(module, settings.student_steps, settings, corpus, out / name)
        teacher_loss = module.teacher_val_loss
        loss = demo.held_out_loss(record)
        gap = baseline - teacher_loss
        rows.append(
            {
                "name": name,
                "distill": variant.get("distill", {}),
                "optimizer": variant.get("optimizer", {}),
                "val_loss": loss,
                "gap_closed": (baseline - loss) / gap if gap else None,
                "wall_s": record["wall_s"],
            }
        )
        print(f"{name}: held-out {loss:.4f}, gap closed {rows[-1]['gap_closed']}", flush=True)
    result = {
        "machine": machine_description(),
        "quick": args.quick,
        "held_out_loss": f"mean of the last {demo.LAST_VALIDATIONS} validations",
        "teacher_val_loss": teacher_loss,
        "lm_only_val_loss": baseline,
        "variants": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
