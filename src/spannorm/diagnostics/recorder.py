"""Record the residual stream through the model's hook points, without the model knowing.

``ResidualRecorder`` attaches forward hooks to every :class:`~spannorm.model.layers.ResidualHook` of a
:class:`~spannorm.DecoderLM` and keeps, for each point, the activation and (after ``backward``) its gradient.
Points are named ``embed`` (x_0), ``block{l}.mid`` (after the attention sub-layer of block l) and
``block{l}.out`` (x_{l+1}).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from spannorm.model.layers import ResidualHook


@dataclass
class Recording:
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)

    def stream(self) -> list[torch.Tensor]:
        """x_0 … x_L: the embedding output, then every block's output."""
        names = ["embed"] + [n for n in self.activations if n.endswith(".out")]
        return [self.activations[n] for n in names]

    def stream_grads(self) -> list[torch.Tensor]:
        """∂loss/∂x_0 … ∂loss/∂x_L, in the order of :meth:`stream` (needs ``grads=True`` and a backward)."""
        names = ["embed"] + [n for n in self.activations if n.endswith(".out")]
        return [self.gradients[n] for n in names]


_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.hook_(\w+)")
"""A block's own hook point; hook points nested deeper (inside a user's block) are not residual-stream points."""


def hook_point_names(model: nn.Module) -> dict[str, ResidualHook]:
    """The model's hook points under their short names (``embed``, ``block3.mid``, ``block3.out``)."""
    points = {}
    for name, module in model.named_modules():
        if not isinstance(module, ResidualHook):
            continue
        if name == "hook_embed":
            points["embed"] = module
        elif match := _BLOCK_HOOK.fullmatch(name):
            points[f"block{match[1]}.{match[2]}"] = module
    return points


class ResidualRecorder:
    """Context manager: ``with ResidualRecorder(model, grads=True) as rec: loss.backward()``."""

    def __init__(self, model: nn.Module, grads: bool = False, detach: bool = True):
        self.model, self.grads, self.detach = model, grads, detach
        self.recording = Recording()
        self._handles: list = []

    def _hook(self, name: str):
        def forward_hook(_module, _inputs, output):
            self.recording.activations[name] = output.detach() if self.detach else output
            if self.grads and output.requires_grad:
                output.register_hook(lambda g: self.recording.gradients.__setitem__(name, g.detach()))
        return forward_hook

    def __enter__(self) -> Recording:
        for name, module in hook_point_names(self.model).items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self.recording

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
