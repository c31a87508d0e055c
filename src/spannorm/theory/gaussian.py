"""Gaussian expectations the init theory needs.

Every weight matrix at init is zero-mean Gaussian, so a pre-activation is a Gaussian whose variance is a
multiple of its input's mean square. What the branches output then reduces to a few one- and
two-dimensional Gaussian integrals, computed here by Gauss-Hermite quadrature, plus one closed-form
approximation for softmax attention.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(64)
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)
"""Nodes and weights of E[f(z)] for z ~ N(0, 1) (probabilists' Hermite), exact for polynomials of degree
< 128 and accurate to ~1e-10 for the smooth functions below."""


def silu(x: np.ndarray) -> np.ndarray:
    """x·sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def silu_derivative(x: np.ndarray) -> np.ndarray:
    """d silu / dx = sigmoid(x)·(1 + x·(1 − sigmoid(x)))."""
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def gaussian_expectation(f, variance: float) -> float:
    """E[f(g)] for g ~ N(0, variance)."""
    return float(np.sum(_WEIGHTS * f(math.sqrt(variance) * _NODES)))


def silu_second_moment(variance: float) -> float:
    """E[silu(g)²] for g ~ N(0, variance) (0.3557 at variance 1)."""
    return gaussian_expectation(lambda g: silu(g) ** 2, variance)


def silu_derivative_second_moment(variance: float) -> float:
    """E[silu'(g)²] for g ~ N(0, variance): the gain of SiLU's Jacobian."""
    return gaussian_expectation(lambda g: silu_derivative(g) ** 2, variance)


_RHO_GRID = np.linspace(-1.0, 1.0, 401)
_KERNEL_FUNCTIONS = {"silu": silu, "silu_derivative": silu_derivative}


@lru_cache(maxsize=128)
def _kernel_table(function: str, variance: float) -> np.ndarray:
    f = _KERNEL_FUNCTIONS[function]
    z1, z2 = np.meshgrid(_NODES, _NODES, indexing="ij")
    w = np.outer(_WEIGHTS, _WEIGHTS)
    sd = math.sqrt(variance)
    table = np.empty_like(_RHO_GRID)
    for i, rho in enumerate(_RHO_GRID):
        a = sd * z1
        b = sd * (rho * z1 + math.sqrt(max(0.0, 1.0 - rho * rho)) * z2)
        table[i] = np.sum(w * f(a) * f(b))
    return table


def silu_kernel(variance: float, correlation: np.ndarray) -> np.ndarray:
    """E[silu(a)·silu(b)] for (a, b) jointly Gaussian with equal ``variance`` and the given correlation
    (element-wise over an array of correlations; tabulated on a grid of 401 correlations)."""
    rho = np.clip(correlation, -1.0, 1.0)
    return np.interp(rho, _RHO_GRID, _kernel_table("silu", round(float(variance), 6)))


def silu_derivative_kernel(variance: float, correlation: np.ndarray) -> np.ndarray:
    """E[silu'(a)·silu'(b)], as :func:`silu_kernel`: how SwiGLU's Jacobians at two tokens correlate."""
    rho = np.clip(correlation, -1.0, 1.0)
    return np.interp(rho, _RHO_GRID, _kernel_table("silu_derivative", round(float(variance), 6)))


_COLLISION_SAMPLES = 16384
_COLLISION_STEP = 0.05


@lru_cache(maxsize=512)
def _collision_curve(grid_index: int, max_keys: int) -> np.ndarray:
    """E[Σ_i p_i²] for n = 1 … max_keys keys at logit variance grid_index·_COLLISION_STEP, by Monte Carlo
    with a fixed seed (prefix sums give every n from one set of samples)."""
    s = grid_index * _COLLISION_STEP
    z = np.random.default_rng(0).standard_normal((_COLLISION_SAMPLES, max_keys)) * math.sqrt(s)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (np.cumsum(e * e, axis=1) / np.cumsum(e, axis=1) ** 2).mean(axis=0)


def softmax_collision(n_keys: np.ndarray, logit_variance: np.ndarray) -> np.ndarray:
    """E[Σ_i p_i²] for p = softmax(z) over ``n_keys`` i.i.d. logits z_i ~ N(0, logit_variance), element-wise.

    It is 1/n for uniform attention and 1 for a single key; Gaussian logits concentrate the weights, which
    raises it (about e^{s}/n for many keys). Computed by Monte Carlo with a fixed seed (16384 samples,
    relative error ~1%), linearly interpolated in the variance on a grid of step 0.05."""
    n = np.asarray(n_keys, dtype=int)
    s = np.maximum(np.asarray(logit_variance, dtype=float), 0.0)
    n, s = np.broadcast_arrays(n, s)
    max_keys = int(n.max())
    lo = np.floor(s / _COLLISION_STEP).astype(int)
    frac = s / _COLLISION_STEP - lo
    out = np.empty(n.shape, dtype=float)
    for index in np.unique(lo):
        mask = lo == index
        below = _collision_curve(int(index), max_keys)[n[mask] - 1]
        above = _collision_curve(int(index) + 1, max_keys)[n[mask] - 1]
        out[mask] = (1 - frac[mask]) * below + frac[mask] * above
    return out
