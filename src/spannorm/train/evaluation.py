"""Validation loss, perplexity and bits per byte of a model on a token split."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from spannorm.data.dataset import eval_batches
from spannorm.data.shards import TokenStream


@dataclass
class EvalResult:
    """Mean next-token loss (nats) over ``tokens`` predicted tokens, its perplexity and bits per byte."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int

    def to_dict(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}ppl": self.perplexity,
                f"{prefix}bpb": self.bits_per_byte, f"{prefix}tokens": self.tokens}


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA for ``precision="bf16"``; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: TokenStream, context_length: int, batch_size: int,
             max_batches: int | None = None, bytes_per_token: float = 1.0, device: torch.device | str = "cpu",
             precision: str = "fp32") -> EvalResult:
    """Loss over fixed, evenly spaced, non-overlapping windows of ``tokens`` (all of them when
    ``max_batches`` is None). Bits per byte = loss / ln 2 / bytes_per_token (1 for the byte tokenizer)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets in eval_batches(tokens, context_length, batch_size, max_batches):
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast_context(device, precision):
                out = model(inputs, targets)
            n = targets.numel()
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"no evaluation window of {context_length + 1} tokens in {len(tokens)} tokens")
    loss = total / count
    return EvalResult(loss=loss, perplexity=perplexity(loss),
                      bits_per_byte=loss / math.log(2) / bytes_per_token, tokens=count)
