"""The theory module against exact integrals, the model's own init, and measurements at init (SPEC §3, §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from spannorm import ModelConfig, MoEConfig, SpanNormLM
from spannorm.diagnostics.measure import measure
from spannorm.model.moe import MoEFFN
from spannorm.theory import bounds, gaussian
from spannorm.theory.criterion import suggest_scaling
from spannorm.theory.meanfield import IDENTITY_PATH_NORMS, init_gains, predict_init

PHI = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
SILU = lambda x: x / (1 + math.exp(-x))  # noqa: E731


def _quad(f) -> float:
    return integrate.quad(lambda z: f(z) * PHI(z), -12, 12, limit=200)[0]


@pytest.mark.parametrize("var", [0.25, 1.0, 3.0])
def test_silu_moments_match_quadrature(var):
    sd = math.sqrt(var)
    assert gaussian.silu_second_moment(var) == pytest.approx(_quad(lambda z: SILU(sd * z) ** 2), rel=1e-8)
    d = lambda x: (1 / (1 + math.exp(-x))) * (1 + x * (1 - 1 / (1 + math.exp(-x))))  # noqa: E731
    assert gaussian.silu_derivative_second_moment(var) == pytest.approx(_quad(lambda z: d(sd * z) ** 2), rel=1e-8)
    # the kernel at correlation 1 is the second moment; at 0 it is E[silu]²
    k = gaussian.silu_kernel(var, np.array([1.0, 0.0]))
    assert k[0] == pytest.approx(gaussian.silu_second_moment(var), rel=1e-6)
    assert k[1] == pytest.approx(_quad(lambda z: SILU(sd * z)) ** 2, rel=1e-6)


def test_softmax_collision_matches_monte_carlo():
    n = np.array([1, 2, 4, 16, 16, 64])
    s = np.array([1.0, 0.0, 1.0, 0.3, 2.0, 1.0])
    pred = gaussian.softmax_collision(n, s)
    assert pred[0] == pytest.approx(1.0) and pred[1] == pytest.approx(0.5, rel=2e-3)
    gen = torch.Generator().manual_seed(7)
    for keys, var, p in zip(n[2:], s[2:], pred[2:]):
        z = torch.randn(100_000, int(keys), generator=gen, dtype=torch.float64) * math.sqrt(var)
        mc = z.softmax(-1).pow(2).sum(-1).mean().item()
        assert p == pytest.approx(mc, rel=0.02)


def _realized_gain(weight: torch.Tensor, fan_in: int) -> float:
    return fan_in * weight.detach().double().pow(2).mean().item()


@pytest.mark.parametrize("placement,extra", [
    ("pre", {}), ("pre", {"scale_out_proj": False}), ("post", {}), ("deepnorm", {}), ("span_post", {}),
    ("span_post", {"span_post_scaling": "skip"}), ("span_post", {"span_post_scaling": "both"}), ("lns", {}),
    ("post", {"init": "fixed", "init_std": 0.02}), ("span_post", {"moe": MoEConfig(n_experts=4, top_k=2)}),
    ("span", {}), ("span", {"span_scaling": "learnable"}),
])
def test_init_gains_are_the_models_init(placement, extra):
    """The theory reads SPEC §3's rules from the config; they must be what the model actually draws."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=8, placement=placement, context_length=8, **extra)
    model = SpanNormLM(cfg)
    g = init_gains(cfg, placement)
    attn = [b.attn for b in model.blocks]
    realized = {name: np.mean([_realized_gain(getattr(a, f"{name}_proj").weight, cfg.d_model) for a in attn])
                for name in ("q", "k", "v", "o")}
    if cfg.moe is None:
        ffn = [b.ffn for b in model.blocks]
        realized["gate"] = np.mean([_realized_gain(f.gate_proj.weight, cfg.d_model) for f in ffn])
        realized["down"] = np.mean([_realized_gain(f.down_proj.weight, cfg.ffn_hidden) for f in ffn])
    else:
        experts = [b.ffn.experts for b in model.blocks if isinstance(b.ffn, MoEFFN)]
        realized["gate"] = np.mean([_realized_gain(e.w_gate, cfg.d_model) for e in experts])
        realized["down"] = np.mean([_realized_gain(e.w_down, cfg.expert_hidden) for e in experts])
        assert g.ffn_multiplicity == pytest.approx(0.5)
    for name, value in realized.items():
        assert value == pytest.approx(getattr(g, name), rel=0.05), name


