"""Logit parity against Hugging Face transformers (the optional ``hf`` extra)."""

from __future__ import annotations

import os

import torch

from spannorm.interop.errors import require_transformers
from spannorm.model.transformer import DecoderLM


def load_hf_model(hf_dir: str | os.PathLike, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained(hf_dir)`` in fp32, eval mode. ``trust_remote_code``: run the
    modeling code in the folder (a spannorm remote-code export)."""
    transformers = require_transformers()
    hf_logging = transformers.utils.logging
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code)
        return model.float().eval()
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def max_logit_difference(model: DecoderLM, hf_dir: str | os.PathLike, *, batch: int = 2,
                         seq_len: int | None = None, seed: int = 0, trust_remote_code: bool = False) -> float:
    """max |our logits - HF logits| over random tokens, both models in fp32. ``seq_len`` defaults to
    min(context_length, 64)."""
    hf_model = load_hf_model(hf_dir, trust_remote_code)
    cfg = model.cfg
    seq_len = min(cfg.context_length, 64) if seq_len is None else seq_len
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    was_training = model.training
    model.eval()
    try:
        ours = model(idx.to(next(model.parameters()).device)).logits.float().cpu()
    finally:
        model.train(was_training)
    theirs = hf_model(input_ids=idx, use_cache=False).logits.float()
    return (ours - theirs).abs().max().item()
