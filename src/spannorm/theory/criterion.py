"""The stability criterion (SPEC §6, step 3): for a target depth, the residual step Δt, or the skip
multiplier α, that keeps the predicted forward growth and gradient ratio within a band.

Within a band B means, from the mean-field prediction at init (:func:`~spannorm.theory.meanfield.predict_init`):
Var(x_L)/Var(x_0) ∈ [1/B, B], ‖∂L/∂x_0‖/‖∂L/∂x_{L-1}‖ ∈ [1/B, B], and an identity-path product ≥ 1/B. Every
one of these moves toward 1 as the branches shrink relative to the skip, so the criterion finds the boundary
by bisection: the largest Δt (pre, lns, peri, post, mixln, residual, span, whose Δt multiplies its β), or the
smallest α (span_post, span_b2t, deepnorm), that stays within the band. A larger Δt or a smaller α means larger
updates per block, i.e. faster learning, so the boundary is the least-damped stable choice; the recommendation
is the configured value when it is already within the band, else the boundary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from spannorm.config import ModelConfig
from spannorm.model.placements import BLOCKS, placement_knob, placement_names
from spannorm.theory.bounds import peri_depth_bound
from spannorm.theory.meanfield import InitPrediction, predict_init

KNOBS: dict[str, str | None] = {p: (k.name if (k := placement_knob(p)) else None) for p in placement_names()}
"""The residual-scaling knob of each placement, from its block classes' ``knob`` (``delta_t`` or ``alpha``;
None for ``hybrid``, which has none in this library)."""


@dataclass
class BandPrediction:
    """The three predicted quantities the band constrains, at one value of the knob."""

    value: float
    variance_ratio: float
    grad_ratio: float
    identity_product: float

    def within(self, band: float) -> bool:
        def inside(v: float) -> bool:
            return math.isfinite(v) and 1 / band <= v <= band
        return inside(self.variance_ratio) and inside(self.grad_ratio) and self.identity_product >= 1 / band


@dataclass
class ScalingSuggestion:
    """What the criterion suggests for one placement at one depth."""

    placement: str
    n_layers: int
    band: float
    knob: str | None
    """``delta_t`` or ``alpha`` (None: the placement has no scaling knob here)."""
    config_field: str | None
    """Where to set it: ``model.delta_t``, ``model.span_post_alpha``, or None (DeepNet's α is fixed by L)."""
    configured: BandPrediction
    """The prediction at the configured value."""
    boundary: BandPrediction | None
    """The least-damped value within the band (None when even strong damping does not reach it)."""
    recommended: float | None
    peri_rms_growth_bound: float | None = None
    """For peri: the weight-free bound on RMS(x_L) − RMS(x_0) per token at the recommended Δt (gains 1)."""

    @property
    def configured_within_band(self) -> bool:
        return self.configured.within(self.band)


def _predict(cfg: ModelConfig, knob: str | None, value: float, seq_len: int) -> BandPrediction:
    if knob == "delta_t":
        pred = predict_init(dataclasses.replace(cfg, delta_t=value), seq_len=seq_len)
    elif knob == "alpha":
        pred = predict_init(cfg, seq_len=seq_len, alpha=value)
    else:
        pred = predict_init(cfg, seq_len=seq_len)
    return _band(pred, value)


def _band(pred: InitPrediction, value: float) -> BandPrediction:
    return BandPrediction(value, pred.variance_ratio, pred.grad_ratio, pred.identity_product)


def configured_value(cfg: ModelConfig) -> float | None:
    knob = KNOBS.get(cfg.placement)
    if knob == "delta_t":
        return cfg.delta_t
    if knob == "alpha":
        return BLOCKS[cfg.placement].residual_scales(cfg)[0]
    return None


def suggest_scaling(cfg: ModelConfig, band: float = 4.0, seq_len: int = 64, steps: int = 12) -> ScalingSuggestion:
    """Apply the criterion to ``cfg`` (its placement, width, init and depth ``cfg.n_layers``) on ``seq_len``
    distinct tokens, with ``steps`` bisection steps on log(knob) over a range of 1000× (12 steps: the boundary
    to within 0.2%)."""
    if band <= 1:
        raise ValueError(f"band={band} must be > 1")
    spec = placement_knob(cfg.placement)
    knob = spec.name if spec is not None else None
    current = configured_value(cfg)
    configured = _predict(cfg, knob, current if current is not None else 1.0, seq_len)
    suggestion = ScalingSuggestion(cfg.placement, cfg.n_layers, band, knob,
                                   spec.config_field if spec is not None else None, configured, None, current)
    if knob is None:
        return suggestion
    assert current is not None  # configured_value knows every knob a placement declares
    # damped end (small Δt, large α) and undamped end of the search, in log space
    if knob == "delta_t":
        damped, undamped = 1e-3, max(1.0, current)
    else:
        damped, undamped = max(1e3, current), 0.1
    damped_pred = _predict(cfg, knob, damped, seq_len)
    if not damped_pred.within(band):
        suggestion.recommended = None
        return suggestion
    undamped_pred = _predict(cfg, knob, undamped, seq_len)
    if undamped_pred.within(band):
        boundary = undamped_pred
    else:
        lo, hi = math.log(damped), math.log(undamped)  # lo is within the band, hi is not
        boundary = damped_pred
        for _ in range(steps):
            mid = (lo + hi) / 2
            pred = _predict(cfg, knob, math.exp(mid), seq_len)
            if pred.within(band):
                lo, boundary = mid, pred
            else:
                hi = mid
    suggestion.boundary = boundary
    suggestion.recommended = current if configured.within(band) else boundary.value
    if cfg.placement == "peri" and suggestion.recommended is not None:
        suggestion.peri_rms_growth_bound = peri_depth_bound(dataclasses.replace(cfg, delta_t=suggestion.recommended))
    return suggestion
