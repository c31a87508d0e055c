"""The attention kernel chosen per device and dtype: the math kernel for bf16 on CPUs (measured faster, see
docs/benchmarks.md), SDPA's own choice elsewhere, and the model's attention really runs in it."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from spannorm.config import ModelConfig
from spannorm.model.layers import SDPA_BACKENDS, CausalSelfAttention, sdpa_backend


def test_table_picks_math_for_cpu_bf16_only():
    assert SDPA_BACKENDS == {("cpu", torch.bfloat16): SDPBackend.MATH}
    assert isinstance(sdpa_backend(torch.zeros(1, dtype=torch.float32)), nullcontext)
    assert not isinstance(sdpa_backend(torch.zeros(1, dtype=torch.bfloat16)), nullcontext)


def _attention_with(backend: SDPBackend | None, dtype: torch.dtype) -> torch.Tensor:
    """The attention layer's output, with every SDPA call forced into ``backend`` (None: the model's choice)."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4,
                                            context_length=8))
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if backend is None:
            return layer(x)
        original = F.scaled_dot_product_attention

        def forced(*args, **kwargs):
            with sdpa_kernel(backend):
                return original(*args, **kwargs)

        F.scaled_dot_product_attention = forced
        try:
            return layer(x)
        finally:
            F.scaled_dot_product_attention = original


def test_bf16_attention_runs_in_the_math_kernel_and_fp32_in_sdpas_choice():
    bf16 = _attention_with(None, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, _attention_with(SDPBackend.MATH, torch.bfloat16))
    assert not torch.equal(bf16, _attention_with(SDPBackend.FLASH_ATTENTION, torch.bfloat16))
    fp32 = _attention_with(None, torch.float32)
    assert torch.equal(fp32, _attention_with(SDPBackend.FLASH_ATTENTION, torch.float32))
