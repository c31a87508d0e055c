"""Init profiles: how the residual stream's variance and the activation gradient move across depth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spannorm.config import ModelConfig
from spannorm.diagnostics.recorder import ResidualRecorder
from spannorm.model import DecoderLM


def entrywise_variance(h: torch.Tensor) -> float:
    """SPEC §6: the mean over tokens of the variance across the d features."""
    return h.float().var(dim=-1, unbiased=False).mean().item()


@dataclass
class InitProfile:
    placement: str
    n_layers: int
    variance: list[float]
    """Entry-wise variance of x_0 … x_L."""
    rms: list[float]
    """RMS of x_0 … x_L."""
    grad_norm: list[float]
    """‖∂loss/∂x_l‖ for the block inputs x_0 … x_{L-1}."""

    @property
    def variance_ratio(self) -> float:
        """Var(x_L) / Var(x_0)."""
        return self.variance[-1] / self.variance[0]

    @property
    def grad_ratio(self) -> float:
        """‖∂loss/∂x_0‖ / ‖∂loss/∂x_{L-1}‖: the first-to-last block gradient ratio."""
        return self.grad_norm[0] / self.grad_norm[-1]


def init_profile(model: DecoderLM, tokens: torch.Tensor) -> InitProfile:
    """Forward and backward the next-token loss on ``tokens`` (B, T+1), recording the residual stream."""
    model.zero_grad(set_to_none=True)
    with ResidualRecorder(model, grads=True) as rec:
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
    stream, grads = rec.stream(), rec.stream_grads()
    model.zero_grad(set_to_none=True)
    return InitProfile(
        placement=model.cfg.placement,
        n_layers=model.cfg.n_layers,
        variance=[entrywise_variance(h) for h in stream],
        rms=[h.float().pow(2).mean().sqrt().item() for h in stream],
        grad_norm=[g.float().norm().item() for g in grads[:-1]],
    )


def random_init_profile(cfg: ModelConfig, batch: int = 4, seq_len: int = 64, seed: int = 0) -> InitProfile:
    """Build ``cfg`` with ``seed`` and profile it on uniformly random tokens."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DecoderLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
    return init_profile(model, tokens)
