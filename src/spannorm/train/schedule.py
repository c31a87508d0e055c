"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay (WSD), or constant."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, lr: float, *, schedule: str = "cosine", warmup_steps: int = 0,
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps`` steps.

    Warmup rises linearly to ``lr`` over ``warmup_steps`` steps (reaching it at step warmup_steps - 1). Then
    ``cosine`` decays to ``lr·min_lr_ratio`` at the last step; ``wsd`` holds ``lr`` and decays linearly to
    ``lr·min_lr_ratio`` over the last ``decay_fraction`` of the steps; ``constant`` holds ``lr``."""
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps)) if decay_fraction > 0 else 0
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start or decay_steps == 0:
            return lr
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return lr + progress * (min_lr - lr)
    raise ValueError(f"unknown schedule {schedule!r}")


def lr_for(optim_cfg, step: int, total_steps: int) -> float:
    """:func:`lr_at` with the settings of an :class:`~spannorm.train.config.OptimConfig`."""
    return lr_at(step, total_steps, optim_cfg.lr, schedule=optim_cfg.schedule,
                 warmup_steps=optim_cfg.warmup_steps, min_lr_ratio=optim_cfg.min_lr_ratio,
                 decay_fraction=optim_cfg.decay_fraction)
