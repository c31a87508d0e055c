"""Analytic parameter counts and FLOPs per token, computed from the config alone."""

from __future__ import annotations

from dataclasses import dataclass

from spannorm.config import ModelConfig
from spannorm.model.placements import BLOCKS, has_dual_stream, has_final_norm


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """Every parameter."""
    active: int
    """Parameters used per token: for MoE, only top_k of the routed experts."""
    embedding: int
    """Token embedding (and the untied head, if any)."""


def _norm_params(cfg: ModelConfig, dim: int) -> int:
    return dim * (2 if cfg.norm == "layer" else 1)


def _swiglu_params(cfg: ModelConfig, hidden: int) -> int:
    d = cfg.d_model
    return 3 * d * hidden + (2 * hidden + d if cfg.bias else 0)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    attention = 2 * d * d + 2 * d * kv_dim + ((2 * d + 2 * kv_dim) if cfg.bias else 0)
    if cfg.moe is None:
        ffn_total = ffn_active = _swiglu_params(cfg, cfg.ffn_hidden)
    else:
        h, moe = cfg.expert_hidden, cfg.moe
        router = d * moe.n_experts
        shared = _swiglu_params(cfg, h) if moe.shared_expert else 0
        ffn_total = router + moe.n_experts * 3 * d * h + shared
        ffn_active = router + moe.top_k * 3 * d * h + shared
    total = active = embedding
    for placement in cfg.layer_placements():
        block_cls = BLOCKS[placement]
        norms = len(block_cls.norm_positions) * _norm_params(cfg, d)
        if block_cls.qkv_norm:
            norms += 3 * _norm_params(cfg, cfg.head_dim)
        total += attention + ffn_total + norms
        active += attention + ffn_active + norms
    extra = _norm_params(cfg, d) * (int(has_final_norm(cfg)) + int(cfg.embed_norm) + int(has_dual_stream(cfg)))
    return ParamCounts(total=total + extra, active=active + extra, embedding=embedding)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6 per active matmul weight, the LM head included, plus
    12·L·d·T for attention scores and values (the PaLM / nanoGPT convention, which does not halve for the
    causal mask). Norms, activations and the router softmax are not counted."""
    T = cfg.context_length if seq_len is None else seq_len
    return 6 * _matmul_params(cfg) + 12 * cfg.n_layers * cfg.d_model * T


def _matmul_params(cfg: ModelConfig) -> int:
    """Active weights that take part in a matmul per token, the head included, the lookup excluded."""
    d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
    attention = 2 * d * d + 2 * d * kv_dim
    if cfg.moe is None:
        ffn = 3 * d * cfg.ffn_hidden
    else:
        h, moe = cfg.expert_hidden, cfg.moe
        ffn = d * moe.n_experts + moe.top_k * 3 * d * h + (3 * d * h if moe.shared_expert else 0)
    return cfg.n_layers * (attention + ffn) + cfg.vocab_size * d
