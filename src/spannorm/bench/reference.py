"""The Hugging Face reference of the benchmark: a ``LlamaForCausalLM`` of the same size as a ``pre`` model.

Same width, depth, heads, key/value heads, SwiGLU width, vocabulary, context, norm epsilon, RoPE base and
tied/untied head, so that both models hold the same parameters and do the same matmuls per token.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.config import ModelConfig


def transformers_available() -> bool:
    """True when the ``transformers`` package can be imported."""
    return importlib.util.find_spec("transformers") is not None


def hf_llama_config(cfg: ModelConfig):
    """A ``transformers.LlamaConfig`` matching ``cfg`` (RMSNorm, no biases, dense SwiGLU FFN)."""
    from transformers import LlamaConfig  # optional dependency: the 'hf' extra

    if cfg.moe is not None or cfg.norm != "rms" or cfg.bias:
        raise ValueError("the Llama reference exists only for dense, bias-free RMSNorm models")
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, use_cache=False,
    )
    # transformers 5 takes the RoPE base inside ``rope_parameters``; 4.x takes ``rope_theta``.
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        kwargs["rope_theta"] = cfg.rope_theta
    return LlamaConfig(**kwargs)


class HFLlamaLM(nn.Module):
    """``LlamaForCausalLM`` behind the benchmark's step interface: ``forward(idx, targets)`` returns the mean
    next-token cross-entropy on fp32 logits, computed exactly as :class:`spannorm.model.DecoderLM` does."""

    def __init__(self, cfg: ModelConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import LlamaForCausalLM  # optional dependency: the 'hf' extra

        hf_cfg = hf_llama_config(cfg)
        hf_cfg._attn_implementation = attn_implementation
        self.llama = LlamaForCausalLM(hf_cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.llama(input_ids=idx, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
