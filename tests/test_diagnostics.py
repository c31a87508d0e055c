"""Per-layer measurements (SPEC §6) against hand-written references, and the training callback."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from spannorm import ModelConfig, SpanNormLM
from spannorm.diagnostics import stats
from spannorm.diagnostics.callback import DiagnosticsCallback
from spannorm.diagnostics.custom import BlockFactoryError, CustomBlockLM, load_block_factory
from spannorm.diagnostics.measure import measure
from spannorm.diagnostics.recorder import ResidualRecorder, hook_point_names
from spannorm.model.placements import PreBlock
from spannorm.theory.bounds import norm_output_bound


def test_moments_match_hand_written_definitions():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 7) * 2 + 1
    assert stats.mean_abs(h) == pytest.approx(h.abs().mean().item())
    tokens = h.reshape(-1, 7)
    assert stats.entrywise_variance(h) == pytest.approx(
        sum(((t - t.mean()) ** 2).mean().item() for t in tokens) / 15, rel=1e-5)
    assert stats.datawise_variance(h) == pytest.approx(
        sum(((tokens[:, j] - tokens[:, j].mean()) ** 2).mean().item() for j in range(7)) / 7, rel=1e-5)
    assert stats.rms(h) == pytest.approx(math.sqrt((h ** 2).mean().item()))
    assert stats.max_abs(h) == pytest.approx(h.abs().max().item())
    assert stats.headroom_log2(65504.0, stats.FP16_MAX) == pytest.approx(0.0)
    assert stats.headroom_log2(65504.0 / 8, stats.FP16_MAX) == pytest.approx(-3.0)
    assert stats.headroom_log2(math.inf, stats.FP16_MAX) == math.inf


def test_collapse_measures_on_known_geometries():
    e = torch.eye(4)
    orthogonal = e.unsqueeze(0)  # 4 orthogonal tokens of width 4
    same = torch.ones(1, 4, 4)  # 4 identical tokens
    assert stats.effective_rank(orthogonal) == pytest.approx(4.0)
    assert stats.effective_rank(same) == pytest.approx(1.0, abs=1e-6)
    assert stats.token_uniformity(orthogonal) == pytest.approx(0.0)
    assert stats.token_uniformity(same) == pytest.approx(1.0)
    assert stats.adjacent_cosine(orthogonal, 3 * orthogonal) == pytest.approx(1.0)
    assert stats.angular_distance(orthogonal, 3 * orthogonal) == pytest.approx(0.0, abs=1e-3)
    rotated = orthogonal.roll(1, dims=-1)
    assert stats.angular_distance(orthogonal, rotated) == pytest.approx(0.5)
    # two singular values 3 and 1: p = (3/4, 1/4)
    h = torch.diag(torch.tensor([3.0, 1.0])).unsqueeze(0)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert stats.effective_rank(h) == pytest.approx(expected, rel=1e-6)


def _model(placement: str = "pre", n_layers: int = 3, **extra) -> SpanNormLM:
    torch.manual_seed(0)
    return SpanNormLM(ModelConfig(d_model=32, n_heads=4, n_layers=n_layers, placement=placement,
                                  context_length=16, **extra))


def _batch(seed: int = 0):
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def test_measure_gradients_match_backward_and_leave_grad_untouched():
    model = _model("span_post", n_kv_heads=2)
    idx, tgt = _batch()
    m = measure(model, idx, tgt)
    assert all(p.grad is None for p in model.parameters())
    assert m.points[:3] == ["embed", "block0.mid", "block0.out"] and m.stream_points[-1] == "block2.out"
    with ResidualRecorder(model, grads=True) as rec:
        out = model(idx, tgt)
        out.loss.backward()
    assert m.loss == pytest.approx(out.loss.item(), rel=1e-6)
    for name, value in zip(m.points, m.act_grad_norm):
        assert value == pytest.approx(rec.gradients[name].norm().item(), rel=1e-5), name
    for block, value in zip(model.blocks, m.block_param_grad_norm):
        manual = math.sqrt(sum(p.grad.pow(2).sum().item() for p in block.parameters()))
        assert value == pytest.approx(manual, rel=1e-5)
    assert m.grad_ratio == pytest.approx(m.block_input_grad_norm[0] / m.block_input_grad_norm[-1])


def test_residual_hook_points_say_which_stream_they_see():
    """ResiDual: ``hook_mid``/``hook_out`` see the Post-LN stream x (unit RMS, the stream statistics), ``hook_dual``
    the dual stream d, measured at its own points. d only accumulates, so ∂L/∂d_l is one and the same tensor at
    every depth, and d_L joins x_L through the model's one dual norm: exact checks of what each point sees."""
    model = _model("residual")
    idx, tgt = _batch()
    m = measure(model, idx, tgt)
    assert m.points[:4] == ["embed", "block0.mid", "block0.out", "block0.dual"]
    assert m.stream_points == ["embed", "block0.out", "block1.out", "block2.out"]
    assert all(r == pytest.approx(1.0, rel=1e-3) for r in m.at_stream(m.rms)[1:])  # x: normalized, gains 1
    assert len(m.dual_variance) == 4 and m.dual_variance[-1] > 2 * m.dual_variance[0]  # d grows
    assert m.summary()["dual_variance_ratio"] == pytest.approx(m.dual_variance[-1] / m.dual_variance[0])
    with ResidualRecorder(model, grads=True) as rec:
        out = model(idx, tgt)
        out.loss.backward()
    dual_grads = [rec.gradients[f"block{layer}.dual"] for layer in range(3)]
    assert all(torch.equal(g, dual_grads[-1]) for g in dual_grads)
    x_last, d_last = rec.activations["block2.out"], rec.activations["block2.dual"]
    expected = F.linear(x_last + model.dual_final_norm(d_last), model.head_weight)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)
    assert m.identity_product == 1.0  # d is the clean path: no norm on it until the end
    assert _model("span_post").blocks[0].__class__.dual_stream is False
    assert measure(_model("span_post"), idx, tgt).dual_variance is None


