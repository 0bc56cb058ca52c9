"""Lightning callbacks for distillation runs."""