def _random_tokens(seed: int, batch: int = 4, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def _measure_and_predict(placement: str, n_layers: int, seed: int = 0, seq: int = 32, **extra):
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=n_layers, placement=placement, context_length=seq, **extra)
    torch.manual_seed(seed)
    model = SpanNormLM(cfg)
    tokens = _random_tokens(seed, seq=seq)
    m = measure(model, tokens[:, :-1], tokens[:, 1:])
    return m, predict_init(cfg, tokens[:, :-1], targets=tokens[:, 1:])


@pytest.mark.parametrize("placement,n_layers,extra", [
    ("deepnorm", 16, {}), ("span_post", 16, {}), ("span_post", 16, {"span_post_scaling": "skip"}),
    ("span_post", 16, {"span_post_scaling": "both"}), ("span_b2t", 8, {}), ("post", 4, {}),
])
def test_identity_path_product_matches_theory(placement, n_layers, extra):
    """SPEC §5: the measured ∏ α/σ_l (from the norms' own inputs) matches the prediction within 20%."""
    m, p = _measure_and_predict(placement, n_layers, **extra)
    assert m.identity_factor_names == p.identity_factor_names
    assert len(p.identity_factors) == n_layers * len(IDENTITY_PATH_NORMS[placement])
    assert m.identity_product == pytest.approx(p.identity_product, rel=0.2)
    if placement == "post":
        assert p.identity_product < 0.5  # and it is far from 1: the test would notice a trivial theory


def test_post_identity_path_decays_exponentially_as_predicted_at_depth_8():
    """Post at L=8: one draw of d=64 weights scatters the product by ~±10%, so average the log over seeds."""
    logs = []
    for seed in range(3):
        m, p = _measure_and_predict("post", 8, seed=seed)
        logs.append(math.log(m.identity_product / p.identity_product))
        assert p.identity_product < 0.1
    assert abs(np.mean(logs)) < math.log(1.2)


@pytest.mark.parametrize("placement,n_layers,extra,rel", [
    ("pre", 8, {"scale_out_proj": False}, 0.1), ("pre", 8, {}, 0.05), ("peri", 8, {}, 0.1),
    ("hybrid", 4, {}, 0.1), ("lns", 8, {}, 0.05), ("span", 8, {}, 0.05),
    ("span", 16, {"span_scaling": "learnable"}, 0.05),
    ("span", 8, {"moe": MoEConfig(n_experts=4, top_k=2), "delta_t": 0.5}, 0.05),
])
def test_variance_recursion_matches_measurement(placement, n_layers, extra, rel):
    m, p = _measure_and_predict(placement, n_layers, **extra)
    assert m.variance_ratio == pytest.approx(p.variance_ratio, rel=rel)
    assert m.token_uniformity[-1] == pytest.approx(p.token_correlation[-1], abs=0.05)


@pytest.mark.parametrize("placement,n_layers,extra,rel", [
    ("post", 8, {}, 0.35), ("span_post", 8, {}, 0.1), ("deepnorm", 8, {}, 0.1),
    ("pre", 8, {"scale_out_proj": False}, 0.25),
    ("span", 8, {}, 0.1), ("span", 16, {"span_scaling": "learnable"}, 0.1),
])
def test_gradient_ratio_prediction_on_independent_tokens(placement, n_layers, extra, rel):
    m, p = _measure_and_predict(placement, n_layers, **extra)
    assert m.grad_ratio == pytest.approx(p.grad_ratio, rel=rel)


def test_unscaled_pre_variance_grows_linearly_in_the_theory():
    ratios = [predict_init(ModelConfig(d_model=64, n_heads=4, n_layers=L, context_length=32,
                                       scale_out_proj=False), seq_len=32).variance_ratio for L in (4, 8, 16)]
    per_block = [(r - 1) / L for r, L in zip(ratios, (4, 8, 16))]
    assert per_block[0] > 0.4 and max(per_block) / min(per_block) < 1.5  # linear: the same increment per block


@pytest.mark.parametrize("scaling", ["fixed", "learnable"])
def test_span_clean_variance_grows_by_one_whatever_the_depth(scaling):
    """SPEC §9: each block adds a unit-RMS term times β = 1/sqrt(L), so Var(x_L)/Var(x_0) = 1 + Δt² at every
    depth (1/L per block), and every block contributes the same share; no norm sits on the skip."""
    for L in (4, 16, 64):
        for dt in (1.0, 0.5):
            cfg = ModelConfig(d_model=64, n_heads=4, n_layers=L, context_length=32, placement="span",
                              span_scaling=scaling, delta_t=dt)
            p = predict_init(cfg, seq_len=32)
            assert p.variance_ratio == pytest.approx(1 + dt ** 2, rel=1e-6)
            increments = np.diff(p.stream_mean_square)
            assert increments == pytest.approx(np.full(L, dt ** 2 / L), rel=1e-6)
            assert p.identity_product == 1.0 and p.identity_factor_names == []
            assert 1 < p.grad_ratio < 1 + 1.5 * dt ** 2  # within the band, at every depth


