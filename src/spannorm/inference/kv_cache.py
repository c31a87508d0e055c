"""A key/value cache for our own models, installed on the attention modules from outside.

The model and its blocks do not know about the cache: :func:`kv_cache` sets ``attn.kv_cache`` on every
:class:`~spannorm.model.layers.CausalSelfAttention` of the model for the duration of a ``with`` block, and
removes it afterwards. Inside, :meth:`KVCache.feed` runs the model on new tokens only:

    with kv_cache(model, batch_size=2) as cache:
        logits = cache.feed(prompt_ids, valid).logits      # prefill: every prompt token at once
        logits = cache.feed(next_ids[:, None]).logits      # decode: one token per row

Rows of a batch may have prompts of different lengths: they are left-padded, and ``valid`` (False on the
padding) keeps every real token from attending to a pad. Each row's positions count its real tokens only,
so a padded row is rotated exactly as the same prompt alone would be. A pad attends to itself only (so its
softmax is never empty) and nothing attends to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from spannorm.model.layers import CausalSelfAttention
from spannorm.model.transformer import DecoderLM


class LayerKVCache:
    """The keys and values of one attention layer: (batch, kv_heads, capacity, head_dim) buffers, allocated
    on the first update in the dtype and on the device the layer computes in."""

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def positions(self) -> torch.Tensor:
        return self.owner.positions

    @property
    def mask(self) -> torch.Tensor | None:
        return self.owner.mask

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.owner.length, self.owner.length + k.shape[2]
        keys, values = self.k, self.v
        if keys is None or values is None:
            B, H, _, D = k.shape
            keys = self.k = k.new_empty(B, H, self.owner.capacity, D)
            values = self.v = v.new_empty(B, H, self.owner.capacity, D)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class KVCache:
    """The cache of a whole model for one batch: per-layer keys and values, how many tokens are cached
    (``length``), which cached tokens are real (``valid``, False on left padding) and each row's next
    position. ``capacity`` (at most the model's context length) bounds ``length``."""

    def __init__(self, model: DecoderLM, batch_size: int, capacity: int | None = None):
        context = model.cfg.context_length
        capacity = context if capacity is None else capacity
        if not 1 <= capacity <= context:
            raise ValueError(f"KV cache capacity {capacity} is invalid: allowed 1 to the model's context "
                             f"length {context}")
        self.model, self.capacity = model, capacity
        self.device = next(model.parameters()).device
        self.length = 0
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=self.device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        self.mask: torch.Tensor | None = None
        self.layers: list[LayerKVCache] = []

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def feed(self, ids: torch.Tensor, valid: torch.Tensor | None = None):
        """Run the model on ``ids`` (batch, T), the tokens that follow the cached ones, and cache their keys
        and values; returns the model's output for these T tokens. ``valid`` (batch, T) is False on left
        padding (default: every token is real)."""
        B, T = ids.shape
        if B != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} rows, the input has {B}")
        if self.length + T > self.capacity:
            raise ValueError(f"{self.length} cached + {T} new tokens exceed the cache capacity {self.capacity}")
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=self.device)
        start, end = self.length, self.length + T
        self.valid[:, start:end] = valid
        steps = valid.long().cumsum(dim=1)
        self.positions = (self.next_position[:, None] + steps - 1).clamp(min=0)
        self.mask = self._mask(start, end)
        out = self.model(ids)
        self.next_position = self.next_position + steps[:, -1]
        self.length = end
        return out

    def _mask(self, start: int, end: int) -> torch.Tensor | None:
        """(batch, 1, T, end): query i (absolute column start+i) attends to key j when j <= start+i and key j
        is real, or when j is i itself. None when that is every key (one new token, no padding)."""
        keys_valid = self.valid[:, :end]
        if end - start == 1 and bool(keys_valid.all()):
            return None
        query_col = torch.arange(start, end, device=self.device)[:, None]
        key_col = torch.arange(end, device=self.device)[None, :]
        causal = key_col <= query_col
        mask = (causal & keys_valid[:, None, :]) | (key_col == query_col)
        return mask[:, None]

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only ``rows`` of the batch (in that order), for example once other rows have stopped."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.valid, self.next_position = self.valid[rows], self.next_position[rows]
        for layer in self.layers:
            layer.select(rows)


@contextmanager
def kv_cache(model: DecoderLM, batch_size: int, capacity: int | None = None) -> Iterator[KVCache]:
    """Install a fresh :class:`KVCache` on every attention module of ``model`` for the ``with`` block."""
    attentions = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    if any(a.kv_cache is not None for a in attentions):
        raise RuntimeError("a KV cache is already installed on this model")
    cache = KVCache(model, batch_size, capacity)
    try:
        for attention in attentions:
            layer = LayerKVCache(cache)
            cache.layers.append(layer)
            attention.kv_cache = layer
        yield cache
    finally:
        for attention in attentions:
            attention.kv_cache = None
