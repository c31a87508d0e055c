"""Growth class of a moment over depth (SPEC §6): fit constant, linear, quadratic and exponential models to
y(x), report each fit's quality, and pick the best with a parsimony rule.

Quality is the relative RMSE, sqrt(mean (y − ŷ)²) / mean |y| (0 is a perfect fit), and R² is given beside it.
The parsimony rule walks the classes from the mildest to the most severe (constant, linear, quadratic,
exponential) and picks the first whose relative RMSE is within ``rel_margin`` (relative) plus ``tolerance``
(absolute) of the best fit's. So a slowly growing exponential that a line fits as well is called linear, a
flat profile with noise is called constant, and ``exponential`` is only reported when no polynomial of degree
≤ 2 comes close. A quadratic that bends against its trend (concave growth, such as √x) is reported as
``linear``: its growth is no faster than linear. A profile containing non-finite values (overflow) is classified
``exponential`` outright.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

GROWTH_CLASSES = ("constant", "linear", "quadratic", "exponential")
"""From the mildest to the most severe."""


@dataclass
class GrowthFit:
    """One model fitted to y(x)."""

    growth_class: str
    params: list[float]
    """constant: [c]; linear: [a, b] for a + b·x; quadratic: [a, b, c] for a + b·x + c·x²;
    exponential: [a, r] for a·exp(r·x)."""
    rel_rmse: float
    r2: float


@dataclass
class GrowthClassification:
    """The fits of every class and the one the parsimony rule picked."""

    growth_class: str
    fits: dict[str, GrowthFit] = field(default_factory=dict)
    factor: float = math.nan
    """max |y| / |y(x_0)|: how much the quantity grew over the range."""
    rate: float = math.nan
    """exp(r) of the exponential fit: the growth factor per unit of x."""
    non_finite: bool = False

    @property
    def quality(self) -> float:
        """Relative RMSE of the chosen fit (nan when the profile was not finite)."""
        fit = self.fits.get(self.growth_class)
        return fit.rel_rmse if fit else math.nan

    def to_dict(self) -> dict:
        return {"class": self.growth_class, "rel_rmse": _finite_or_none(self.quality),
                "factor": _finite_or_none(self.factor), "rate": _finite_or_none(self.rate),
                "non_finite": self.non_finite,
                "fits": {k: {"params": [_finite_or_none(p) for p in f.params],
                             "rel_rmse": _finite_or_none(f.rel_rmse), "r2": _finite_or_none(f.r2)}
                         for k, f in self.fits.items()}}


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _quality(y: np.ndarray, y_hat: np.ndarray) -> tuple[float, float]:
    resid = y - y_hat
    scale = float(np.mean(np.abs(y)))
    rel_rmse = float(np.sqrt(np.mean(resid ** 2)) / scale) if scale > 0 else float(np.sqrt(np.mean(resid ** 2)))
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / total if total > 0 else (1.0 if np.allclose(resid, 0) else 0.0)
    return rel_rmse, r2


def _polyfit(x: np.ndarray, y: np.ndarray, degree: int) -> tuple[list[float], np.ndarray]:
    coeffs = np.polynomial.polynomial.polyfit(x, y, degree)
    return [float(c) for c in coeffs], np.polynomial.polynomial.polyval(x, coeffs)


def _expfit(x: np.ndarray, y: np.ndarray) -> tuple[list[float], np.ndarray] | None:
    """a·exp(r·x): a log-linear start, refined by least squares in linear space (so it competes with the
    polynomials on the same footing). Needs y of one sign."""
    if not (np.all(y > 0) or np.all(y < 0)):
        return None
    sign = 1.0 if y[0] > 0 else -1.0
    r, log_a = np.polyfit(x, np.log(sign * y), 1)
    params = np.array([sign * math.exp(log_a), r])
    try:
        # Start-up time: scipy.optimize takes about a second to import, and every command loads this module.
        from scipy.optimize import curve_fit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refined, _ = curve_fit(lambda t, a, rr: a * np.exp(rr * t), x, y, p0=params, maxfev=2000)
        if np.all(np.isfinite(refined)):
            start_err = np.mean((y - params[0] * np.exp(params[1] * x)) ** 2)
            if np.mean((y - refined[0] * np.exp(refined[1] * x)) ** 2) <= start_err:
                params = refined
    except (RuntimeError, ValueError, OverflowError):
        pass
    return [float(p) for p in params], params[0] * np.exp(params[1] * x)


def fit_growth(y, x=None, *, tolerance: float = 0.02, rel_margin: float = 0.25) -> GrowthClassification:
    """Classify the growth of ``y`` over ``x`` (default 0, 1, …). A class needs more points than parameters
    to be fitted (constant 2, linear 3, quadratic 4, exponential 3); with fewer, it is not considered."""
    y = np.asarray(y, dtype=float)
    x = np.arange(len(y), dtype=float) if x is None else np.asarray(x, dtype=float)
    if not np.all(np.isfinite(y)):
        return GrowthClassification("exponential", non_finite=True, factor=math.inf)
    factor = float(np.max(np.abs(y)) / abs(y[0])) if y[0] != 0 else math.inf
    n = len(y)
    fits: dict[str, GrowthFit] = {}
    for degree, name in ((0, "constant"), (1, "linear"), (2, "quadratic")):
        if n > degree + 1:
            params, y_hat = _polyfit(x, y, degree)
            fits[name] = GrowthFit(name, params, *_quality(y, y_hat))
    if n > 2:
        exp = _expfit(x, y)
        if exp is not None:
            params, y_hat = exp
            fits["exponential"] = GrowthFit("exponential", params, *_quality(y, y_hat))
    if not fits:
        return GrowthClassification("constant", factor=factor)
    best = min(f.rel_rmse for f in fits.values())
    threshold = best * (1 + rel_margin) + tolerance
    chosen = next(name for name in GROWTH_CLASSES if name in fits and fits[name].rel_rmse <= threshold)
    if chosen == "quadratic" and "linear" in fits:
        slope, curvature = fits["linear"].params[1], fits["quadratic"].params[2]
        if slope * curvature < 0:  # bending back toward flat (e.g. sqrt): growth no faster than linear
            chosen = "linear"
    rate = math.exp(fits["exponential"].params[1]) if "exponential" in fits else math.nan
    return GrowthClassification(chosen, fits, factor=factor, rate=rate)



@dataclass
class DepthDependence:
    """How a ratio r(L) that is 1 for a single block (L = 1) departs from 1 as the depth L grows."""

    model: str
    """``exponential`` (ln r = b·(L − 1): a constant factor per block) or ``power`` (ln r = c·ln L)."""
    per_block: float
    """exp(b): the factor per block of the exponential model."""
    exponent: float
    """c: the exponent of the power model."""
    sse_exponential: float
    sse_power: float


def depth_dependence(depths, ratios) -> DepthDependence | None:
    """Fit both one-parameter models through r(1) = 1 to ratios measured at ≥ 2 depths (> 1), by least
    squares on ln r, and name the better. None when there are too few usable depths."""
    pairs = [(L, r) for L, r in zip(depths, ratios) if L > 1 and r is not None and math.isfinite(r) and r > 0]
    if len(pairs) < 2:
        return None
    L = np.array([p[0] for p in pairs], dtype=float)
    y = np.log(np.array([p[1] for p in pairs], dtype=float))
    xe, xp = L - 1, np.log(L)
    b, c = float(xe @ y / (xe @ xe)), float(xp @ y / (xp @ xp))
    sse_e, sse_p = float(np.sum((y - b * xe) ** 2)), float(np.sum((y - c * xp) ** 2))
    return DepthDependence("exponential" if sse_e < sse_p else "power", math.exp(b), c, sse_e, sse_p)
