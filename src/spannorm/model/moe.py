"""The Mixture-of-Experts FFN of SPEC §4: fp32 softmax router, top-k with renormalized gates, dropless
dispatch by sorting tokens per expert, an optional shared expert, and the auxiliary losses handed back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.config import ModelConfig
from spannorm.model.layers import SwiGLU


@dataclass
class MoEAux:
    """What one MoE layer hands back to the caller after a forward pass."""

    balance_loss: torch.Tensor
    """Switch load-balancing loss E·Σ_e f_e·p_e; 1.0 at perfectly uniform routing."""
    z_loss: torch.Tensor
    """Router z-loss: mean over tokens of logsumexp(router logits)²."""
    load: torch.Tensor
    """Fraction of token-to-expert assignments each expert received, shape (E,), sums to 1 (no grad)."""


def switch_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E·Σ_e f_e·p_e, where f_e is the fraction of top-k assignments to expert e and p_e the mean router
    probability of e. Its minimum, 1, is reached when routing is uniform."""
    f = torch.bincount(expert_idx.reshape(-1), minlength=n_experts).float() / expert_idx.numel()
    p = probs.mean(dim=0)
    return n_experts * (f * p).sum()


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: (E, d, h) for gate and up, (E, h, d) for down."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Apply expert e to its contiguous slice of ``x_sorted`` (tokens sorted by expert)."""
        out = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe = x_sorted[start:start + n]
            h = F.silu(xe @ self.w_gate[e].to(xe.dtype)) * (xe @ self.w_up[e].to(xe.dtype))
            out[start:start + n] = h @ self.w_down[e].to(xe.dtype)
            start += n
        return out


class MoEFFN(nn.Module):
    """Dropless top-k MoE. After each forward, ``last_aux`` holds the layer's :class:`MoEAux`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.moe is not None
        self.n_experts, self.top_k = cfg.moe.n_experts, cfg.moe.top_k
        self.router = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        self.experts = Experts(self.n_experts, cfg.d_model, cfg.expert_hidden)
        self.shared_expert = SwiGLU(cfg.d_model, cfg.expert_hidden, cfg.bias) if cfg.moe.shared_expert else None
        self.last_aux: MoEAux | None = None

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits and probabilities in fp32, the top-k experts and their renormalized gates."""
        logits = F.linear(flat.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        top_p, expert_idx = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        return logits, probs, expert_idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, probs, expert_idx, gates = self.route(flat)
        flat_expert = expert_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k
        counts_t = torch.bincount(flat_expert, minlength=self.n_experts)
        expert_out = self.experts(flat[token_of], counts_t.tolist())
        weighted = expert_out * gates.reshape(-1)[order].unsqueeze(-1).to(expert_out.dtype)
        y = torch.zeros_like(flat).index_add_(0, token_of, weighted)
        if self.shared_expert is not None:
            y = y + self.shared_expert(flat)
        self.last_aux = MoEAux(
            balance_loss=switch_balance_loss(probs, expert_idx, self.n_experts),
            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
            load=(counts_t.float() / flat_expert.numel()).detach(),
        )
        return y.view(shape)
