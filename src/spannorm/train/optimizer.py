"""The optimizer, written once: AdamW with weight decay on parameters of two or more dimensions (matrices,
the embedding, stacked expert weights) and none on gains and biases. The trainer and ``check``'s short
training both build theirs here."""

from __future__ import annotations

from collections.abc import Callable
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


def uses_fused(optim: OptimConfig, device: torch.device) -> bool:
    """Whether the trainer takes PyTorch's fused AdamW: ``optim.fused`` when set, else on CUDA only (the
    for-loop kernel on a CPU keeps the fp32 losses recorded before the switch existed)."""
    return optim.fused if optim.fused is not None else device.type == "cuda"


def build_optimizer(model: nn.Module, optim: OptimConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`decay_groups` with ``optim``'s learning rate, betas and epsilon (the schedule sets
    the learning rate before every step). ``fused=True`` takes PyTorch's fused kernel (CUDA and CPU);
    otherwise PyTorch's default for the device (the for-loop kernel on a CPU)."""
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(decay_groups(model, optim.weight_decay), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps, **extra)


def load_keeping_kernel(optimizer: torch.optim.Optimizer, load: Callable[[], Any]) -> Any:
    """Run ``load`` (which loads a saved state dict into ``optimizer``) and keep the kernel settings the
    optimizer was built with: ``load_state_dict`` takes the saved groups' ``fused`` and ``foreach``, so a run
    saved with one kernel would otherwise resume with it whatever the config now asks for."""
    kernels = [{key: group.get(key) for key in KERNEL_KEYS} for group in optimizer.param_groups]
    result = load()
    for group, kept in zip(optimizer.param_groups, kernels):
        group.update(kept)
    return result


KERNEL_KEYS = ("fused", "foreach")
"""The AdamW group settings that choose the kernel, not the update."""


__all__ = ["KERNEL_KEYS", "build_optimizer", "decay_groups", "load_keeping_kernel", "uses_fused"]

