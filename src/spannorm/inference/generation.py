"""Sampling text from a trained model: batched prompts, n samples each, temperature, top-k and top-p, stop
tokens and stop strings, with a KV cache (default) or by re-running the window for every token.

Every row (one sample of one prompt) draws from its own random generator, seeded ``seed + row``, so a row's
tokens do not depend on which other rows share its batch, nor on the cache: cached and uncached generation
give the same tokens (up to floating-point ties). The model sees at most its last ``context_length``
tokens of each row. While a row fits, cached decoding feeds one token per step; once a row outgrows the
context, the cache is rebuilt from each row's last ``context_length`` tokens, which is then as slow as
uncached generation and gives the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from spannorm.inference.kv_cache import KVCache, kv_cache
from spannorm.model.transformer import DecoderLM


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits: greedy when ``temperature`` is 0; otherwise softmax of
    logits / temperature restricted to the ``top_k`` most likely tokens (None: all), then to the smallest set
    whose probability reaches ``top_p`` (1: all)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature != float("inf")):
            raise ValueError(f"temperature={self.temperature} is invalid: allowed a finite number >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} is invalid: allowed None or an integer >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is invalid: allowed 0 < top_p <= 1")


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """``logits`` (rows, vocab) divided by the temperature, with every token outside top-k and top-p set to
    -inf. Top-p keeps a token when the probability of the tokens more likely than it is below ``top_p``."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling,
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (rows, vocab); row r draws from ``generators[r]`` (on the CPU)."""
    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    probs = filter_logits(logits, sampling).softmax(dim=-1).cpu()
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators)]


@dataclass
class Completion:
    """What one row generated: ``tokens`` are the new tokens only. ``stop`` says why it ended: ``length``
    (max_new_tokens reached), ``token`` (a stop token, which is kept as the last token) or ``string`` (a
    stop string appeared in the decoded new tokens)."""

    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    stop: str = "length"


@dataclass
class Generation:
    completions: list[Completion]
    """Prompt by prompt, sample by sample."""
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class _Row:
    ids: list[int]
    """Prompt and generated tokens so far."""
    completion: Completion
    generator: torch.Generator | None


class _Stops:
    """Decides whether a row stops after its newest token."""

    def __init__(self, stop_tokens: Sequence[int], stop_strings: Sequence[str],
                 decode: Callable[[list[int]], str] | None):
        if stop_strings and decode is None:
            raise ValueError("stop strings need a decode function")
        self.tokens = {int(t) for t in stop_tokens}
        self.strings = [s for s in stop_strings if s]
        self.decode = decode
        # A stop string of b bytes lies within the last b tokens (every token has at least one byte), +1
        # for a multi-byte character split at the start of the slice.
        self.window = max((len(s.encode("utf-8")) for s in self.strings), default=0) + 1

    def reason(self, completion: Completion) -> str | None:
        if completion.tokens[-1] in self.tokens:
            return "token"
        if self.strings:
            assert self.decode is not None  # __init__ refuses stop strings without a decode function
            tail = self.decode(completion.tokens[-self.window:])
            if any(s in tail for s in self.strings):
                return "string"
        return None


@torch.no_grad()
def generate_batch(model: DecoderLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   sampling: Sampling = Sampling(), *, n: int = 1, seed: int = 0,
                   stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (),
                   decode: Callable[[list[int]], str] | None = None, use_cache: bool = True,
                   batch_size: int | None = None,
                   generators: Sequence[torch.Generator | None] | None = None) -> Generation:
    """Continue every prompt ``n`` times by up to ``max_new_tokens`` tokens.

    Rows run together in batches of ``batch_size`` rows (default: all). Row ``r = prompt·n + sample`` draws
    from a generator seeded ``seed + r``, or from ``generators[r]`` when given. ``stop_strings`` need
    ``decode`` (token ids to text)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if n < 1 or max_new_tokens < 0:
        raise ValueError(f"n={n}, max_new_tokens={max_new_tokens} are invalid: allowed n >= 1, max_new_tokens >= 0")
    stops = _Stops(stop_tokens, stop_strings, decode)
    rows: list[_Row] = []
    for p, prompt in enumerate(prompts):
        for s in range(n):
            r = len(rows)
            generator = generators[r] if generators is not None else torch.Generator().manual_seed(seed + r)
            rows.append(_Row([int(t) for t in prompt], Completion(p, s), generator))
    batch_size = batch_size or len(rows)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            if use_cache:
                _run_cached(model, chunk, max_new_tokens, sampling, stops)
            else:
                by_length: dict[int, list[_Row]] = {}
                for row in chunk:
                    by_length.setdefault(len(row.ids), []).append(row)
                for group in by_length.values():
                    _run_uncached(model, group, max_new_tokens, sampling, stops)
        if rows and next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    completions = [row.completion for row in rows]
    return Generation(completions, sum(len(c.tokens) for c in completions), seconds)


