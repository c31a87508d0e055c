"""Initial loss on uniformly random tokens (forward only), with the tied head of before and the untied head
under each ``head_init`` (``half`` is the default), for every placement and for the GPT-2-small shape. Prints
the figures of docs/training.md ("The head and the initial loss"). Usage:

    OMP_NUM_THREADS=1 python benchmarks/initial_loss.py
"""

from __future__ import annotations

import dataclasses
import math

import torch

from spannorm.config import ModelConfig
from spannorm.model.placements import placement_names
from spannorm.model.transformer import DecoderLM


def initial_loss(cfg: ModelConfig, seeds: tuple[int, ...], batch: int, seq_len: int) -> float:
    """Mean over ``seeds`` of the cross-entropy at init (model seeded with the seed, tokens with 1000 + seed)."""
    losses = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = DecoderLM(cfg).eval()
        gen = torch.Generator().manual_seed(1000 + seed)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
        with torch.no_grad():
            losses.append(model(tokens[:, :-1], tokens[:, 1:]).loss.item())
    return sum(losses) / len(losses)


def main() -> None:
    print(f"d=64, 12 blocks, V=256 (ln V = {math.log(256):.3f}); mean of seeds 0-2, 4 x 64 tokens\n")
    print("| placement | tied (before) | untied, `half` (default) | untied, `small` | untied, `fan_in` |")
    print("|---|---|---|---|---|")
    for placement in placement_names():
        cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=12, n_heads=4, context_length=64,
                          placement=placement)
        losses = [initial_loss(dataclasses.replace(cfg, tie_embeddings=True), (0, 1, 2), 4, 64)]
        losses += [initial_loss(dataclasses.replace(cfg, head_init=h), (0, 1, 2), 4, 64)
                   for h in ("half", "small", "fan_in")]
        print(f"| `{placement}` | " + " | ".join(f"{v:.3f}" for v in losses) + " |", flush=True)
    cfg = ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, context_length=1024)
    print(f"\nGPT-2-small shape, d=768, 12 blocks, V=50257 (ln V = {math.log(50257):.3f}); seed 0, 128 tokens")
    for label, kw in (("tied", dict(tie_embeddings=True)), ("half", {}), ("small", dict(head_init="small")),
                      ("fan_in", dict(head_init="fan_in"))):
        loss = initial_loss(dataclasses.replace(cfg, **kw), (0,), 1, 128)
        print(f"{label}: {loss:.3f}", flush=True)


if __name__ == "__main__":
    main()
