"""Weight-free bounds and the published scalings (SPEC §3, §5).

Peri-LN (Kan et al.): every sub-layer adds Δt·Nᵒ(·) to the stream, and a norm's output has per-token
Euclidean norm at most √d·‖γ‖∞ + ‖β‖₂ whatever its input, so per token

    ‖x_{k+1} − x_k‖₂ ≤ Δt·(√d·‖γᵒ_k‖∞ + ‖βᵒ_k‖₂)

for every sub-layer k and any weights. Summed over the 2L sub-layers, the stream's norm grows at most
linearly in depth, and its second moment at most quadratically.

``span`` (SpanNorm's clean reading, SPEC §9) obeys the same argument with one norm per block: each block
adds Δt·β·Nₒ(a + f), so per token ‖x_{l+1} − x_l‖₂ ≤ Δt·β·(√d·‖γₒ‖∞ + ‖bₒ‖₂), and with β = 1/√L the stream's
RMS grows by at most Δt·√L·(‖γ‖∞ + ‖b‖₂/√d) over the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spannorm.config import ModelConfig
from spannorm.model.placements import deepnorm_constants, span_post_constants


def norm_output_bound(norm: nn.Module) -> float:
    """√d·‖γ‖∞ + ‖β‖₂: the largest per-token Euclidean norm the output of ``norm`` (RMSNorm or LayerNorm) can
    have, for any input."""
    weight = norm.weight
    assert isinstance(weight, torch.Tensor)  # RMSNorm and LayerNorm have a gain vector
    gain = weight.detach().float()
    bias = getattr(norm, "bias", None)
    bias_norm = bias.detach().float().norm().item() if bias is not None else 0.0
    return math.sqrt(gain.numel()) * gain.abs().max().item() + bias_norm


def peri_step_bound(norm: nn.Module, delta_t: float) -> float:
    """The Peri-LN bound Δt·(√d·‖γᵒ‖∞ + ‖βᵒ‖₂) on one sub-layer's per-token update, for its output norm."""
    return delta_t * norm_output_bound(norm)


def span_step_bound(norm: nn.Module, delta_t: float, beta: float) -> float:
    """span's bound Δt·β·(√d·‖γₒ‖∞ + ‖bₒ‖₂) on one block's per-token update, for its norm Nₒ."""
    return delta_t * beta * norm_output_bound(norm)


def peri_depth_bound(cfg: ModelConfig, gain_max: float = 1.0, bias_norm: float = 0.0) -> float:
    """Upper bound on RMS(x_L) − RMS(x_0) per token for a ``peri`` model of ``cfg`` whose output norms have
    ‖γ‖∞ ≤ gain_max and ‖β‖₂ ≤ bias_norm (at init 1 and 0): 2L·Δt·(‖γ‖∞ + ‖β‖₂/√d)."""
    return 2 * cfg.n_layers * cfg.delta_t * (gain_max + bias_norm / math.sqrt(cfg.d_model))


def peri_bound_ratios(delta: torch.Tensor, bound: float) -> float:
    """max over tokens of ‖Δx‖₂ / bound for a sub-layer's (or span block's) update Δx of shape (…, d):
    ≤ 1 when the bound holds."""
    return (delta.float().norm(dim=-1).max() / bound).item()


@dataclass(frozen=True)
class Scaling:
    """The constants of one residual-scaling rule at depth L."""

    name: str
    alpha: float
    """Multiplier of the clean skip."""
    out_proj_scale: float
    """Multiplier of the std of the output projections (1 when Xavier gains are used)."""
    xavier_gain: float | None
    """DeepNet's Xavier gain on V, attention out and the FFN matrices, or None."""


def scalings(n_layers: int) -> list[Scaling]:
    """DeepNorm's constants and span_post's three candidate scalings (SPEC §3) at depth ``n_layers``."""
    out = []
    alpha, gain = deepnorm_constants(n_layers)
    out.append(Scaling("deepnorm", alpha, 1.0, gain))
    for rule in ("init", "skip", "both"):
        cfg = ModelConfig(n_layers=n_layers, placement="span_post", span_post_scaling=rule)
        alpha, init = span_post_constants(cfg)
        out.append(Scaling(f"span_post/{rule}", alpha, init.out_proj_scale, init.xavier_gain))
    return out