def test_peri_bound_constants():
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-3, 2, 16))
        norm.bias.fill_(0.5)
    assert bounds.norm_output_bound(norm) == pytest.approx(4 * 3 + 0.5 * 4)
    assert bounds.peri_step_bound(norm, 0.1) == pytest.approx(0.1 * 14)
    cfg = ModelConfig(n_layers=6, delta_t=0.5)
    assert bounds.peri_depth_bound(cfg) == pytest.approx(6.0)
    assert bounds.span_step_bound(norm, 0.5, 0.25) == pytest.approx(0.125 * 14)


def test_published_scalings():
    by_name = {s.name: s for s in bounds.scalings(24)}
    assert by_name["deepnorm"].alpha == pytest.approx(48 ** 0.25)
    assert by_name["deepnorm"].xavier_gain == pytest.approx(192 ** -0.25)
    post_init = by_name["span_post/init"]
    assert post_init.alpha == 1 and post_init.out_proj_scale == pytest.approx(48 ** -0.5)
    assert by_name["span_post/skip"].alpha == pytest.approx(48 ** 0.5)
    assert by_name["span_post/both"].xavier_gain == pytest.approx(192 ** -0.25)


def test_criterion_finds_the_band_boundary_for_unscaled_pre():
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=16, context_length=32, scale_out_proj=False)
    s = suggest_scaling(cfg, band=4.0, seq_len=32)
    assert s.knob == "delta_t" and s.config_field == "model.delta_t"
    assert not s.configured_within_band and s.configured.variance_ratio > 4
    assert 0.2 < s.recommended < 1.0 and s.boundary.within(4.0)
    just_beyond = predict_init(ModelConfig(**{**cfg.to_dict(), "delta_t": s.recommended * 1.05}), seq_len=32)
    assert max(just_beyond.variance_ratio, just_beyond.grad_ratio) > 4  # it is the boundary, not just inside


def test_criterion_keeps_spans_configured_alpha_and_damps_post():
    span = suggest_scaling(ModelConfig(d_model=64, n_heads=4, n_layers=8, context_length=32, placement="span_post"),
                           seq_len=32)
    assert span.configured_within_band and span.recommended == 1.0 and span.boundary.value < 1.0
    post = suggest_scaling(ModelConfig(d_model=64, n_heads=4, n_layers=16, context_length=32, placement="post"),
                           seq_len=32)
    assert not post.configured_within_band and post.recommended < 1.0
    assert post.boundary.identity_product >= 0.25


def test_residual_two_streams_match_measurement_at_init():
    """ResiDual: the x stream is Post-LN's (unit mean square), the dual stream d only accumulates branch outputs
    and grows about linearly, like unscaled ``pre`` (each block adds about the same variance). The joint-Gram
    prediction of d's mean square at every block, of x's token uniformity and of the gradient ratio (which
    includes d's gradient reaching every branch) match the measurement."""
    m, p = _measure_and_predict("residual", 8)
    assert p.stream_mean_square == pytest.approx([1.0] * 9, rel=1e-6)
    assert m.variance_ratio == pytest.approx(p.variance_ratio, rel=0.05)
    assert m.token_uniformity[-1] == pytest.approx(p.token_correlation[-1], abs=0.05)
    measured_dual = [m.entry_variance[m.points.index(f"block{layer}.dual")] for layer in range(8)]
    assert "block0.dual" not in m.stream_points  # d is measured at its own point, outside x's statistics
    assert measured_dual == pytest.approx(p.dual_mean_square[1:], rel=0.1)
    steps = np.diff(p.dual_mean_square)
    assert steps.min() > 0.4 and steps.max() / steps.min() < 2  # about linear: a similar increment per block
    assert m.grad_ratio == pytest.approx(p.grad_ratio, rel=0.35)
    # the same weights without d (post) give a smaller ratio in both: d's gradient enters at every branch
    mp, pp = _measure_and_predict("post", 8)
    assert p.grad_ratio > 1.3 * pp.grad_ratio and m.grad_ratio > 1.3 * mp.grad_ratio
    assert predict_init(ModelConfig(d_model=64, n_heads=4, n_layers=8, context_length=32),
                        seq_len=32).dual_mean_square is None  # single-stream placements have no d
