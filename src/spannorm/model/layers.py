"""The sub-modules every block is made of: norms, rotary attention, the SwiGLU FFN and residual hook points."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from spannorm.config import ModelConfig


class _RMSNormFunction(torch.autograd.Function):
    """x·r·w with r = 1/sqrt(mean(x², last dim) + eps), with a hand-written backward:
    dx = r·(g·w − x̂·mean(g·w·x̂)), dw = Σ_rows g·x̂, where x̂ = x·r. On CPU, ``F.rms_norm`` runs as separate
    ops with a composite backward; this takes about half as many passes over the tensor (measured 1.5–1.9x
    faster forward + backward at 1024 × 256; see ``benchmarks/bench_fast_paths.py``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        d = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_hat, rstd, weight = ctx.saved_tensors
        d = x_hat.shape[-1]
        grad_x_hat = grad_out * weight
        dot = torch.linalg.vecdot(grad_x_hat, x_hat, dim=-1).unsqueeze(-1)
        grad_x = torch.addcmul(grad_x_hat, x_hat, dot, value=-1.0 / d).mul_(rstd)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(grad_out.reshape(-1, d), x_hat.reshape(-1, d), dim=0)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x², last dim) + eps) · weight. On CPU in eager mode through :class:`_RMSNormFunction`;
    on other devices (where ``F.rms_norm`` is one fused kernel) and under ``torch.compile`` (which fuses it
    itself) through ``F.rms_norm``."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm with a gain, computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.float(), self.weight.float(), self.eps).type_as(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with gain and bias, computed in fp32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "rms":
        return RMSNorm(dim, cfg.norm_eps)
    return LayerNorm(dim, eps=cfg.norm_eps)


