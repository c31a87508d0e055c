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


def grouped_mm_supported(x: torch.Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` can run the expert matmuls of ``x`` (already in its compute dtype): the
    op exists in this torch; on CPU in fp32 or bf16, on CUDA in bf16 on compute capability 9.0 or newer
    (Hopper); and every row length (``widths``) is a multiple of 16 bytes, which the op requires. Under
    ``torch.compile`` only bf16 (the op's shape function rejects fp32 there)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling())
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    else:
        ok_dtype = False
    return ok_dtype and all(w * x.element_size() % 16 == 0 for w in widths)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: (E, d, h) for gate and up, (E, h, d) for down.

    ``dispatch`` picks how the tokens, sorted by expert, meet their expert's weights (the results are the
    same): ``grouped`` runs one grouped matmul per weight over all experts (``torch._grouped_mm``), ``loop``
    runs one matmul per expert, and ``auto`` (the default) takes ``grouped`` where it is supported."""

    DISPATCHES = ("auto", "grouped", "loop")

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.dispatch = "auto"

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert e to its contiguous slice of ``x_sorted`` (tokens sorted by expert; ``counts[e]``
        tokens for expert e). Under autocast the matmuls run in the autocast dtype; the result has the dtype
        of ``x_sorted``."""
        if self.dispatch not in self.DISPATCHES:
            raise ValueError(f"Experts.dispatch={self.dispatch!r} is invalid: "
                             f"allowed: {', '.join(self.DISPATCHES)}")
        device = x_sorted.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_sorted.dtype
        x = x_sorted.to(dtype)
        grouped = self.dispatch == "grouped" or (
            self.dispatch == "auto" and grouped_mm_supported(x, self.w_gate.shape[1], self.w_gate.shape[2]))
        with torch.autocast(device, enabled=False):
            w_gate, w_up, w_down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
            out = (self._grouped(x, counts, w_gate, w_up, w_down) if grouped
                   else self._loop(x, counts, w_gate, w_up, w_down))
        return out.to(x_sorted.dtype)

    @staticmethod
    def _grouped(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x, w_gate, offs=offsets)) * torch._grouped_mm(x, w_up, offs=offsets)
        return torch._grouped_mm(h, w_down, offs=offsets)

    @staticmethod
    def _loop(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
              w_down: torch.Tensor) -> torch.Tensor:
        # split/unbind (not slicing and indexing) so that backward concatenates the gradients once instead of
        # materializing a full-size zero gradient per expert.
        outs = [(F.silu(xe @ g) * (xe @ u)) @ d
                for xe, g, u, d in zip(x.split(counts.tolist()), w_gate.unbind(0), w_up.unbind(0),
                                       w_down.unbind(0))]
        return torch.cat(outs)


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
        """Router logits and probabilities in fp32 (autocast off: it would run the router matmul in bf16),
        the top-k experts and their renormalized gates."""
        with torch.autocast(flat.device.type, enabled=False):
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
        expert_out = self.experts(flat[token_of], counts_t)
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
