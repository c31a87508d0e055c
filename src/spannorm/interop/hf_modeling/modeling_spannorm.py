"""A spannorm model in Hugging Face transformers: every normalization placement, dense or MoE.

Written by ``spannorm export-hf`` next to the weights and loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. It depends on torch and transformers only.
The equations, parameter names and numerics follow spannorm's ``model/placements.py``, ``model/layers.py`` and
``model/moe.py``: norms in fp32, RoPE tables in float64, a softmax router in fp32 with renormalized top-k gates.
Keys and values are kept in a transformers ``Cache`` (``DynamicCache`` by default), so ``generate()`` decodes
one token per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_spannorm import SpanNormConfig

CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
"""transformers 5.25 renamed ``past_key_values`` to ``cache`` (argument and output field); both are accepted."""


# ---------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · w, computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with gain and bias, computed in fp32 and cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.type_as(x)


def make_norm(config: SpanNormConfig, dim: int | None = None) -> nn.Module:
    dim = config.hidden_size if dim is None else dim
    if config.norm == "rms":
        return RMSNorm(dim, config.norm_eps)
    return LayerNorm(dim, eps=config.norm_eps)


# ---------------------------------------------------------------------------------------------- RoPE
def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ^(-2i/d) in float64, rescaled by ``scaling`` (linear, llama3 or yarn), and the
    magnitude that multiplies cos and sin (yarn's attention factor; 1 otherwise)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
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
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        magnitude = scaling.get("attention_factor")
        if magnitude is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            magnitude = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def dimension_of(rotations: float) -> float:
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dimension_of(scaling.get("beta_fast") or 32), dimension_of(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        keep = 1 - ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        return inv_freq / factor * (1 - keep) + inv_freq * keep, float(magnitude)
    raise ValueError(f"rotary_scaling.rope_type={kind!r} is not supported; allowed: linear, llama3, yarn")


def rope_tables(config: SpanNormConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for ``position_ids`` (B, T), shape (B, 1, T, head_dim), fp32."""
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq, magnitude = rope_frequencies(head_dim, config.rotary_theta, config.rotary_scaling)
    angles = position_ids.to(torch.float64)[..., None] * inv_freq.to(position_ids.device)
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * magnitude).float()[:, None], (angles.sin() * magnitude).float()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---------------------------------------------------------------------------------------------- attention
class Context:
    """What every attention layer of one forward pass shares: RoPE tables, the mask and the cache."""

    def __init__(self, cos, sin, mask, is_causal, cache):
        self.cos, self.sin, self.mask, self.is_causal, self.cache = cos, sin, mask, is_causal, cache


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and grouped-query heads; ``qkv_norm`` normalizes Q, K and V per
    head before RoPE (HybridNorm)."""

    def __init__(self, config: SpanNormConfig, layer_idx: int, qkv_norm: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        d, kv_dim = config.hidden_size, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(d, d, bias=config.bias)
        self.qkv_norm = qkv_norm
        if qkv_norm:
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)
            self.v_norm = make_norm(config, self.head_dim)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qkv_norm:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = ctx.cos.to(q.dtype), ctx.sin.to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.layer_idx)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


# ---------------------------------------------------------------------------------------------- FFNs
class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x))."""

    def __init__(self, d_model: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: (E, d, h) for gate and up, (E, h, d) for down."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))


class MoE(nn.Module):
    """Dropless top-k MoE: softmax router in fp32, top-k gates renormalized to sum to 1, each token's output the
    gate-weighted sum of its experts' outputs, plus an always-on shared expert when there is one."""

    def __init__(self, config: SpanNormConfig):
        super().__init__()
        moe = config.moe
        self.n_experts, self.top_k = moe["n_experts"], moe["top_k"]
        self.router = nn.Linear(config.hidden_size, self.n_experts, bias=False)
        self.experts = Experts(self.n_experts, config.hidden_size, moe["expert_hidden"])
        self.shared_expert = (SwiGLU(config.hidden_size, moe["expert_hidden"], config.bias)
                              if moe["shared_expert"] else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.linear(flat.float(), self.router.weight.float()).softmax(dim=-1)
        top_p, expert_idx = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(flat)
        w = self.experts
        for e in range(self.n_experts):
            rows, slot = (expert_idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = flat[rows]
            out = (F.silu(xe @ w.w_gate[e].to(xe.dtype)) * (xe @ w.w_up[e].to(xe.dtype))) @ w.w_down[e].to(xe.dtype)
            y.index_add_(0, rows, out * gates[rows, slot].unsqueeze(-1).to(out.dtype))
        if self.shared_expert is not None:
            y = y + self.shared_expert(flat)
        return y.view(shape)


# ---------------------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    """Shared parts of every placement: attention, FFN and the position-named norms of ``norm_positions``."""

    norm_positions: tuple[str, ...] = ()
    qkv_norm = False
    # The norms of norm_positions, made in __init__ (each subclass has the ones its positions name).
    attn_in_norm: nn.Module
    attn_out_norm: nn.Module
    ffn_in_norm: nn.Module
    ffn_out_norm: nn.Module
    block_out_norm: nn.Module

    def __init__(self, config: SpanNormConfig, layer_idx: int):
        super().__init__()
        self.delta_t = config.delta_t
        self.attn = Attention(config, layer_idx, qkv_norm=self.qkv_norm)
        self.ffn = MoE(config) if config.moe is not None else SwiGLU(config.hidden_size, config.intermediate_size,
                                                                     config.bias)
        for position in self.norm_positions:
            setattr(self, f"{position}_norm", make_norm(config))


class PreBlock(Block):
    """h = x + Δt·A(N₁(x)); x' = h + Δt·F(N₂(h))."""

    norm_positions = ("attn_in", "ffn_in")

    def forward(self, x, ctx):
        h = x + self.delta_t * self.attn(self.attn_in_norm(x), ctx)
        return h + self.delta_t * self.ffn(self.ffn_in_norm(h))


class PostBlock(Block):
    """h = N₁(x + Δt·A(x)); x' = N₂(h + Δt·F(h))."""

    norm_positions = ("attn_out", "ffn_out")

    def forward(self, x, ctx):
        h = self.attn_out_norm(x + self.delta_t * self.attn(x, ctx))
        return self.ffn_out_norm(h + self.delta_t * self.ffn(h))


class PeriBlock(Block):
    """h = x + Δt·N₁ᵒ(A(N₁(x))); x' = h + Δt·N₂ᵒ(F(N₂(h)))."""

    norm_positions = ("attn_in", "attn_out", "ffn_in", "ffn_out")

    def forward(self, x, ctx):
        h = x + self.delta_t * self.attn_out_norm(self.attn(self.attn_in_norm(x), ctx))
        return h + self.delta_t * self.ffn_out_norm(self.ffn(self.ffn_in_norm(h)))


class SpanBlock(Block):
    """a = A(N₁(x)); h = x + a; f = F(N₂(h)); x' = x + Δt·β·Nₒ(a + f) (the stream is never normalized)."""

    norm_positions = ("attn_in", "ffn_in", "block_out")

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.beta = config.span_beta

    def forward(self, x, ctx):
        a = self.attn(self.attn_in_norm(x), ctx)
        f = self.ffn(self.ffn_in_norm(x + a))
        return x + self.delta_t * self.beta * self.block_out_norm(a + f)


class SpanPostBlock(Block):
    """a = A(N₁(x)); h = x + a; f = F(N₂(h)); x' = Nₒ(α·x + β·(a + f))."""

    norm_positions: tuple[str, ...] = ("attn_in", "ffn_in", "block_out")

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.alpha, self.beta = config.span_post_alpha, config.span_post_beta

    def forward(self, x, ctx):
        a = self.attn(self.attn_in_norm(x), ctx)
        f = self.ffn(self.ffn_in_norm(x + a))
        return self.block_out_norm(self.alpha * x + self.beta * (a + f))


class SpanB2TBlock(SpanPostBlock):
    """h = N₁(x + A(x)); f = F(h); x' = Nₒ(α·x + β·(h + f))."""

    norm_positions = ("attn_out", "block_out")

    def forward(self, x, ctx):
        h = self.attn_out_norm(x + self.attn(x, ctx))
        return self.block_out_norm(self.alpha * x + self.beta * (h + self.ffn(h)))


class DeepNormBlock(Block):
    """h = N₁(α·x + A(x)); x' = N₂(α·h + F(h)), α = (2L)^(1/4)."""

    norm_positions = ("attn_out", "ffn_out")

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.alpha = (2 * config.num_hidden_layers) ** 0.25

    def forward(self, x, ctx):
        h = self.attn_out_norm(self.alpha * x + self.attn(x, ctx))
        return self.ffn_out_norm(self.alpha * h + self.ffn(h))


class LNSBlock(PreBlock):
    """``pre`` with each norm output multiplied by 1/sqrt(l+1) (l counts from 0)."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.norm_scale = 1 / math.sqrt(layer_idx + 1)

    def forward(self, x, ctx):
        s = self.norm_scale
        h = x + self.delta_t * self.attn(s * self.attn_in_norm(x), ctx)
        return h + self.delta_t * self.ffn(s * self.ffn_in_norm(h))


class HybridBlock(Block):
    """h = x + A_qkv(x), with Q, K and V normalized per head; x' = N(h) + F(N(h))."""

    norm_positions = ("attn_out",)
    qkv_norm = True

    def forward(self, x, ctx):
        n = self.attn_out_norm(x + self.attn(x, ctx))
        return n + self.ffn(n)


class ResiDualBlock(Block):
    """ResiDual, two streams: a = A(x); h = N₁(x + Δt·a); f = F(h); x' = N₂(h + Δt·f); d' = d + Δt·(a + f).
    The model starts with d = x (the embedding output) and feeds x_L + N(d_L) to the head."""

    norm_positions = ("attn_out", "ffn_out")

    def forward(self, stream, ctx):
        x, d = stream
        a = self.delta_t * self.attn(x, ctx)
        h = self.attn_out_norm(x + a)
        f = self.delta_t * self.ffn(h)
        return self.ffn_out_norm(h + f), d + a + f


BLOCKS = {"pre": PreBlock, "post": PostBlock, "peri": PeriBlock, "span": SpanBlock, "span_post": SpanPostBlock,
          "span_b2t": SpanB2TBlock, "deepnorm": DeepNormBlock, "lns": LNSBlock, "hybrid": HybridBlock,
          "residual": ResiDualBlock}
DUAL_STREAM = ("residual",)
"""Placements whose blocks carry the pair (x, d); a model uses them on every layer or on none."""


# ---------------------------------------------------------------------------------------------- the model
class SpanNormPreTrainedModel(PreTrainedModel):
    config_class = SpanNormConfig
    base_model_prefix = "spannorm"
    _no_split_modules = [cls.__name__ for cls in BLOCKS.values()]
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        """Only for weights a checkpoint lacks (an exported folder has them all)."""
        bias = getattr(module, "bias", None)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(module, (RMSNorm, LayerNorm)):
            nn.init.ones_(module.weight)
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(module, Experts):
            for w in (module.w_gate, module.w_up, module.w_down):
                nn.init.normal_(w, std=0.02)


class SpanNormForCausalLM(SpanNormPreTrainedModel, GenerationMixin):
    """Embedding (times the multiplier, optionally normalized), the placement blocks, an optional final norm,
    and the head (the embedding matrix when tied)."""

    def __init__(self, config: SpanNormConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_norm = make_norm(config) if config.embed_norm else None
        self.blocks = nn.ModuleList(BLOCKS[placement](config, layer)
                                    for layer, placement in enumerate(config.layer_placements))
        self.final_norm = make_norm(config) if config.final_norm else None
        dual = any(placement in DUAL_STREAM for placement in config.layer_placements)
        self.dual_final_norm = make_norm(config) if dual else None  # ResiDual's norm of d_L
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                    bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    def _attention_mask(self, attention_mask, T: int, past: int, device) -> tuple[torch.Tensor | None, bool]:
        """The boolean mask (B or 1, 1, T, past + T) SDPA needs, or None with is_causal where a plain causal
        mask does. Keys are visible when causal, inside the sliding window (if any) and not padding; each
        query always sees itself, so that rows of left padding stay finite."""
        S = past + T
        window = self.config.attention_window
        padded = attention_mask is not None and not bool(attention_mask[:, :S].all())
        if not padded and (window is None or S <= window):
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed = allowed & (k_pos > q_pos - window)
        allowed = allowed[None, None]
        if padded:
            allowed = (allowed & attention_mask[:, None, None, :S].bool()) | (k_pos == q_pos)[None, None]
        return allowed, False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                return_dict=None, **kwargs) -> CausalLMOutputWithPast:
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        past_key_values = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        x = inputs_embeds * self.config.embedding_multiplier
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        T = x.shape[1]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None and attention_mask is not None:  # left padding: count only real tokens
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]
        cos, sin = rope_tables(self.config, position_ids.to(x.device))
        mask, is_causal = self._attention_mask(attention_mask, T, past, x.device)
        ctx = Context(cos, sin, mask, is_causal, cache)
        stream = x if self.dual_final_norm is None else (x, x)  # ResiDual: the pair (x, d), d_0 = x_0
        for block in self.blocks:
            stream = block(stream, ctx)
        x = stream if self.dual_final_norm is None else stream[0] + self.dual_final_norm(stream[1])
        if self.final_norm is not None:
            x = self.final_norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head.to(x.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