class ResidualHook(nn.Identity):
    """A parameter-free point on the residual stream. Diagnostics attach forward hooks here; the model
    itself never looks at what is attached."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies θ^(-2i/d) (float64), rescaled as ``scaling["rope_type"]`` says, and the
    magnitude that multiplies cos and sin (1 except for yarn):

    - ``linear``: every frequency divided by ``factor`` (position interpolation).
    - ``llama3`` (Llama 3.1+): wavelengths λ = 2π/f above L/low_freq_factor (L =
      original_max_position_embeddings) divided by ``factor``, below L/high_freq_factor kept, and in between
      f·((1 − s)/factor + s) with s = (L/λ − low_freq_factor)/(high_freq_factor − low_freq_factor).
    - ``yarn`` (Peng et al. 2023): f/factor and f blended by a ramp over the dimensions that complete between
      ``beta_fast`` (32) and ``beta_slow`` (1) rotations within L, with cos and sin scaled by
      ``attention_factor`` (default 0.1·ln(factor) + 1, or the ratio of the mscale terms when given)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    if scaling is None or scaling["rope_type"] is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)
        medium = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        in_between = (wavelength <= original / low) & (wavelength >= original / high)
        return torch.where(in_between, medium, scaled), 1.0
    if kind == "yarn":
        return _yarn_frequencies(inv_freq, head_dim, theta, factor, original, scaling)
    raise ValueError(f"rope_scaling.rope_type={kind!r} is invalid")


def _yarn_frequencies(inv_freq: torch.Tensor, head_dim: int, theta: float, factor: float, original: float,
                      scaling: dict) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    magnitude = scaling.get("attention_factor")
    if magnitude is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        magnitude = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dimension_of(rotations: float) -> float:  # the dimension that turns `rotations` times within `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(scaling.get("beta_fast") or 32), dimension_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, device=inv_freq.device, dtype=torch.float64) - low) / (high - low))
    keep = 1 - ramp.clamp(0, 1)  # 1: the original frequency (fast dimensions), 0: interpolated by factor
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(magnitude)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the non-interleaved (Llama / GPT-NeoX) layout:
    x·cos + rotate_half(x)·sin. It is computed as x·cos + roll(x, head_dim/2)·sin_signed, where ``sin_signed``
    is sin with its first half negated: the same products (negation is exact), in three ops instead of six.
    ``too_long_advice`` ends the error for a sequence longer than the table."""

    cos: torch.Tensor  # buffers (max_len, head_dim), made in __init__
    sin: torch.Tensor
    sin_signed: torch.Tensor

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None = None,
                 too_long_advice: str = "raise model.context_length"):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.too_long_advice = too_long_advice
        cos, sin = self._table(max_len)
        half = head_dim // 2
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.register_buffer("sin_signed", sin_signed, persistent=False)

    def _table(self, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, magnitude = rope_frequencies(self.head_dim, self.theta, self.scaling, device)
        angles = torch.outer(torch.arange(length, device=device, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        if magnitude != 1.0:
            return (angles.cos() * magnitude).float(), (angles.sin() * magnitude).float()
        return angles.cos().float(), angles.sin().float()

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k`` (batch, heads, T, head_dim) at positions 0..T-1, or at ``positions``
        (batch, T), the absolute position of each token, as a KV cache feeds them (the cache keeps them
        inside the table)."""
        T = q.shape[-2]
        if positions is not None:
            cos = self.cos[positions].unsqueeze(1).to(q.dtype)
            sin_signed = self.sin_signed[positions].unsqueeze(1).to(q.dtype)
        elif T > self.cos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds the rotary table ({self.cos.shape[0]}); "
                             f"{self.too_long_advice}")
        else:
            cos, sin_signed = self.cos[:T].to(q.dtype), self.sin_signed[:T].to(q.dtype)
        half = self.head_dim // 2
        return (q * cos + q.roll(half, dims=-1) * sin_signed,
                k * cos + k.roll(half, dims=-1) * sin_signed)


def too_long_advice(cfg: ModelConfig) -> str:
    """What to do about a sequence longer than ``cfg.context_length``: raise it, unless the model was trained with
    a sliding window that it already equals (full attention past the window would compute something else)."""
    if cfg.sliding_window is not None and cfg.context_length >= cfg.sliding_window:
        return (f"the model was trained with a {cfg.sliding_window}-token sliding window, which spannorm does not "
                f"implement, so it runs at most {cfg.sliding_window} tokens at once: shorten the input")
    limit = "" if cfg.sliding_window is None else f" (at most model.sliding_window={cfg.sliding_window})"
    return f"raise model.context_length{limit}"


def sdpa_handles_gqa(q: torch.Tensor) -> bool:
    """Whether SDPA should take grouped key/value heads as they are (``enable_gqa=True``) rather than
    repeated to every query head. On CUDA only the flash and math kernels accept ``enable_gqa``, and flash
    runs only in fp16/bf16: in fp32, repeating the heads keeps the memory-efficient kernel instead of the math
    one. On CPU the flash kernel accepts grouped heads (measured faster than repeating them)."""
    if q.device.type == "cuda":
        return q.dtype in (torch.float16, torch.bfloat16)
    return True


class AttentionCache(Protocol):
    """What :class:`CausalSelfAttention` asks of a key/value cache installed on it (one per layer)."""

    @property
    def positions(self) -> torch.Tensor:
        """(batch, T) absolute position of each token of the current forward, for RoPE."""
        ...

    @property
    def mask(self) -> torch.Tensor | None:
        """(batch, 1, T, cached + T) boolean, True where a query may attend to a key; None: every key."""
        ...

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (batch, kv_heads, T, head_dim); return every key and value so far."""
        ...


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with RoPE and optional grouped-query heads, through
    ``F.scaled_dot_product_attention``. ``qkv_norm`` normalizes Q, K and V per head (HybridNorm)."""

    def __init__(self, cfg: ModelConfig, qkv_norm: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(d, d, bias=cfg.bias)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.context_length, cfg.rope_theta, cfg.rope_scaling,
                                      too_long_advice=too_long_advice(cfg))
        if qkv_norm:
            self.q_norm = make_norm(cfg, cfg.head_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim)
            self.v_norm = make_norm(cfg, cfg.head_dim)
        self.qkv_norm = qkv_norm
        self.kv_cache: AttentionCache | None = None
        """Installed from outside during cached generation (:func:`spannorm.inference.kv_cache.kv_cache`);
        None in training and in every uncached forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qkv_norm:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cache = self.kv_cache
        if cache is None:
            q, k = self.rotary(q, k)
        else:  # the new tokens at their absolute positions, attending to every cached key as well
            q, k = self.rotary(q, k, cache.positions)
            k, v = cache.update(k, v)
        gqa = self.n_kv_heads != self.n_heads
        if gqa and not sdpa_handles_gqa(q):
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            gqa = False
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **({"enable_gqa": True} if gqa else {}))
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask,
                                               **({"enable_gqa": True} if gqa else {}))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)), the Llama FFN."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
