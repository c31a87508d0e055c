"""Each placement's block equals a hand-written reference of SPEC §2's equation, built from the same
sub-modules; the sub-modules themselves equal hand-written references; per-layer overrides resolve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spannorm import ModelConfig, MoEConfig, SpanNormLM
from spannorm.config import BLOCK_PLACEMENTS, ConfigError
from spannorm.model.placements import BLOCKS, deepnorm_constants, span_post_constants

D, H, T = 32, 4, 12
EPS = 1e-6  # ModelConfig.norm_eps, the default _cfg keeps


def _cfg(placement: str, **kw) -> ModelConfig:
    base = dict(d_model=D, n_heads=H, n_layers=4, context_length=T, placement=placement, delta_t=0.7)
    base.update(kw)
    return ModelConfig(**base)


def _randomize_norms(model: torch.nn.Module) -> None:
    """Give every norm a non-trivial gain (and bias) so that a norm in the wrong position shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


# References: SPEC §2 written out with the block's own sub-modules A (attn), F (ffn) and named norms.
def ref_pre(b, x):
    h = x + b.delta_t * b.attn(b.attn_in_norm(x))
    return h + b.delta_t * b.ffn(b.ffn_in_norm(h))


def ref_post(b, x):
    h = b.attn_out_norm(x + b.delta_t * b.attn(x))
    return b.ffn_out_norm(h + b.delta_t * b.ffn(h))


def ref_peri(b, x):
    h = x + b.delta_t * b.attn_out_norm(b.attn(b.attn_in_norm(x)))
    return h + b.delta_t * b.ffn_out_norm(b.ffn(b.ffn_in_norm(h)))


def ref_span(b, x):
    a = b.attn(b.attn_in_norm(x))
    h = x + a
    f = b.ffn(b.ffn_in_norm(h))
    return b.block_out_norm(b.alpha * x + b.beta * (a + f))


def ref_span_b2t(b, x):
    h = b.attn_out_norm(x + b.attn(x))
    f = b.ffn(h)
    return b.block_out_norm(b.alpha * x + b.beta * (h + f))


def ref_span_clean(b, x):
    """SPEC §9 in its default (fixed) form, β = 1/sqrt(L), with Δt on β."""
    a = b.attn(b.attn_in_norm(x))
    h = x + a
    f = b.ffn(b.ffn_in_norm(h))
    return x + b.delta_t / math.sqrt(b.n_layers) * b.block_out_norm(a + f)


def ref_deepnorm(b, x):
    alpha = (2 * b.n_layers) ** 0.25
    h = b.attn_out_norm(alpha * x + b.attn(x))
    return b.ffn_out_norm(alpha * h + b.ffn(h))


def ref_lns(b, x):
    s = 1 / math.sqrt(b.layer_index + 1)
    h = x + b.delta_t * b.attn(s * b.attn_in_norm(x))
    return h + b.delta_t * b.ffn(s * b.ffn_in_norm(h))


def ref_hybrid(b, x):
    """Attention is hand-written here (not the block's module): Q, K and V are each normalized per head with
    the block's gains, then RoPE, causal softmax and the output projection (see ``_manual_attention``)."""
    attn = b.attn
    h = x + _manual_attention(attn, x, attn.n_kv_heads, head_norms=(attn.q_norm, attn.k_norm, attn.v_norm))
    n = b.attn_out_norm(h)
    return n + b.ffn(n)


def ref_residual(b, stream):
    """ResiDual, one sub-layer at a time as the paper's streams: x_{k+1} = N_k(x_k + Δt·f_k(x_k)) and
    d_{k+1} = d_k + Δt·f_k(x_k), with f_0 = A, N_0 = attn_out_norm, then f_1 = F, N_1 = ffn_out_norm."""
    x, d = stream
    for branch, norm in ((b.attn, b.attn_out_norm), (b.ffn, b.ffn_out_norm)):
        f = b.delta_t * branch(x)
        x, d = norm(x + f), d + f
    return x, d


