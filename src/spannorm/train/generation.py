"""Sampling text from a trained model: temperature and top-k, one token at a time (no KV cache)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Continue ``prompt_ids`` by ``max_new_tokens`` tokens; returns only the new tokens.

    ``temperature`` 0 is greedy decoding. The model sees at most its last ``context_length`` tokens."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    device = next(model.parameters()).device
    context = model.cfg.context_length
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            logits = model(ids[:, -context:]).logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
            ids = torch.cat([ids, next_id], dim=1)
            new.append(int(next_id))
    finally:
        model.train(was_training)
    return new
