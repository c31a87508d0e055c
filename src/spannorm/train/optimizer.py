"""The optimizer, written once: AdamW with weight decay on parameters of two or more dimensions (matrices,
the embedding, stacked expert weights) and none on gains and biases. The trainer and ``check``'s short
training both build theirs here."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spannorm.train.config import OptimConfig


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in two AdamW groups, in ``model.parameters()`` order: those of
    two or more dimensions with ``weight_decay``, the rest with none."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`decay_groups` with ``optim``'s learning rate, betas and epsilon (the schedule sets
    the learning rate before every step). ``fused=True`` takes PyTorch's fused kernel (CUDA only)."""
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(decay_groups(model, optim.weight_decay), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps, **extra)


__all__ = ["build_optimizer", "decay_groups"]