def _atol(placement, expected):
    """1e-6. For ``hybrid``, whose reference recomputes attention by hand in a different order of fp32 operations,
    1e-6 relative to the largest output: its outputs reach |y| ~ 10, where 1e-6 is about one fp32 ulp, and
    independent but correct fp32 computations differ there by 1-3 ulps (measured up to 2.4e-6 at |y| ~ 8)."""
    return 1e-6 * (max(1.0, expected.abs().max().item()) if placement in HAND_WRITTEN else 1.0)


HAND_WRITTEN = {"hybrid"}
"""References that do not reuse the block's sub-module for some part of the computation."""

REFERENCES = {"pre": ref_pre, "post": ref_post, "peri": ref_peri, "span_post": ref_span, "span_b2t": ref_span_b2t,
              "span": ref_span_clean, "deepnorm": ref_deepnorm, "lns": ref_lns, "hybrid": ref_hybrid,
              "residual": ref_residual}


def test_every_block_placement_has_a_reference():
    assert set(REFERENCES) == set(BLOCK_PLACEMENTS) == set(BLOCKS)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("placement", sorted(REFERENCES))
def test_block_matches_reference(placement, moe, norm):
    torch.manual_seed(0)
    cfg = _cfg(placement, norm=norm, span_post_beta=0.9, moe=MoEConfig(n_experts=4, top_k=2) if moe else None)
    model = SpanNormLM(cfg)
    _randomize_norms(model)
    x = torch.randn(2, T, D)
    if BLOCKS[placement].dual_stream:  # ResiDual maps the pair (x, d): give d its own values
        x = (x, 3.0 * torch.randn(2, T, D))
    for block in model.blocks:
        assert block.placement == placement
        expected = REFERENCES[placement](block, x)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=_atol(placement, expected))


# ---------------------------------------------------------------- residual: the whole model, two streams by hand
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_residual_model_matches_the_two_streams_by_hand(norm):
    """From the embedding to the logits, without the blocks' forward: both streams start at the embedding
    output (d_0 = x_0, as the official code starts ``res``), every sub-layer updates both, and the head reads
    x_L + N(d_L) with the one final norm outside the loop."""
    torch.manual_seed(0)
    model = SpanNormLM(_cfg("residual", norm=norm, n_layers=3))
    _randomize_norms(model)
    idx = torch.randint(0, 256, (2, T))
    x = d = model.embed(idx) * model.cfg.embedding_multiplier
    for block in model.blocks:
        for branch, branch_norm in ((block.attn, block.attn_out_norm), (block.ffn, block.ffn_out_norm)):
            f = 0.7 * branch(x)  # Δt = 0.7 (_cfg)
            x, d = branch_norm(x + f), d + f
    assert model.final_norm is None
    expected = (x + model.dual_final_norm(d)) @ model.head_weight.T
    logits = model(idx).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # Sensitive to the readings that differ: d starting at zero, or no norm on d_L, is far off.
    d_zero = d - model.embed(idx) * model.cfg.embedding_multiplier
    assert (logits - (x + model.dual_final_norm(d_zero)) @ model.head_weight.T).abs().max() > 1e-2
    assert (logits - (x + d) @ model.head_weight.T).abs().max() > 1e-2


def test_residual_cannot_be_mixed_with_other_placements():
    with pytest.raises(ConfigError, match=r"^model\.placement_overrides=.* residual on every layer or on none$"):
        _cfg("pre", placement_overrides={2: "residual"})
    with pytest.raises(ConfigError, match=r"^model\.placement_overrides=.*cannot be mixed"):
        _cfg("residual", placement_overrides={0: "post"})
    assert _cfg("residual", placement_overrides={1: "residual"}).layer_placements() == ["residual"] * 4


# ---------------------------------------------------------------- span/span_b2t with α ≠ 1 and β ≠ 1
def spec_span_alpha(cfg: ModelConfig) -> float:
    """SpanNorm's clean-skip α from SPEC §3, computed from the config alone: the explicit override if any, else
    the scaling rule's formula (init: 1; skip: sqrt(2L); both: DeepNorm's (2L)^(1/4))."""
    if cfg.span_post_alpha is not None:
        return cfg.span_post_alpha
    two_l = 2 * cfg.n_layers
    return {"init": 1.0, "skip": math.sqrt(two_l), "both": two_l ** 0.25}[cfg.span_post_scaling]


