"""The study's per-layer summary (spannorm.experiments.layer_stats): ResiDual's two streams are both recorded,
each under its own name, and the values are the moments of the streams the blocks really produce."""

from __future__ import annotations

import pytest
import torch

from spannorm.config import ModelConfig
from spannorm.experiments.layer_stats import DUAL_STATS, STREAM_STATS, measure_layer_stats
from spannorm.model import DecoderLM


def _model(placement: str, n_layers: int = 3) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(d_model=32, n_heads=2, n_layers=n_layers, context_length=8, vocab_size=64,
                                 placement=placement))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def _by_hand(model: DecoderLM, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x_l, d_l) for l = 0 … L, from the blocks called one by one (d_0 = x_0)."""
    with torch.no_grad():
        x = model.hook_embed(model.embed(inputs) * model.cfg.embedding_multiplier)
        stream = (x, x)
        out = [stream]
        for block in model.blocks:
            stream = block(stream)
            out.append(stream)
    return out


def test_residual_records_its_dual_stream_beside_the_post_ln_stream():
    model = _model("residual")
    inputs, targets = _batch()
    stats = measure_layer_stats(model, inputs, targets)
    pairs = _by_hand(model, inputs)
    for key in (*STREAM_STATS, *DUAL_STATS):
        assert len(stats[key]) == model.cfg.n_layers + 1, key
    for layer, (x, d) in enumerate(pairs):
        assert stats["variance"][layer] == pytest.approx(x.var(dim=-1, unbiased=False).mean().item(), rel=1e-5)
        assert stats["dual_variance"][layer] == pytest.approx(d.var(dim=-1, unbiased=False).mean().item(), rel=1e-5)
        assert stats["dual_max_abs"][layer] == pytest.approx(d.abs().max().item(), rel=1e-5)
    # d_0 is x_0; afterwards x_l is the Post-LN stream (unit RMS) while d_l only accumulates branch outputs
    assert stats["dual_mean_abs"][0] == stats["mean_abs"][0]
    assert all(r == pytest.approx(1.0, abs=0.05) for r in stats["rms"][1:])
    assert stats["dual_rms"][-1] > stats["dual_rms"][0]
    # no branch reads d, so the loss gradient is the same at every d_l after d_0
    assert stats["dual_grad_norm"][1:] == pytest.approx([stats["dual_grad_norm"][-1]] * model.cfg.n_layers)


@pytest.mark.parametrize("placement", ["pre", "span"])
def test_single_stream_placements_have_no_dual_keys(placement):
    model = _model(placement)
    stats = measure_layer_stats(model, *_batch())
    assert not set(DUAL_STATS) & set(stats)
    assert len(stats["rms"]) == model.cfg.n_layers + 1
