"""Validation loss, perplexity and bits per byte of a model on a token split, in one process or split across
the processes of a torchrun launch."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from spannorm.data.dataset import eval_window_starts, window_batch
from spannorm.data.shards import TokenStream
from spannorm.train.distributed import SingleProcess


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


def rank_share(n_windows: int, batch_size: int, rank: int, world_size: int) -> tuple[slice, int, int]:
    """Process ``rank``'s share of ``n_windows`` evaluation windows: (its contiguous slice of them, its batch
    size ``ceil(batch_size / world_size)``, the number of batches every process runs). Shares differ by at
    most one window; a process whose share is used up runs its last batches only to keep in step."""
    local_batch = -(-batch_size // world_size)
    sizes = [len(part) for part in np.array_split(np.arange(n_windows), world_size)]
    first = sum(sizes[:rank])
    rounds = -(-sizes[0] // local_batch) if n_windows else 0  # array_split puts the larger shares first
    return slice(first, first + sizes[rank]), local_batch, rounds


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: TokenStream, context_length: int, batch_size: int,
             max_batches: int | None = None, bytes_per_token: float = 1.0, device: torch.device | str = "cpu",
             precision: str = "fp32", parallel: SingleProcess | None = None) -> EvalResult:
    """Loss over fixed, evenly spaced, non-overlapping windows of ``tokens`` (all of them when
    ``max_batches`` is None). Bits per byte = loss / ln 2 / bytes_per_token (1 for the byte tokenizer).

    Under data parallelism (``parallel``, every process calls it) each process scores a contiguous share of
    the windows (:func:`rank_share`) in batches of ``batch_size / world_size``, and the summed losses and
    token counts are all-reduced, so every process returns the single-process result up to the order of
    floating-point sums. Every process runs the same number of forwards (FSDP2 gathers weights in each):
    one whose share is used up scores a window again and does not count it."""
    device = torch.device(device)
    parallel = parallel if parallel is not None else SingleProcess()
    starts = eval_window_starts(tokens, context_length, batch_size, max_batches)
    share, local_batch, rounds = rank_share(len(starts), batch_size, parallel.rank, parallel.world_size)
    mine = starts[share]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(rounds):
            picked = mine[i * local_batch:(i + 1) * local_batch]
            counted = len(picked) > 0
            inputs, targets = window_batch(tokens, picked if counted else starts[:1], context_length)
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast_context(device, precision):
                out = model(inputs, targets)
            if counted:
                n = targets.numel()
                total += float(out.loss) * n
                count += n
    finally:
        model.train(was_training)
    total, summed_count = parallel.sum_over_ranks(total, count)
    count = int(summed_count)
    if count == 0:
        raise ValueError(f"no evaluation window of {context_length + 1} tokens in {len(tokens)} tokens")
    loss = total / count
    return EvalResult(loss=loss, perplexity=perplexity(loss),
                      bits_per_byte=loss / math.log(2) / bytes_per_token, tokens=count)