def test_attention_logit_max_is_what_sdpa_sees(monkeypatch):
    """Capture q and k inside the real forward (at the SDPA call) and compare the causal max |q·k|/√d_h."""
    model = _model("hybrid", n_layers=2)  # hybrid: per-head q/k norms, the path with most steps
    idx, tgt = _batch(1)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.detach(), k.detach()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(idx)
    monkeypatch.undo()
    m = measure(model, idx, tgt)
    T = idx.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for (q, k), value in zip(seen, m.attn_logit_max):
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        assert value == pytest.approx(logits.abs().masked_fill(~mask, 0).max().item(), rel=1e-5)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_peri_bound_holds_with_arbitrary_gains(norm):
    model = _model("peri", n_layers=3, norm=norm, delta_t=0.3)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
                module.weight.uniform_(-2, 2)
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.uniform_(-1, 1)
    m = measure(model, *_batch())
    assert set(m.peri_bound_ratio) == {f"block{layer}.{s}" for layer in range(3) for s in ("attn", "ffn")}
    assert max(m.peri_bound_ratio.values()) <= 1 + 1e-5
    assert max(m.peri_bound_ratio.values()) > 0.3  # the bound is not vacuous here


@pytest.mark.parametrize("scaling", ["fixed", "learnable"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_span_clean_bound_holds_with_trained_like_weights_and_gains(norm, scaling):
    """Each span block moves every token by at most Δt·β·(√d‖γₒ‖∞ + ‖bₒ‖₂), whatever the weights:
    asserted on random gains and biases, and on weights scaled far from init."""
    model = _model("span", n_layers=3, norm=norm, delta_t=0.7, span_scaling=scaling)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) * 4 - 2)  # gains and biases in [-2, 2]
            else:
                p.mul_(1 + 4 * torch.rand((), generator=gen))
    idx, tgt = _batch()
    m = measure(model, idx, tgt)
    assert set(m.peri_bound_ratio) == {f"block{layer}.block" for layer in range(3)}
    assert max(m.peri_bound_ratio.values()) <= 1 + 1e-5
    assert max(m.peri_bound_ratio.values()) > 0.3  # the bound is not vacuous here
    # the bound itself, by hand: Δt·β·(√d·max|γ| + ‖b‖) on the block's own update
    stream = []
    points = [model.hook_embed] + [b.hook_out for b in model.blocks]
    hooks = [p.register_forward_hook(lambda _m, _i, out: stream.append(out)) for p in points]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    beta = 1 / math.sqrt(3) if scaling == "fixed" else 1.0
    for layer, block in enumerate(model.blocks):
        bound = 0.7 * beta * norm_output_bound(block.block_out_norm)
        assert bound == pytest.approx(0.7 * beta * (math.sqrt(block.block_out_norm.weight.numel())
                                                  * block.block_out_norm.weight.abs().max().item()
                                                  + (block.block_out_norm.bias.norm().item()
                                                     if norm == "layer" else 0.0)))
        step = (stream[layer + 1] - stream[layer]).norm(dim=-1).max().item()
        assert step <= bound * (1 + 1e-5)
        assert step / bound == pytest.approx(m.peri_bound_ratio[f"block{layer}.block"], rel=1e-5)


