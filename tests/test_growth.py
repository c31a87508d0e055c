"""``spannorm.theory.growth``: clear profiles get their growth class (exactly and with a few percent of noise),
the fits recover the parameters they were built from, and the parsimony rule of docs/stability.md "## Growth
classes" decides the borderline cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spannorm.theory.growth import GROWTH_CLASSES, depth_dependence, fit_growth

LAYERS = np.arange(16, dtype=float)
PROFILES = {
    "constant": lambda x: np.full_like(x, 3.0),
    "linear": lambda x: 1.0 + 0.5 * x,
    "quadratic": lambda x: 1.0 + 0.2 * x ** 2,
    "exponential": lambda x: 2.0 ** x,
}


@pytest.mark.parametrize("growth_class", GROWTH_CLASSES)
def test_clear_profiles_get_their_class(growth_class):
    g = fit_growth(PROFILES[growth_class](LAYERS))
    assert g.growth_class == growth_class and not g.non_finite
    assert g.quality == pytest.approx(0.0, abs=1e-6)  # the chosen model is exact


@pytest.mark.parametrize("noise", [0.02, 0.05])
@pytest.mark.parametrize("growth_class", GROWTH_CLASSES)
def test_clear_profiles_keep_their_class_under_multiplicative_noise(growth_class, noise):
    rng = np.random.default_rng(0)
    clean = PROFILES[growth_class](LAYERS)
    for _ in range(20):  # 20 noisy draws from one fixed seed
        y = clean * (1 + noise * rng.standard_normal(len(LAYERS)))
        assert fit_growth(y).growth_class == growth_class


def test_fits_recover_the_parameters():
    g = fit_growth(PROFILES["linear"](LAYERS))
    assert g.fits["linear"].params == pytest.approx([1.0, 0.5])
    assert g.factor == pytest.approx(8.5)  # max / first = 8.5 / 1
    g = fit_growth(PROFILES["quadratic"](LAYERS))
    assert g.fits["quadratic"].params == pytest.approx([1.0, 0.0, 0.2], abs=1e-9)
    g = fit_growth(PROFILES["exponential"](LAYERS))
    assert g.fits["exponential"].params == pytest.approx([1.0, math.log(2)])
    assert g.rate == pytest.approx(2.0) and g.factor == pytest.approx(2.0 ** 15)
    assert g.fits["exponential"].r2 == pytest.approx(1.0)
    # the polynomials are far off on 2^l: the exponential is not a parsimony tie
    assert g.fits["quadratic"].rel_rmse > 0.5


def test_borderline_slow_exponential_is_called_quadratic():
    """1.05^l over 17 points (l = 0…16, ×2.18 overall). The exponential fits exactly, and so nearly does a
    quadratic (relative RMSE 0.0017, within the absolute tolerance 0.02); a line does not (0.025). Over this
    range the data cannot tell a quadratic from an exponential, so the parsimony rule returns the milder of
    the two: ``quadratic``. That is what the rule says, not evidence against exponential growth; the
    exponential fit still recovers the rate."""
    g = fit_growth(1.05 ** np.arange(17, dtype=float))
    fits = {name: fit.rel_rmse for name, fit in g.fits.items()}
    threshold = min(fits.values()) * 1.25 + 0.02  # the documented parsimony threshold
    assert fits["exponential"] == pytest.approx(0.0, abs=1e-9)
    assert fits["quadratic"] <= threshold < fits["linear"]
    assert g.growth_class == "quadratic"
    assert g.rate == pytest.approx(1.05) and g.factor == pytest.approx(1.05 ** 16)


def test_slower_exponential_over_a_short_range_is_called_linear():
    """The doc's example of the rule: a slowly growing exponential that a line fits as well is linear."""
    g = fit_growth(1.02 ** np.arange(17, dtype=float))
    assert g.fits["linear"].rel_rmse < 0.02
    assert g.growth_class == "linear"


def test_concave_growth_is_linear():
    # sqrt(l): the quadratic fits better, but bends back against the trend, so it grows no faster than linear
    g = fit_growth(np.sqrt(np.arange(1, 17, dtype=float)))
    assert g.fits["quadratic"].rel_rmse < g.fits["linear"].rel_rmse
    assert g.fits["quadratic"].params[2] < 0 < g.fits["linear"].params[1]
    assert g.growth_class == "linear"


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_profiles_are_exponential(bad):
    g = fit_growth([1.0, 10.0, 1e30, bad])
    assert g.growth_class == "exponential" and g.non_finite and g.factor == math.inf


def test_depth_dependence_tells_a_factor_per_block_from_a_power_law():
    depths = [4, 16, 64]
    exp = depth_dependence(depths, [1.1 ** (L - 1) for L in depths])
    assert exp.model == "exponential" and exp.per_block == pytest.approx(1.1)
    power = depth_dependence(depths, [L ** 1.5 for L in depths])
    assert power.model == "power" and power.exponent == pytest.approx(1.5)
    assert depth_dependence([16], [5.0]) is None  # one depth: nothing to fit
