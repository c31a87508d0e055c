"""The tensor names of a Hugging Face Llama-style checkpoint and of a ``pre`` DecoderLM, side by side.

Qwen2 and Mistral use Llama's names. Our ``pre`` block's ``attn_in_norm`` is Llama's ``input_layernorm`` and
its ``ffn_in_norm`` is Llama's ``post_attention_layernorm`` (the norm in front of the MLP).
"""

from __future__ import annotations

import re

TOP_LEVEL = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
"""spannorm name -> HF name, outside the blocks."""

PER_LAYER = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "ffn.gate_proj": "mlp.gate_proj",
    "ffn.up_proj": "mlp.up_proj",
    "ffn.down_proj": "mlp.down_proj",
    "attn_in_norm": "input_layernorm",
    "ffn_in_norm": "post_attention_layernorm",
}
"""spannorm module path inside ``blocks.{l}`` -> HF module path inside ``model.layers.{l}``."""

IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
"""Buffers some older HF checkpoints store; recomputed from rope_theta, never read."""

_OURS = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_THEIRS = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TO_OURS = {hf: ours for ours, hf in PER_LAYER.items()}
_TO_OURS_TOP = {hf: ours for ours, hf in TOP_LEVEL.items()}


def to_hf(name: str) -> str:
    """The HF name of one of our ``pre`` model's tensors (KeyError for a tensor Llama does not have)."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    match = _OURS.match(name)
    if match is None or match.group(2) not in PER_LAYER:
        raise KeyError(name)
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{PER_LAYER[module]}.{kind}"


def from_hf(name: str) -> str | None:
    """Our name for an HF tensor, or None when a Llama-style ``pre`` model has no such tensor."""
    if name in _TO_OURS_TOP:
        return _TO_OURS_TOP[name]
    match = _THEIRS.match(name)
    if match is None or match.group(2) not in _TO_OURS:
        return None
    layer, module, kind = match.groups()
    return f"blocks.{layer}.{_TO_OURS[module]}.{kind}"
