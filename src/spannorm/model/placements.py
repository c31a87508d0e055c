"""One block class per placement of SPEC §2. Every block maps the residual stream x_l -> x_{l+1}.

Blocks differ only where their equations differ: read two ``forward`` methods side by side. Norms are named
by position (``attn_in_norm``, ``attn_out_norm``, ``ffn_in_norm``, ``ffn_out_norm``, ``block_out_norm``).
``hook_mid`` sees the stream after the attention sub-layer, ``hook_out`` the block's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from spannorm.config import ModelConfig
from spannorm.model.layers import CausalSelfAttention, ResidualHook, SwiGLU, make_norm
from spannorm.model.moe import MoEFFN


@dataclass(frozen=True)
class BlockInit:
    """How a block's weights are initialized on top of the model-wide init (SPEC §3)."""

    out_proj_scale: float = 1.0
    """Multiplies the std of the output projections (attention out, FFN down, each expert's down)."""
    xavier_gain: float | None = None
    """DeepNet init: Xavier-normal with this gain on V, attention out and every FFN matrix; Xavier-normal
    with gain 1 on Q and K."""


def deepnorm_constants(n_layers: int) -> tuple[float, float]:
    """DeepNet's decoder-only constants: skip α = (2L)^(1/4), init gain β = (8L)^(-1/4)."""
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


def span_constants(cfg: ModelConfig) -> tuple[float, BlockInit]:
    """SpanNorm's clean-skip multiplier α and init for ``cfg.span_scaling`` (SPEC §3, our derivation):
    ``init``: α = 1, output projections scaled by 1/sqrt(2L); ``skip``: α = sqrt(2L), standard init;
    ``both``: DeepNorm's split, α = (2L)^(1/4) and Xavier gain (8L)^(-1/4)."""
    L = cfg.n_layers
    if cfg.span_scaling == "init":
        alpha, init = 1.0, BlockInit(out_proj_scale=1 / math.sqrt(2 * L))
    elif cfg.span_scaling == "skip":
        alpha, init = math.sqrt(2 * L), BlockInit()
    else:
        alpha, gain = deepnorm_constants(L)
        init = BlockInit(xavier_gain=gain)
    return (cfg.span_alpha if cfg.span_alpha is not None else alpha), init


def make_ffn(cfg: ModelConfig) -> nn.Module:
    return MoEFFN(cfg) if cfg.moe is not None else SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.bias)


class Block(nn.Module):
    """Shared parts: attention, FFN, the position-named norms of ``norm_positions`` and two hook points."""

    placement: ClassVar[str]
    norm_positions: ClassVar[tuple[str, ...]]
    normalizes_output: ClassVar[bool] = False
    """True when x_{l+1} is the output of a norm, so the model needs no final norm after it."""
    qkv_norm: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index, self.n_layers = layer_index, cfg.n_layers
        self.delta_t = cfg.delta_t
        self.attn = CausalSelfAttention(cfg, qkv_norm=self.qkv_norm)
        self.ffn = make_ffn(cfg)
        for position in self.norm_positions:
            setattr(self, f"{position}_norm", make_norm(cfg))
        self.hook_mid = ResidualHook()
        self.hook_out = ResidualHook()

    def init_rule(self, cfg: ModelConfig) -> BlockInit:
        return BlockInit()

    def extra_repr(self) -> str:
        return f"placement={self.placement}, layer={self.layer_index}"


