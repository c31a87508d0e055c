"""What ``spannorm check`` records at one depth of one target: the measurements at init and after the short
training run, the training trace, and the theory's prediction and suggestion.

These types sit below both the orchestrator (:mod:`spannorm.diagnostics.check`, which fills them) and the
verdict rules (:mod:`spannorm.diagnostics.verdicts`, which read them), so neither imports the other's layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from spannorm.diagnostics.measure import Measurement
from spannorm.theory.criterion import ScalingSuggestion
from spannorm.theory.meanfield import InitPrediction


@dataclass
class TrainingTrace:
    """What happened during the short training run."""

    clip: float
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    """Total gradient norm of each step, before clipping."""
    lrs: list[float] = field(default_factory=list)
    diverged: bool = False
    diverged_step: int | None = None
    """1-based step at which a non-finite loss or gradient norm was detected (before the optimizer step)."""
    loss_spikes: int = 0
    """Steps whose loss exceeded mean + 6σ of the previous (up to 128) steps (SPEC §6)."""
    grad_spikes: int = 0

    @property
    def clip_fraction(self) -> float:
        """Fraction of the completed steps whose gradient norm exceeded the clip threshold."""
        if not self.grad_norms:
            return 0.0
        return sum(g > self.clip for g in self.grad_norms) / len(self.grad_norms) if self.clip > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of the completed steps."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail) if tail else math.nan

    def to_dict(self) -> dict:
        return {"steps": len(self.losses), "clip": self.clip, "losses": self.losses,
                "grad_norms": self.grad_norms, "lrs": self.lrs, "diverged": self.diverged,
                "diverged_step": self.diverged_step, "loss_spikes": self.loss_spikes,
                "grad_spikes": self.grad_spikes, "clip_fraction": self.clip_fraction,
                "final_loss": self.final_loss}


@dataclass
class DepthResult:
    """One target at one depth."""

    n_layers: int
    init: Measurement
    trained: Measurement | None = None
    training: TrainingTrace | None = None
    prediction: InitPrediction | None = None
    """The theory at init on the same batch (placements only)."""
    suggestion: ScalingSuggestion | None = None
    model_config: dict | None = None
