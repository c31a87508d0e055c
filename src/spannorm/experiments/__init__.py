"""The experiment harness: sweep plans, a resumable multi-process sweep runner, per-layer measurements after
training, and the study report (tables, significance tests and plots)."""

from spannorm.experiments.plan import (
    Cell,
    PlacementVariant,
    RunSpec,
    StudyPlan,
    format_lr,
    load_plan,
    parse_plan,
    select_best_lr,
)
from spannorm.experiments.runner import SweepOutcome, load_index, run_sweep

__all__ = ["Cell", "PlacementVariant", "RunSpec", "StudyPlan", "SweepOutcome", "format_lr", "load_index",
           "load_plan", "parse_plan", "run_sweep", "select_best_lr"]