class PreBlock(Block):
    """h = x + Δt·A(N₁(x)); x' = h + Δt·F(N₂(h))."""

    placement = "pre"
    norm_positions = ("attn_in", "ffn_in")

    def init_rule(self, cfg: ModelConfig) -> BlockInit:
        return BlockInit(out_proj_scale=1 / math.sqrt(2 * cfg.n_layers) if cfg.scale_out_proj else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(x + self.delta_t * self.attn(self.attn_in_norm(x)))
        return self.hook_out(h + self.delta_t * self.ffn(self.ffn_in_norm(h)))


class PostBlock(Block):
    """h = N₁(x + Δt·A(x)); x' = N₂(h + Δt·F(h))."""

    placement = "post"
    norm_positions = ("attn_out", "ffn_out")
    normalizes_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(self.attn_out_norm(x + self.delta_t * self.attn(x)))
        return self.hook_out(self.ffn_out_norm(h + self.delta_t * self.ffn(h)))


class PeriBlock(Block):
    """Peri-LN: h = x + Δt·N₁ᵒ(A(N₁(x))); x' = h + Δt·N₂ᵒ(F(N₂(h)))."""

    placement = "peri"
    norm_positions = ("attn_in", "attn_out", "ffn_in", "ffn_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(x + self.delta_t * self.attn_out_norm(self.attn(self.attn_in_norm(x))))
        return self.hook_out(h + self.delta_t * self.ffn_out_norm(self.ffn(self.ffn_in_norm(h))))


class SpanBlock(Block):
    """SpanNorm (our default reading): a = A(N₁(x)); h = x + a; f = F(N₂(h)); x' = Nₒ(α·x + β·(a + f))."""

    placement = "span"
    norm_positions = ("attn_in", "ffn_in", "block_out")
    normalizes_output = True

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.alpha, self._init = span_constants(cfg)
        self.beta = cfg.span_beta

    def init_rule(self, cfg: ModelConfig) -> BlockInit:
        return self._init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.attn_in_norm(x))
        h = self.hook_mid(x + a)
        f = self.ffn(self.ffn_in_norm(h))
        return self.hook_out(self.block_out_norm(self.alpha * x + self.beta * (a + f)))


class SpanB2TBlock(SpanBlock):
    """SpanNorm, second reading (B2T on a Post-LN block): h = N₁(x + A(x)); f = F(h);
    x' = Nₒ(α·x + β·(h + f))."""

    placement = "span_b2t"
    norm_positions = ("attn_out", "block_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(self.attn_out_norm(x + self.attn(x)))
        f = self.ffn(h)
        return self.hook_out(self.block_out_norm(self.alpha * x + self.beta * (h + f)))


class DeepNormBlock(Block):
    """DeepNet: h = N₁(α·x + A(x)); x' = N₂(α·h + F(h)), α = (2L)^(1/4), Xavier gain (8L)^(-1/4)."""

    placement = "deepnorm"
    norm_positions = ("attn_out", "ffn_out")
    normalizes_output = True

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.alpha, self.beta = deepnorm_constants(cfg.n_layers)

    def init_rule(self, cfg: ModelConfig) -> BlockInit:
        return BlockInit(xavier_gain=self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(self.attn_out_norm(self.alpha * x + self.attn(x)))
        return self.hook_out(self.ffn_out_norm(self.alpha * h + self.ffn(h)))


class LNSBlock(PreBlock):
    """LayerNorm Scaling: ``pre`` with each norm output multiplied by 1/sqrt(l+1) (l counts from 0)."""

    placement = "lns"

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.norm_scale = 1 / math.sqrt(layer_index + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.norm_scale
        h = self.hook_mid(x + self.delta_t * self.attn(s * self.attn_in_norm(x)))
        return self.hook_out(h + self.delta_t * self.ffn(s * self.ffn_in_norm(h)))


class HybridBlock(Block):
    """HybridNorm: h = x + A_qkv(x), with Q, K and V normalized per head; x' = N(h) + F(N(h))."""

    placement = "hybrid"
    norm_positions = ("attn_out",)
    qkv_norm = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(x + self.attn(x))
        n = self.attn_out_norm(h)
        return self.hook_out(n + self.ffn(n))


BLOCKS: dict[str, type[Block]] = {
    cls.placement: cls
    for cls in (PreBlock, PostBlock, PeriBlock, SpanBlock, SpanB2TBlock, DeepNormBlock, LNSBlock, HybridBlock)
}
"""Block class by placement name. ``mixln`` is not here: it is a pattern of ``post`` and ``pre``."""


def make_block(cfg: ModelConfig, layer_index: int) -> Block:
    return BLOCKS[cfg.layer_placements()[layer_index]](cfg, layer_index)
