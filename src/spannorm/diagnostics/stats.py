"""The statistics of SPEC §6 on one hidden state H of shape (B, T, d). Every function returns a float.

Moments: mean |H|, entry-wise variance (across features, averaged over tokens), data-wise variance (across
tokens, averaged over features), RMS, max |H| and its headroom below the fp16 and bf16 maxima. Collapse:
the cosine and angular distance between consecutive stream states, the effective rank of a sequence's
states, and token uniformity.
"""

from __future__ import annotations

import math

import torch

FP16_MAX = float(torch.finfo(torch.float16).max)
"""65504."""
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
"""About 3.39e38."""


def mean_abs(h: torch.Tensor) -> float:
    """Mean over b, t, j of |H|."""
    return h.float().abs().mean().item()


def entrywise_variance(h: torch.Tensor) -> float:
    """The mean over tokens of the variance across the d features."""
    return h.float().var(dim=-1, unbiased=False).mean().item()


def datawise_variance(h: torch.Tensor) -> float:
    """The mean over features of the variance across the B·T tokens."""
    return h.float().reshape(-1, h.shape[-1]).var(dim=0, unbiased=False).mean().item()


def rms(h: torch.Tensor) -> float:
    """sqrt(mean H²)."""
    return h.float().pow(2).mean().sqrt().item()


def max_abs(h: torch.Tensor) -> float:
    """max |H|."""
    return h.float().abs().max().item()


def headroom_log2(max_value: float, dtype_max: float) -> float:
    """log2(max |H| / dtype max): negative is the number of doublings left before overflow, ≥ 0 overflows.
    Non-finite values give +inf."""
    if not math.isfinite(max_value):
        return math.inf
    if max_value <= 0:
        return -math.inf
    return math.log2(max_value / dtype_max)


def _unit(h: torch.Tensor) -> torch.Tensor:
    h = h.float()
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def adjacent_cosine(h: torch.Tensor, h_next: torch.Tensor) -> float:
    """cos(H_l[b, t], H_{l+1}[b, t]) per token, averaged over tokens."""
    return (_unit(h) * _unit(h_next)).sum(dim=-1).mean().item()


def angular_distance(h: torch.Tensor, h_next: torch.Tensor) -> float:
    """arccos(cos(H_l[b, t], H_{l+1}[b, t])) / π per token, averaged: 0 for no change, 0.5 for orthogonal."""
    cos = (_unit(h) * _unit(h_next)).sum(dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean().item()


def effective_rank(h: torch.Tensor) -> float:
    """exp(entropy of the normalized singular values) of each sequence's (T, d) state, averaged over the
    batch: between 1 (all tokens on one line) and min(T, d)."""
    h = h.float().reshape(-1, h.shape[-2], h.shape[-1])
    if not torch.isfinite(h).all():
        return math.nan
    s = torch.linalg.svdvals(h.double())
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1)
    return entropy.exp().mean().item()


def token_uniformity(h: torch.Tensor) -> float:
    """The mean pairwise cosine between the tokens of a sequence (t ≠ t'), averaged over the batch: 1 when
    every token carries the same direction (rank collapse)."""
    u = _unit(h).reshape(-1, h.shape[-2], h.shape[-1])
    T = u.shape[1]
    if T < 2:
        return 1.0
    gram = u @ u.transpose(1, 2)
    return ((gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)) / (T * (T - 1))).mean().item()
