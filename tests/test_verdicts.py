"""The verdict rules of docs/stability.md "## Verdicts", driven directly with constructed measurements (no
model, no training). Each rule is tested just below and just above its threshold, so a wrong constant, a
flipped comparison or a missing case fails here."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

import spannorm.diagnostics.check_results as check_results_module
import spannorm.diagnostics.verdicts as verdicts_module
from spannorm.diagnostics.check import DepthResult, TrainingTrace
from spannorm.diagnostics.measure import Measurement
from spannorm.diagnostics.stats import BF16_MAX, FP16_MAX
from spannorm.diagnostics.verdicts import (
    ATTN_LOGIT_GROWTH_WARN,
    ATTN_LOGIT_WARN,
    CLIP_LOAD_BEARING,
    DEPTH_INDEPENDENT_SPREAD,
    HEADROOM_WARN_LOG2,
    attention_verdict,
    clipping_verdict,
    forward_verdict,
    gradient_verdict,
    identity_verdict,
    judge,
    precision_verdicts,
    training_verdict,
    worst,
)

BAND = 4.0


def measurement(n_layers: int = 4, *, grad_ratio: float | None = 1.0, max_abs: float = 1.0,
                attn: float | None = None, identity: float | None | str = "none") -> Measurement:
    """A measurement of an L-block model with the given summaries. ``identity``: a product (one norm on the
    skip path), ``"none"`` (no norm on the skip path, product 1) or None (a user block: not defined)."""
    points = ["embed"] + [f"block{layer}.out" for layer in range(n_layers)]
    ones = [1.0] * len(points)
    # ‖∂L/∂x_0‖ = grad_ratio and ‖∂L/∂x_l‖ = 1 for l ≥ 1, so ‖∂L/∂x_0‖/‖∂L/∂x_(L-1)‖ = grad_ratio (L ≥ 2).
    act_grad = None if grad_ratio is None else [grad_ratio] + [1.0] * n_layers
    m = Measurement(points=points, mean_abs=ones, entry_variance=ones, data_variance=ones, rms=ones,
                    max_abs=[1e-3] * n_layers + [max_abs], act_grad_norm=act_grad, stream_points=points,
                    block_param_grad_norm=[1.0] * n_layers, adjacent_cosine=[0.5] * n_layers,
                    angular_distance=[0.3] * n_layers, effective_rank=ones, token_uniformity=[0.1] * len(points),
                    attn_logit_max=[None] * (n_layers - 1) + [attn])
    if identity is None:
        m.identity_factor_names = None
    elif identity != "none":
        m.identity_factor_names, m.identity_factors = ["block0.out"], [identity]
    # the construction gives the summaries the verdicts read
    assert m.grad_ratio == (None if grad_ratio is None else pytest.approx(grad_ratio))
    assert m.max_abs_overall == max_abs and m.attn_logit_max_overall == attn
    return m


def result(n_layers: int = 4, *, trained: Measurement | None = None, training: TrainingTrace | None = None,
           **init) -> DepthResult:
    return DepthResult(n_layers, init=measurement(n_layers, **init), trained=trained, training=training)


def test_thresholds_are_the_documented_ones():
    assert ATTN_LOGIT_WARN == 30 and ATTN_LOGIT_GROWTH_WARN == 2 and CLIP_LOAD_BEARING == 10
    assert HEADROOM_WARN_LOG2 == -4 and DEPTH_INDEPENDENT_SPREAD == 1.5


def test_worst_orders_statuses():
    assert worst([]) == "ok"
    assert worst(["ok", "warn", "ok"]) == "warn"
    assert worst(["warn", "unstable", "ok"]) == "unstable"


# ------------------------------------------------------------------------------------- attention logits
@pytest.mark.parametrize("logit, status", [(29.9, "ok"), (30.0, "ok"), (30.1, "warn"), (500.0, "warn"),
                                           (math.inf, "warn")])
def test_attention_logits_warn_above_30_at_init(logit, status):
    v = attention_verdict([result(attn=logit)])
    assert v.status == status and v.label == "init only"


@pytest.mark.parametrize("after, status", [(29.9, "ok"), (30.1, "warn")])
def test_attention_logits_warn_above_30_after_training(after, status):
    # 20 → 29.9 is growth ×1.5, so only the absolute threshold can fire
    v = attention_verdict([result(attn=20.0, trained=measurement(attn=after))])
    assert v.status == status


@pytest.mark.parametrize("after, status", [(19.9, "ok"), (20.0, "ok"), (20.1, "warn"), (3.0, "ok")])
def test_attention_logits_warn_when_they_more_than_double(after, status):
    v = attention_verdict([result(attn=10.0, trained=measurement(attn=after))])
    assert v.status == status
    assert v.label == f"max ×{after / 10:.3g} in training"


def test_attention_logit_growth_warns_even_at_small_values_and_at_any_depth():
    shallow_ok = result(4, attn=1.0, trained=measurement(4, attn=1.5))
    deep_doubling = result(16, attn=1.0, trained=measurement(16, attn=2.5))  # ×2.5, far below 30
    assert attention_verdict([shallow_ok]).status == "ok"
    assert attention_verdict([shallow_ok, deep_doubling]).status == "warn"


def test_attention_verdict_is_absent_without_attention():
    assert attention_verdict([result(attn=None)]) is None


# ------------------------------------------------------------------------------------------- forward
def _growing(n_layers: int, per_block: float, bound_ratio: float | None) -> Measurement:
    """A measurement whose stream variance grows ×per_block per block; ``bound_ratio``: a weight-free bound's
    worst ratio (Peri-LN or span), or None (no such bound)."""
    m = measurement(n_layers)
    m.entry_variance = [per_block ** layer for layer in range(n_layers + 1)]
    if bound_ratio is not None:
        m.peri_bound_ratio = {"block0.block": bound_ratio}
    return m


@pytest.mark.parametrize("bound_ratio, status", [(None, "unstable"), (0.9, "warn"), (1.01, "unstable")])
def test_exponential_growth_beyond_the_band_is_unstable_unless_a_weight_free_bound_holds(bound_ratio, status):
    grown = _growing(32, 1.08, bound_ratio)  # ×11.8 over 32 blocks: exponential, beyond the band
    v = forward_verdict([DepthResult(32, init=_growing(32, 1.0, bound_ratio), trained=grown)], BAND)
    assert v.label.endswith(f"exponential ×{1.08 ** 32:.3g}") and v.status == status


def test_exponential_growth_within_the_band_is_ok():
    grown = _growing(32, 1.02, None)  # ×1.88
    v = forward_verdict([DepthResult(32, init=_growing(32, 1.0, None), trained=grown)], BAND)
    assert v.status == "ok"


# ------------------------------------------------------------------------------------------- clipping
def trace(grad_norms, clip=1.0, losses=None, **kwargs) -> TrainingTrace:
    losses = list(losses) if losses is not None else [5.0 - 0.1 * i for i in range(len(grad_norms))]
    return TrainingTrace(clip=clip, losses=losses, grad_norms=list(grad_norms), **kwargs)


@pytest.mark.parametrize("clip, peak, status", [(1.0, 9.99, "ok"), (1.0, 10.0, "ok"), (1.0, 10.01, "warn"),
                                                (0.5, 4.99, "ok"), (0.5, 5.01, "warn"), (2.0, 19.9, "ok"),
                                                (2.0, 20.1, "warn")])
def test_clipping_warns_only_beyond_10x_the_threshold(clip, peak, status):
    v = clipping_verdict([result(training=trace([0.1, peak, 0.2], clip=clip))])
    assert v.status == status


def test_clipping_fraction_is_reported_not_judged():
    # every step above the threshold of 1, but none beyond 10×: ok, and the fraction is in the label
    v = clipping_verdict([result(training=trace([9.0, 5.0, 2.0, 1.5], clip=1.0))])
    assert v.status == "ok" and v.label == "engaged 100% of steps"
    v = clipping_verdict([result(training=trace([0.5, 2.0, 3.0, 0.9], clip=1.0))])
    assert v.status == "ok" and v.label == "engaged 50% of steps"


def test_clipping_takes_the_largest_norm_over_depths():
    quiet = result(4, training=trace([2.0, 3.0]))
    loud = result(16, training=trace([2.0, 11.0]))
    assert clipping_verdict([quiet]).status == "ok"
    assert clipping_verdict([quiet, loud]).status == "warn"


def test_clipping_never_warns_without_a_threshold():
    v = clipping_verdict([result(training=trace([1e6], clip=0.0))])
    assert v.status == "ok" and v.label == "engaged 0% of steps"


def test_clipping_verdict_is_absent_without_training():
    assert clipping_verdict([result()]) is None


# ------------------------------------------------------------------------------------------ fp16 / bf16
def by_name(verdicts):
    return {v.check: v for v in verdicts}


@pytest.mark.parametrize("log2, status", [(-10.0, "ok"), (-4.01, "ok"), (-3.99, "warn"), (-0.01, "warn"),
                                          (0.0, "unstable"), (0.5, "unstable")])
def test_fp16_headroom(log2, status):
    v = by_name(precision_verdicts([result(max_abs=FP16_MAX * 2.0 ** log2)]))
    assert v["fp16"].status == status
    assert v["bf16"].status == "ok"  # 2^16 is nowhere near the bf16 maximum
    assert v["fp16"].label == ("overflow" if status == "unstable" else f"2^{log2:.1f} of max")


@pytest.mark.parametrize("log2, status", [(-4.01, "ok"), (-3.99, "warn"), (0.0, "unstable")])
def test_bf16_headroom(log2, status):
    v = by_name(precision_verdicts([result(max_abs=BF16_MAX * 2.0 ** log2)]))
    assert v["bf16"].status == status
    assert v["fp16"].status == "unstable"  # far beyond 65504


def test_non_finite_activations_overflow_both_dtypes():
    v = by_name(precision_verdicts([result(max_abs=math.inf)]))
    assert v["fp16"].status == v["bf16"].status == "unstable"


def test_headroom_is_the_worst_over_depths_and_phases():
    safe = FP16_MAX * 2.0 ** -10
    overflow_after_training = result(16, max_abs=safe, trained=measurement(16, max_abs=FP16_MAX * 2))
    assert by_name(precision_verdicts([result(4, max_abs=safe)]))["fp16"].status == "ok"
    v = by_name(precision_verdicts([result(4, max_abs=safe), overflow_after_training]))["fp16"]
    assert v.status == "unstable" and "L=16, trained" in v.detail


# -------------------------------------------------------------------------------------------- training
def test_training_ok_when_the_loss_goes_down():
    v = training_verdict([result(training=trace([0.5] * 20))])
    assert v.status == "ok" and v.label == "loss decreases"


def test_training_unstable_on_non_finite():
    diverged = TrainingTrace(clip=1.0, losses=[5.0, 4.0], grad_norms=[1.0, 1.0], diverged=True, diverged_step=3)
    v = training_verdict([result(training=diverged)])
    assert v.status == "unstable" and v.label == "diverged" and "diverged at step 3" in v.detail
    # one diverged depth makes the whole verdict unstable
    assert training_verdict([result(4, training=trace([0.5] * 20)), result(16, training=diverged)]).status \
        == "unstable"


@pytest.mark.parametrize("spikes, status", [(0, "ok"), (1, "warn"), (3, "warn")])
def test_training_warns_on_loss_spikes(spikes, status):
    v = training_verdict([result(training=trace([0.5] * 20, loss_spikes=spikes))])  # the loss does go down
    assert v.status == status


@pytest.mark.parametrize("tail, status", [(4.99, "ok"), (5.0, "warn"), (5.01, "warn"), (7.0, "warn")])
def test_training_warns_when_the_loss_does_not_go_down(tail, status):
    # first loss 5.0; the final loss is the mean of the last 10% of steps (2 of 20), here both `tail`
    losses = [5.0] + [3.0] * 17 + [tail, tail]
    t = trace([0.5] * 20, losses=losses)
    assert t.final_loss == pytest.approx(tail)
    v = training_verdict([result(training=t)])
    assert v.status == status
    assert v.label == ("loss decreases" if status == "ok" else "spikes or no progress")


def test_final_loss_averages_the_tail_not_the_last_step():
    # the last step alone is above the first, but the mean of the last 10% (2 steps) is below it
    losses = [5.0] + [3.0] * 17 + [4.0, 5.5]
    assert training_verdict([result(training=trace([0.5] * 20, losses=losses))]).status == "ok"


def test_training_verdict_is_absent_without_training():
    assert training_verdict([result()]) is None


# -------------------------------------------------------------------------------------------- gradient
def gradient(depths, ratios, band=BAND):
    return gradient_verdict([result(L, grad_ratio=r) for L, r in zip(depths, ratios)], band)


def test_gradient_inside_the_band_is_ok():
    v = gradient([4, 16, 64], [1.1, 1.2, 1.3])  # moves ×1.18: depth-independent
    assert v.status == "ok" and v.label == "depth-independent"
    v = gradient([4, 16, 64], [0.5, 2.0, 3.9])  # inside [1/4, 4] at every depth, but moves ×7.8
    assert v.status == "ok" and v.label == "within band"
    v = gradient([4, 16, 64], [1 / BAND, 1.0, BAND])  # the band is closed
    assert v.status == "ok" and v.label == "within band"


@pytest.mark.parametrize("spread, label", [(1.49, "depth-independent"), (1.51, "within band")])
def test_depth_independent_means_moving_by_less_than_1_5(spread, label):
    v = gradient([4, 16, 64], [1.0, 1.0, spread])
    assert v.status == "ok" and v.label == label


def exponential_ratios(depths, per_block):
    return [per_block ** (L - 1) for L in depths]


@pytest.mark.parametrize("deepest, status", [(3.99, "ok"), (4.01, "unstable"), (100.0, "unstable")])
def test_gradient_depth_unstable_when_beyond_the_band_at_the_deepest_depth_with_an_exponential_trend(
        deepest, status):
    depths = [4, 8, 16]
    per_block = deepest ** (1 / 15)  # r(16) = deepest
    v = gradient(depths, exponential_ratios(depths, per_block))
    assert v.status == status
    if status == "unstable":
        assert v.label == f"depth-unstable ×{per_block:.3g}/block"


def test_gradient_vanishing_exponentially_is_also_depth_unstable():
    depths = [4, 16, 64]
    v = gradient(depths, exponential_ratios(depths, 0.9))  # r(64) = 0.9^63 ≈ 1.3e-3 < 1/4
    assert v.status == "unstable" and v.label == "depth-unstable ×0.9/block"


def test_gradient_power_law_beyond_the_band_warns():
    v = gradient([4, 16, 64], [4.0, 16.0, 64.0])  # r = L exactly: a power law
    assert v.status == "warn" and v.label == "grows ~L^1"


@pytest.mark.parametrize("ratio, status", [(3.99, "ok"), (4.01, "warn"), (0.249, "warn"), (0.251, "ok"),
                                           (1e6, "warn")])
def test_gradient_single_depth_beyond_the_band_warns(ratio, status):
    v = gradient([16], [ratio])  # one depth cannot tell an exponential from a power law
    assert v.status == status
    if status == "warn":
        assert v.label == "outside band"


@pytest.mark.parametrize("depths, ratios", [([4, 64], [0.2, 3.0]), ([4, 16, 64], [0.2, 1.0, 3.0])])
def test_gradient_outside_the_band_only_at_a_shallower_depth_warns(depths, ratios):
    """Depth instability needs the deepest ratio beyond the band; a shallow outlier alone is a warning."""
    v = gradient(depths, ratios)
    assert v.status == "warn" and v.label == "outside band"


def test_gradient_band_is_the_setting():
    depths = [4, 8, 16]
    ratios = exponential_ratios(depths, 6.0 ** (1 / 15))  # r(16) = 6
    assert gradient(depths, ratios, band=4.0).status == "unstable"
    assert gradient(depths, ratios, band=8.0).status == "ok"


def test_gradient_non_finite_is_unstable_and_missing_is_not_judged():
    assert gradient([4, 16], [1.0, math.inf]).status == "unstable"
    assert gradient([4, 16], [1.0, 0.0]).status == "unstable"
    v = gradient([4, 16], [None, None])
    assert v.status == "ok" and v.label == "n/a"


# ------------------------------------------------------------------------------------------ identity path
@pytest.mark.parametrize("band, product, status", [(4.0, 0.2501, "ok"), (4.0, 0.25, "ok"), (4.0, 0.2499, "warn"),
                                                   (4.0, 1e-13, "warn"), (10.0, 0.101, "ok"),
                                                   (10.0, 0.099, "warn")])
def test_identity_path_warns_below_one_over_the_band(band, product, status):
    v = identity_verdict([result(identity=product)], band)
    assert v.status == status and v.label == f"∏α/σ = {product:.3g}"


def test_identity_path_warns_when_any_depth_is_below():
    assert identity_verdict([result(4, identity=0.9), result(64, identity=0.1)], BAND).status == "warn"
    assert identity_verdict([result(4, identity=0.1), result(64, identity=0.9)], BAND).status == "warn"
    assert identity_verdict([result(4, identity=0.9), result(64, identity=0.3)], BAND).status == "ok"


def test_identity_path_without_a_norm_on_the_skip_and_for_user_blocks():
    v = identity_verdict([result(identity="none")], BAND)
    assert v.status == "ok" and v.label == "no norm on skip"
    assert identity_verdict([result(identity=None)], BAND) is None  # a user block: not defined


# ------------------------------------------------------------------------------------------------ judge
def test_judge_reports_every_firing_check_and_the_worst_is_the_overall():
    deep = DepthResult(16, init=measurement(16, grad_ratio=2.0, max_abs=FP16_MAX * 2.0 ** -3, attn=5.0,
                                            identity=0.1),
                       trained=measurement(16, grad_ratio=2.0, max_abs=FP16_MAX * 2.0 ** -3, attn=40.0,
                                           identity=0.1),
                       training=trace([0.5, 50.0, 0.5]))
    verdicts = by_name(judge([deep], BAND))
    assert {name: v.status for name, v in verdicts.items() if v.status != "ok"} == {
        "identity path": "warn", "fp16": "warn", "attention logits": "warn", "clipping": "warn"}
    assert worst(v.status for v in verdicts.values()) == "warn"


def test_verdicts_do_not_import_the_check_orchestrator():
    """The verdict rules read :mod:`~spannorm.diagnostics.check_results`, never :mod:`~spannorm.diagnostics.check`
    (which imports them): no import circle, and every import at the top of the module."""
    for module in (verdicts_module, check_results_module):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "spannorm.diagnostics.check" not in imported
        top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert imported == top_level, f"{module.__name__} imports inside a function or under a condition"
    assert verdicts_module.DepthResult is check_results_module.DepthResult