def span_equation(b, x, alpha, beta):
    a = b.attn(b.attn_in_norm(x))
    h = x + a
    f = b.ffn(b.ffn_in_norm(h))
    return b.block_out_norm(alpha * x + beta * (a + f))


def span_b2t_equation(b, x, alpha, beta):
    h = b.attn_out_norm(x + b.attn(x))
    f = b.ffn(h)
    return b.block_out_norm(alpha * x + beta * (h + f))


SPAN_EQUATIONS = {"span_post": span_equation, "span_b2t": span_b2t_equation}


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("scaling", [
    dict(span_post_scaling="skip", span_post_beta=0.6),                   # α = sqrt(6) at L = 3
    dict(span_post_scaling="both", span_post_beta=1.7),                   # α = 6^(1/4)
    dict(span_post_scaling="init", span_post_alpha=2.5, span_post_beta=0.4),   # explicit α over init's α = 1
    dict(span_post_scaling="skip", span_post_alpha=0.5, span_post_beta=1.3),   # explicit α over skip's sqrt(6)
], ids=["skip", "both", "init+alpha", "skip+alpha"])
@pytest.mark.parametrize("placement", ["span_post", "span_b2t"])
def test_span_blocks_match_reference_with_scaled_skip_and_branch(placement, scaling, norm):
    torch.manual_seed(0)
    cfg = _cfg(placement, n_layers=3, norm=norm, **scaling)
    alpha, beta = spec_span_alpha(cfg), cfg.span_post_beta
    assert alpha != pytest.approx(1.0) and beta != 1.0
    model = SpanNormLM(cfg)
    _randomize_norms(model)
    x = torch.randn(2, T, D)
    equation = SPAN_EQUATIONS[placement]
    for block in model.blocks:
        out = block(x)
        torch.testing.assert_close(out, equation(block, x, alpha, beta), rtol=0, atol=1e-6)
        # The check is sensitive to both constants: N is scale-invariant, so only β/α matters, and setting
        # either one to 1 changes that ratio and the output far beyond the tolerance.
        assert (out - equation(block, x, 1.0, beta)).abs().max() > 1e-3
        assert (out - equation(block, x, alpha, 1.0)).abs().max() > 1e-3


# ---------------------------------------------------------------- span: both scaling forms
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_span_clean_learnable_form_puts_one_over_sqrt_l_into_the_output_norm_gain(norm):
    """learnable: β = 1 at run time and Nₒ's gain starts at 1/sqrt(L) (reset_parameters' ones do not win);
    the other norms start at 1. At init it computes what the fixed form computes."""
    L = 9
    torch.manual_seed(0)
    fixed = SpanNormLM(_cfg("span", n_layers=L, norm=norm))
    torch.manual_seed(0)
    learnable = SpanNormLM(_cfg("span", n_layers=L, norm=norm, span_scaling="learnable"))
    for b_fixed, b_learn in zip(fixed.blocks, learnable.blocks):
        assert b_fixed.beta == pytest.approx(1 / 3) and b_learn.beta == 1.0
        assert torch.equal(b_fixed.block_out_norm.weight, torch.ones(D))
        torch.testing.assert_close(b_learn.block_out_norm.weight, torch.full((D,), 1 / 3), rtol=0, atol=0)
        assert torch.equal(b_learn.attn_in_norm.weight, torch.ones(D))
        if norm == "layer":
            assert torch.equal(b_learn.block_out_norm.bias, torch.zeros(D))
    learnable.reset_parameters()  # the block's init wins over reset_parameters' ones every time
    assert all(torch.allclose(b.block_out_norm.weight, torch.full((D,), 1 / 3)) for b in learnable.blocks)
    idx = torch.randint(0, 256, (2, T))
    torch.manual_seed(0)
    learnable = SpanNormLM(_cfg("span", n_layers=L, norm=norm, span_scaling="learnable"))
    torch.testing.assert_close(learnable(idx).logits, fixed(idx).logits, rtol=1e-5, atol=1e-5)
    # with trained-like gains, the learnable form is x + Δt·Nₒ(a + f): no hidden 1/sqrt(L) left
    _randomize_norms(learnable)
    x = torch.randn(2, T, D)
    for b in learnable.blocks:
        a = b.attn(b.attn_in_norm(x))
        f = b.ffn(b.ffn_in_norm(x + a))
        torch.testing.assert_close(b(x), x + b.delta_t * b.block_out_norm(a + f), rtol=0, atol=1e-6)


