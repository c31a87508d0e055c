"""Wrap a user's block in a language model with the same hook points as :class:`~spannorm.DecoderLM`, so
every measurement (and ``spannorm check``) works on it.

A block factory is ``factory(d_model, n_heads, layer_index, n_layers) -> nn.Module`` whose module maps the
residual stream (B, T, d) to (B, T, d), and is named on the command line as ``package.module:factory``.
The wrapper is: byte embedding (std 1/√d, times √d: a unit-variance stream, as DecoderLM's default fan-in
init), the user's blocks, a final RMSNorm, and an untied head of std 1/(2√d) (DecoderLM's default
``head_init="half"``, drawn after the blocks), so the model starts near the loss of a uniform guess. Blocks must
be causal for the language-model loss to mean anything; the wrapper does not check that.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.model.layers import ResidualHook, RMSNorm
from spannorm.model.transformer import LMOutput

BlockFactory = Callable[[int, int, int, int], nn.Module]


class BlockFactoryError(ValueError):
    """A block factory could not be loaded or does not build a valid block."""


def load_block_factory(spec: str) -> BlockFactory:
    """Import ``package.module:factory`` and return the factory."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BlockFactoryError(f"block factory {spec!r} must look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BlockFactoryError(f"cannot import {module_name!r} for block factory {spec!r}: {err}; allowed: a "
                                "module on sys.path, or one in the folder given with --path DIR") from None
    except Exception as err:  # noqa: BLE001 - the user's module failing as it is imported is one line, not a traceback
        raise BlockFactoryError(f"importing {module_name!r} for block factory {spec!r} failed: "
                                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise BlockFactoryError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise BlockFactoryError(f"{spec!r} is not callable")
    return factory


class HookedBlock(nn.Module):
    """A user's block followed by a hook point on its output (x_{l+1})."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.hook_out = ResidualHook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_out(self.block(x))


class CustomBlockLM(nn.Module):
    """Embedding, the blocks built by ``factory``, a final RMSNorm and an untied head at half the fan-in std."""

    def __init__(self, factory: BlockFactory, *, n_layers: int, d_model: int = 64, n_heads: int = 4,
                 vocab_size: int = 256):
        super().__init__()
        self.d_model, self.n_layers, self.vocab_size = d_model, n_layers, vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(d_model))
        self.hook_embed = ResidualHook()
        blocks = []
        for layer in range(n_layers):
            try:
                block = factory(d_model, n_heads, layer, n_layers)
            except Exception as err:  # noqa: BLE001 - any failure of user code is reported the same way
                raise BlockFactoryError(f"the factory raised for layer {layer}: {type(err).__name__}: "
                                        f"{str(err).splitlines()[0] if str(err) else ''}") from None
            if not isinstance(block, nn.Module):
                raise BlockFactoryError(f"the factory returned {type(block).__name__} for layer {layer}, "
                                        "not an nn.Module")
            blocks.append(HookedBlock(block))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.5 / math.sqrt(d_model))

    def check_shapes(self, seq_len: int = 8) -> None:
        """Raise :class:`BlockFactoryError` unless every block maps (B, T, d) to (B, T, d)."""
        x = torch.randn(2, seq_len, self.d_model)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks):
                try:
                    y = block(x)
                except Exception as err:  # noqa: BLE001 - any failure of user code is reported the same way
                    raise BlockFactoryError(f"block {layer} failed on a (2, {seq_len}, {self.d_model}) input: "
                                            f"{type(err).__name__}: {err}") from None
                if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise BlockFactoryError(f"block {layer} maps (2, {seq_len}, {self.d_model}) to {shape}; "
                                            "a block must map (B, T, d) to (B, T, d)")
                x = y

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        x = self.hook_embed(self.embed(idx) * math.sqrt(self.d_model))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.final_norm(x), self.lm_head.weight.to(x.dtype))  # as DecoderLM: no module call
        out = LMOutput(logits=logits)
        if targets is not None:
            out.loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return out
