"""nemo-run recipes: functions returning ``run.Partial(kd_module.distill, ...)``."""