def _append(rows: list[_Row], tokens: list[int], stops: _Stops, max_new_tokens: int) -> list[int]:
    """Append one token to each row; return the indices (into ``rows``) of the rows that go on."""
    going = []
    for i, (row, token) in enumerate(zip(rows, tokens)):
        row.ids.append(token)
        row.completion.tokens.append(token)
        reason = stops.reason(row.completion)
        if reason is not None:
            row.completion.stop = reason
        elif len(row.completion.tokens) < max_new_tokens:
            going.append(i)
    return going


def _run_uncached(model: DecoderLM, rows: list[_Row], max_new_tokens: int, sampling: Sampling,
                  stops: _Stops) -> None:
    """Rows of equal length, stepped together; every step re-runs the last ``context_length`` tokens."""
    device = next(model.parameters()).device
    context = model.cfg.context_length
    while rows and max_new_tokens > 0:
        ids = torch.tensor([row.ids[-context:] for row in rows], dtype=torch.long, device=device)
        logits = model(ids).logits[:, -1, :]
        going = _append(rows, next_tokens(logits, sampling, [r.generator for r in rows]), stops, max_new_tokens)
        rows = [rows[i] for i in going]


def _prefill(model: DecoderLM, rows: list[_Row], cache: KVCache) -> torch.Tensor:
    """Feed each row's last ``capacity`` tokens, left-padded to the longest; the logits after each row."""
    windows = [row.ids[-cache.capacity:] for row in rows]
    width = max(len(w) for w in windows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, window in enumerate(windows):
        ids[i, width - len(window):] = torch.tensor(window)
        valid[i, width - len(window):] = True
    return cache.feed(ids.to(cache.device), valid.to(cache.device)).logits[:, -1, :]


def _run_cached(model: DecoderLM, rows: list[_Row], max_new_tokens: int, sampling: Sampling,
                stops: _Stops) -> None:
    """Prefill every row at once, then decode one token per step; rebuild the cache when it is full."""
    device = next(model.parameters()).device
    while rows and max_new_tokens > 0:
        with kv_cache(model, batch_size=len(rows)) as cache:
            logits = _prefill(model, rows, cache)
            while True:
                tokens = next_tokens(logits, sampling, [r.generator for r in rows])
                going = _append(rows, tokens, stops, max_new_tokens)
                if len(going) < len(rows):
                    rows = [rows[i] for i in going]
                    if not rows:
                        return
                    cache.select(going)
                if cache.length == cache.capacity:
                    break  # rebuild from each row's last context_length tokens
                last = torch.tensor([[row.ids[-1]] for row in rows], dtype=torch.long, device=device)
                logits = cache.feed(last).logits[:, -1, :]


def generate(model: DecoderLM, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None, *, top_p: float = 1.0,
             use_cache: bool = True) -> list[int]:
    """Continue one prompt by ``max_new_tokens`` tokens; returns only the new tokens. ``temperature`` 0 is
    greedy decoding; ``generator`` None draws from torch's global generator."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    result = generate_batch(model, [prompt_ids], max_new_tokens, Sampling(temperature, top_k, top_p),
                            use_cache=use_cache, generators=[generator])
    return result.completions[0].tokens