def test_span_clean_ignores_span_alpha_beta_and_scaling():
    torch.manual_seed(0)
    plain = SpanNormLM(_cfg("span"))
    torch.manual_seed(0)
    knobs = SpanNormLM(_cfg("span", span_post_alpha=3.0, span_post_beta=0.2, span_post_scaling="skip"))
    idx = torch.randint(0, 256, (2, T))
    torch.testing.assert_close(knobs(idx).logits, plain(idx).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- hybrid: per-head Q/K/V norms, by hand
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_hybrid_attention_normalizes_q_k_v_per_head_before_rope(n_kv, norm):
    torch.manual_seed(0)
    cfg = _cfg("hybrid", n_layers=2, n_kv_heads=n_kv, norm=norm, bias=True, rope_theta=5000.0)
    model = SpanNormLM(cfg)
    _randomize_norms(model)
    x = torch.randn(2, T, D)
    for block in model.blocks:
        attn = block.attn
        norms = (attn.q_norm, attn.k_norm, attn.v_norm)
        assert all(n.weight.shape == (cfg.head_dim,) for n in norms)  # one gain per head coordinate
        out = attn(x)
        expected = _manual_attention(attn, x, n_kv, head_norms=norms)
        torch.testing.assert_close(out, expected, rtol=0, atol=_atol("hybrid", expected))
        expected_block = ref_hybrid(block, x)
        torch.testing.assert_close(block(x), expected_block, rtol=0, atol=_atol("hybrid", expected_block))
        # Sensitive to each choice: no V norm, or the norms applied after RoPE instead of before, is far off.
        no_v = _manual_attention(attn, x, n_kv, head_norms=(attn.q_norm, attn.k_norm, None))
        after_rope = _manual_attention(attn, x, n_kv, head_norms=norms, norm_before_rope=False)
        assert (out - no_v).abs().max() > 1e-3
        assert (out - after_rope).abs().max() > 1e-3


def test_mixln_is_post_then_pre():
    cfg = _cfg("mixln", n_layers=8, mixln_ratio=0.25)
    model = SpanNormLM(cfg)
    assert [b.placement for b in model.blocks] == ["post"] * 2 + ["pre"] * 6
    assert model.final_norm is not None
    cfg = _cfg("mixln", n_layers=7, mixln_ratio=0.5)  # floor(3.5) = 3
    assert cfg.layer_placements() == ["post"] * 3 + ["pre"] * 4


def test_placement_overrides_by_layer_index():
    cfg = _cfg("pre", n_layers=4, placement_overrides={0: "post", "3": "span_post"})
    model = SpanNormLM(cfg)
    assert [b.placement for b in model.blocks] == ["post", "pre", "pre", "span_post"]
    assert model.final_norm is None  # the last block normalizes its output
    x = torch.randint(0, 256, (1, T))
    assert model(x).logits.shape == (1, T, 256)


@pytest.mark.parametrize("placement,final", [("pre", True), ("post", False), ("peri", True), ("span_post", False),
                                             ("span_b2t", False), ("span", True), ("deepnorm", False),
                                             ("lns", True), ("hybrid", True), ("mixln", True),
                                             ("residual", False)])
def test_final_norm_defaults(placement, final):
    assert (SpanNormLM(_cfg(placement)).final_norm is not None) is final
    assert (SpanNormLM(_cfg(placement, final_norm=not final)).final_norm is not None) is (not final)


def test_norms_are_named_by_position():
    names = {n for n, _ in SpanNormLM(_cfg("peri", embed_norm=True)).named_parameters()}
    assert "blocks.0.attn_in_norm.weight" in names and "blocks.0.ffn_out_norm.weight" in names
    assert "embed_norm.weight" in names and "final_norm.weight" in names
    assert not any("norm_1" in n or "ln1" in n for n in names)


def test_span_scaling_constants():
    L = 24
    alpha, init = span_post_constants(_cfg("span_post", n_layers=L, span_post_scaling="init"))
    assert alpha == 1.0 and init.out_proj_scale == pytest.approx(1 / math.sqrt(48))
    alpha, _ = span_post_constants(_cfg("span_post", n_layers=L, span_post_scaling="skip"))
    assert alpha == pytest.approx(math.sqrt(48))
    alpha, init = span_post_constants(_cfg("span_post", n_layers=L, span_post_scaling="both"))
    assert (alpha, init.xavier_gain) == pytest.approx(deepnorm_constants(L))
    assert span_post_constants(_cfg("span_post", n_layers=L, span_post_alpha=3.0))[0] == 3.0


# ---------------------------------------------------------------- sub-modules against hand-written maths
def test_rmsnorm_and_layernorm_match_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 5, D)
    rms = SpanNormLM(_cfg("pre")).blocks[0].attn_in_norm
    with torch.no_grad():
        rms.weight.copy_(torch.randn(D))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    torch.testing.assert_close(rms(x), expected, rtol=0, atol=1e-6)
    ln = SpanNormLM(_cfg("pre", norm="layer")).blocks[0].attn_in_norm
    with torch.no_grad():
        ln.weight.copy_(torch.randn(D))
        ln.bias.copy_(torch.randn(D))
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), (x - mu) / torch.sqrt(var + 1e-6) * ln.weight + ln.bias, rtol=0, atol=1e-5)