def test_identity_factors_are_rms_ratios_at_the_norms():
    model = _model("deepnorm", n_layers=2)
    idx, tgt = _batch()
    m = measure(model, idx, tgt)
    seen = {}
    for layer, block in enumerate(model.blocks):
        for pos in ("attn_out", "ffn_out"):
            getattr(block, f"{pos}_norm").register_forward_pre_hook(
                lambda _m, a, key=f"block{layer}.{pos}": seen.__setitem__(key, a[0].detach()))
    with ResidualRecorder(model) as rec:
        model(idx)
    stream = rec.stream()
    for name, factor in zip(m.identity_factor_names, m.identity_factors):
        layer, pos = int(name[5]), name.split(".")[1]
        skip = stream[layer] if pos == "attn_out" else rec.activations[f"block{layer}.mid"]
        expected = model.blocks[layer].alpha * stats.rms(skip) / stats.rms(seen[name])
        assert factor == pytest.approx(expected, rel=1e-6)
    assert measure(_model("pre"), idx, tgt).identity_product == 1.0


class _Doubling(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return 2 * x + 0.1 * torch.tanh(self.lin(x))


def test_custom_block_lm_has_the_hook_points_and_is_measured():
    model = CustomBlockLM(lambda d, h, layer, L: _Doubling(d), n_layers=4, d_model=16)
    model.check_shapes()
    m = measure(model, *_batch())
    assert m.stream_points == ["embed"] + [f"block{layer}.out" for layer in range(4)]
    assert m.identity_product is None and all(v is None for v in m.attn_logit_max)
    ratios = [b / a for a, b in zip(m.stream_variance, m.stream_variance[1:])]
    assert all(r == pytest.approx(4.0, rel=0.05) for r in ratios)  # the residual doubles: variance ×4


def test_nested_hook_points_inside_user_blocks_are_ignored():
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, context_length=8)
    model = CustomBlockLM(lambda d, h, layer, L: PreBlock(cfg, layer), n_layers=2, d_model=16, n_heads=2)
    assert sorted(hook_point_names(model)) == ["block0.out", "block1.out", "embed"]


def test_block_factory_errors_are_one_line():
    with pytest.raises(BlockFactoryError, match="package.module:factory"):
        load_block_factory("no_colon")
    with pytest.raises(BlockFactoryError, match="cannot import"):
        load_block_factory("surely_not_a_module_xyz:make")
    with pytest.raises(BlockFactoryError, match="no attribute"):
        load_block_factory("math:not_there")
    bad = CustomBlockLM(lambda d, h, layer, L: torch.nn.Linear(d, d + 1), n_layers=1, d_model=8)
    with pytest.raises(BlockFactoryError, match=r"must map \(B, T, d\)"):
        bad.check_shapes()


def test_callback_adds_summaries_every_n_steps_without_touching_training_grads():
    model = _model("pre", n_layers=2)
    idx, tgt = _batch()
    model(idx, tgt).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scalars = []
    trainer = SimpleNamespace(model=model, cfg=SimpleNamespace(train=SimpleNamespace(steps=5)),
                              sample_batch=lambda split: (idx, tgt),
                              tb=SimpleNamespace(add_scalar=lambda tag, value, step: scalars.append((tag, step))))
    callback = DiagnosticsCallback(every=2)
    callback.on_train_start(trainer)
    records = {}
    for step in range(1, 6):
        records[step] = {"step": step}
        callback.on_step_end(trainer, step, records[step])
    assert [s for s, r in records.items() if "diag/grad_ratio" in r] == [2, 4, 5]  # every 2, and the last
    assert records[2]["diag/variance_ratio"] == pytest.approx(measure(model, idx, tgt).variance_ratio)
    assert ("diag_layers/rms/x2", 4) in scalars and ("diag/grad_ratio", 2) in scalars
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
