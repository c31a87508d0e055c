"""Log-likelihood scoring of token sequences: the continuation of a context, and a whole text in rolling
windows. This is what downstream multiple-choice and perplexity tasks ask of a model (see
:mod:`spannorm.inference.lm_eval_adapter`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def score_windows(model: nn.Module, windows: Sequence[tuple[Sequence[int], Sequence[int]]],
                  batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each ``(inputs, targets)``, the summed log-probability of ``targets`` as the predictions of the last
    ``len(targets)`` positions of ``inputs``, and whether each target is the argmax there (greedy).

    ``inputs`` is at most ``context_length`` tokens; empty ``targets`` score (0.0, True). Rows are batched
    longest first and right-padded: causal attention keeps the padding from reaching the scored positions."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    order = sorted((i for i in range(len(windows)) if windows[i][1]), key=lambda i: -len(windows[i][0]))
    try:
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            width = len(windows[chunk[0]][0])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                inputs = windows[i][0]
                ids[row, :len(inputs)] = torch.tensor(list(inputs), dtype=torch.long)
            logits = model(ids.to(device)).logits.float()
            for row, i in enumerate(chunk):
                inputs, targets = windows[i]
                n, end = len(targets), len(inputs)
                logprobs = F.log_softmax(logits[row, end - n:end], dim=-1)
                target = torch.tensor(list(targets), dtype=torch.long, device=device)
                total = float(logprobs.gather(-1, target[:, None]).sum())
                results[i] = (total, bool((logprobs.argmax(dim=-1) == target).all()))
    finally:
        model.train(was_training)
    return results


def continuation_window(context: Sequence[int], continuation: Sequence[int],
                        context_length: int) -> tuple[list[int], list[int]]:
    """The model input and targets that score ``continuation`` after ``context`` (non-empty): the last
    ``context_length`` tokens before each continuation token, the context cut from the left when too long."""
    sequence = (list(context) + list(continuation))[-(context_length + 1):]
    inputs = sequence[:-1]
    return inputs, list(continuation)[-len(inputs):]


def rolling_windows(tokens: Sequence[int], prefix: int, context_length: int) -> list[tuple[list[int], list[int]]]:
    """Windows that predict every token of ``tokens`` exactly once, the first after ``prefix``: disjoint
    blocks of ``context_length`` predictions, except the last, which takes a full window of context and
    scores only its new tokens."""
    sequence = [prefix] + list(tokens)
    windows = []
    for start in range(0, len(tokens), context_length):
        end = min(start + context_length, len(tokens))
        first_input = max(0, end - context_length)
        windows.append((sequence[first_input:end], list(tokens[start:end])))
    return windows