def _linear(x, linear):
    return x @ linear.weight.T + (linear.bias if linear.bias is not None else 0.0)


def _head_norm(t, norm):
    """RMSNorm or LayerNorm over the last (head) dimension, written out, with ``norm``'s gain (and bias)."""
    if isinstance(norm, torch.nn.LayerNorm):
        mu = t.mean(-1, keepdim=True)
        var = (t - mu).pow(2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + EPS) * norm.weight + norm.bias
    return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * norm.weight


def _manual_attention(attn, x, n_kv, head_norms=None, norm_before_rope=True):
    """Causal softmax attention with RoPE written as explicit rotations of coordinate pairs (i, i + hd/2).
    ``head_norms``: (q, k, v) norm modules (an entry may be None) whose gains normalize each head of Q, K and V
    (HybridNorm), before RoPE unless ``norm_before_rope`` is False."""
    B, T_, _ = x.shape
    hd, nh = attn.head_dim, attn.n_heads
    q = _linear(x, attn.q_proj).view(B, T_, nh, hd)
    k = _linear(x, attn.k_proj).view(B, T_, n_kv, hd)
    v = _linear(x, attn.v_proj).view(B, T_, n_kv, hd)
    theta = attn.rotary.theta
    freqs = theta ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)
    pos = torch.arange(T_, dtype=torch.float64)[:, None] * freqs[None]  # (T, hd/2)
    c, s = pos.cos().float()[None, :, None], pos.sin().float()[None, :, None]

    def rope(t):
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)

    def normalize(q, k, v):
        if head_norms is None:
            return q, k, v
        return tuple(t if n is None else _head_norm(t, n) for t, n in zip((q, k, v), head_norms))

    if norm_before_rope:
        q, k, v = normalize(q, k, v)
        q, k = rope(q), rope(k)
    else:
        q, k = rope(q), rope(k)
        q, k, v = normalize(q, k, v)
    group = nh // n_kv
    out = torch.zeros(B, T_, nh, hd)
    for head in range(nh):
        kh, vh = k[:, :, head // group], v[:, :, head // group]
        scores = q[:, :, head] @ kh.transpose(1, 2) / math.sqrt(hd)
        mask = torch.ones(T_, T_, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, head] = scores.softmax(-1) @ vh
    return _linear(out.reshape(B, T_, -1), attn.o_proj)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_matches_manual_rope_softmax(n_kv):
    torch.manual_seed(0)
    model = SpanNormLM(_cfg("pre", n_kv_heads=n_kv, rope_theta=5000.0))
    attn = model.blocks[0].attn
    x = torch.randn(2, T, D)
    torch.testing.assert_close(attn(x), _manual_attention(attn, x, n_kv), rtol=0, atol=1e-5)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    ffn = SpanNormLM(_cfg("pre")).blocks[0].ffn
    x = torch.randn(2, T, D)
    expected = (F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)) @ ffn.down_proj.weight.T
    torch.testing.assert_close(ffn(x), expected, rtol=0, atol=1e-6)
