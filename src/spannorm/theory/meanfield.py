"""What the theory predicts at init, per placement: the variance recursion, the identity-path product
∏ α/σ_l and the gradient profile.

The state propagated through the blocks is the token Gram matrix K[t, t'] = E[x_t · x_t'] / d of the
residual stream, one T×T matrix per sequence: its diagonal is the stream's mean square (the variance
recursion), its off-diagonal the similarity between tokens (which attention mixing raises). Each placement's
block is written below as a short function that mirrors its equation in SPEC §2, on Gram matrices.

Assumptions (the mean-field approximation at init; each is checked against measurements in the tests):

1. Every weight matrix is zero-mean and independent of everything upstream, so a branch's output is
   uncorrelated with the skip it is added to: the Grams of a sum add. (One exception is handled exactly:
   ``span_b2t`` adds h = N(x + A(x)) back to x, and h is correlated with x.)
2. A linear map whose entries have variance c/fan_in multiplies the Gram by c (the matrix's *gain*).
3. SwiGLU: gate and up pre-activations are Gaussian, so E[silu(g_t) silu(g_t')] is a two-dimensional Gaussian
   integral (Gauss-Hermite), at the mean variance of the input tokens (inputs of FFNs are normalized).
4. Attention: the logits of one query over its keys are i.i.d. Gaussian with variance
   c_q·c_k·K_tt·(mean K_ii − mean K_ij over its keys), so E[p_ti] = 1/(t+1) (causal, uniform in mean), and the
   collision E[Σ_i p_ti²] comes from :func:`~spannorm.theory.gaussian.softmax_collision`. Different queries
   have independent weights. RoPE is a rotation and does not change these moments.
5. Norms: RMSNorm and LayerNorm both divide each token by its RMS (the feature mean of a random projection
   is O(1/√d) and is ignored); gains are 1 at init.
6. Backward: the gradient entering a block is independent of the block's weights, and gradients of different
   tokens are uncorrelated. A branch's Jacobian then multiplies E‖δ‖² by its *Jacobian gain* χ (SwiGLU: exact
   Gaussian integrals; attention: the value path plus an estimate of the softmax path); a norm multiplies it
   by (1 − 1/d)/(mean square of its input). The predicted gradient ratio is the rougher of the predictions
   (SPEC §5 lists no closed form for it); the tests hold it to a factor, not to 20%.
7. MoE FFNs: the router is near-uniform at init, so the top-k gates are ≈ 1/k and the routed output has
   1/k of one expert's Gram, plus the shared expert's. Routing's effect on token correlation is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spannorm.config import ModelConfig
from spannorm.model.placements import BLOCKS, BlockInit, has_dual_stream
from spannorm.theory.gaussian import silu_derivative_kernel, silu_kernel, softmax_collision

IDENTITY_PATH_NORMS: dict[str, tuple[tuple[str, str], ...]] = {
    placement: cls.identity_path_norms for placement, cls in BLOCKS.items()}
"""The norms that sit on the clean skip path of each block placement (each block class's
``identity_path_norms``), with where their skip input comes from: ``in`` is the block input x_l, ``mid`` the
stream at the block's ``hook_mid``. The identity-path factor of such a norm is α·RMS(skip input)/RMS(pre-norm
sum), i.e. α/σ with σ = RMS(sum)/RMS(skip) (σ² = α² + v for a unit-variance skip and a branch of variance v).
Placements with none (pre, peri, lns) have no norm on the skip path: their identity-path product is 1."""


# ---------------------------------------------------------------------------------------------- init gains
@dataclass(frozen=True)
class MatrixGains:
    """The gain c = fan_in·std² of each matrix of a block at init: a linear map multiplies the mean square of
    its input by c. FFN gains are those of one expert for MoE layers."""

    q: float
    k: float
    v: float
    o: float
    gate: float
    up: float
    down: float
    ffn_multiplicity: float = 1.0
    """How many expert-Grams the FFN output carries: 1 for a dense FFN, 1/top_k (+1 with a shared expert)
    for MoE (assumption 7)."""


def block_init_rule(cfg: ModelConfig, placement: str) -> BlockInit:
    """The init rule a block of ``placement`` applies on top of the model-wide init (SPEC §3): its block
    class's ``init_rule`` (GPT-2 output scaling for pre-style blocks, SpanNorm's scaling, DeepNet's Xavier
    gain), the same rule the model applies."""
    return BLOCKS[placement].init_rule(cfg)


def init_gains(cfg: ModelConfig, placement: str) -> MatrixGains:
    """Gains of every matrix of a ``placement`` block of ``cfg`` at init, from the init rules of SPEC §3."""
    rule = block_init_rule(cfg, placement)
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    hidden = cfg.expert_hidden if cfg.moe is not None else cfg.ffn_hidden

    def fan_in_gain(fan_in: int, scale: float = 1.0) -> float:
        std = cfg.init_std / math.sqrt(fan_in) if cfg.init == "fan_in" else cfg.init_std
        return fan_in * (std * scale) ** 2

    def xavier_gain(fan_in: int, fan_out: int, gain: float) -> float:
        return fan_in * gain ** 2 * 2.0 / (fan_in + fan_out)

    if rule.xavier_gain is not None:
        g = rule.xavier_gain
        gains = dict(q=xavier_gain(d, d, 1.0), k=xavier_gain(d, kv, 1.0), v=xavier_gain(d, kv, g),
                     o=xavier_gain(d, d, g), gate=xavier_gain(d, hidden, g), up=xavier_gain(d, hidden, g),
                     down=xavier_gain(hidden, d, g))
    else:
        s = rule.out_proj_scale
        gains = dict(q=fan_in_gain(d), k=fan_in_gain(d), v=fan_in_gain(d), o=fan_in_gain(d, s),
                     gate=fan_in_gain(d), up=fan_in_gain(d), down=fan_in_gain(hidden, s))
    multiplicity = 1.0
    if cfg.moe is not None:
        multiplicity = 1.0 / cfg.moe.top_k + (1.0 if cfg.moe.shared_expert else 0.0)
    return MatrixGains(**gains, ffn_multiplicity=multiplicity)


# ---------------------------------------------------------------------------------------------- Gram algebra
def mean_square(K: np.ndarray) -> float:
    """The stream's mean square (entry-wise second moment): the mean of the Gram's diagonal."""
    return float(np.diagonal(K, axis1=-2, axis2=-1).mean())


def token_correlation(K: np.ndarray) -> float:
    """Mean pairwise cosine between the tokens of a sequence (predicted token uniformity)."""
    r = np.sqrt(np.diagonal(K, axis1=-2, axis2=-1))
    C = K / (r[..., :, None] * r[..., None, :])
    T = K.shape[-1]
    return float((C.sum(axis=(-2, -1)) - T).mean() / (T * (T - 1))) if T > 1 else 0.0


def normalize(K: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """A per-token norm with gain ``scale``: every token rescaled to mean square scale²."""
    r = np.sqrt(np.diagonal(K, axis1=-2, axis2=-1))
    return scale ** 2 * K / (r[..., :, None] * r[..., None, :])


def _prefix_stats(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query t: the sum of K_ii and the sum of K_ij over its keys i, j ≤ t."""
    diag_sum = np.cumsum(np.diagonal(K, axis1=-2, axis2=-1), axis=-1)
    all_sum = np.diagonal(np.cumsum(np.cumsum(K, axis=-1), axis=-2), axis1=-2, axis2=-1)
    return diag_sum, all_sum


Backward = Callable[[np.ndarray], np.ndarray]
"""Maps the gradient Gram Δ[t, t'] = E[δ_t·δ_t'] at an operation's output to the one at its input."""


class BlockTheory:
    """The mean-field maps of one block's parts (attention, FFN, norms) with the block's constants, and a
    record of what the block's step did (identity-path factors, branch variances). Each part returns its
    output Gram and its backward map on gradient Grams."""

    def __init__(self, cfg: ModelConfig, layer_index: int, placement: str, alpha: float | None = None):
        self.cfg, self.layer_index, self.placement = cfg, layer_index, placement
        self.gains = init_gains(cfg, placement)
        self.d = cfg.d_model
        self.delta_t = cfg.delta_t
        block = BLOCKS[placement]
        self.alpha, self.beta = block.residual_scales(cfg)
        if alpha is not None and block.knob is not None and block.knob.name == "alpha":
            self.alpha = alpha
        self.identity_factors: list[tuple[str, float]] = []
        self.branch_variances: dict[str, float] = {}

    # -------------------------------------------------------------- parts
    def attention(self, K: np.ndarray, qkv_norm: bool = False) -> tuple[np.ndarray, Backward]:
        """Gram of A(x) for input Gram K (assumption 4) and its backward map (assumption 6): the value path
        exactly in the mean (E[PᵀΔP] with the collision on each query's keys), the softmax path per token."""
        g = self.gains
        T = K.shape[-1]
        n = np.arange(1, T + 1, dtype=float)
        pairs = np.maximum(n * (n - 1), 1.0)
        diag = np.diagonal(K, axis1=-2, axis2=-1)
        if qkv_norm:  # Q, K and V normalized per head: unit mean square; the Grams become correlations
            logit_input = values = normalize(K)
            logit_gain, query_ms, value_gain = 1.0, np.ones_like(diag), 1.0
            backward_gain = g.o / diag  # through the value norm: gain c_v/(c_v·mean square)
        else:
            logit_input, values = K, g.v * K
            logit_gain, query_ms, value_gain = g.q * g.k, diag, g.v
            backward_gain = g.o * g.v * np.ones_like(diag)
        diag_sum, all_sum = _prefix_stats(logit_input)
        spread = np.maximum(diag_sum / n - (all_sum - diag_sum) / pairs, 0.0)
        collision = softmax_collision(np.broadcast_to(n, spread.shape), logit_gain * query_ms * spread)
        P = np.tril(np.ones((T, T))) / n[:, None]
        M = P @ values @ P.T
        v_diag_sum, v_all_sum = _prefix_stats(values)
        idx = np.arange(T)
        M[..., idx, idx] = collision / n * v_diag_sum + (1 - collision) / pairs * (v_all_sum - v_diag_sum)
        # E[p_ti p_ti'] − p̄_ti p̄_ti' for query t, on its keys i = i' (a) and i ≠ i' (b)
        a = collision / n - 1 / n ** 2
        b = np.where(n > 1, (1 - collision) / pairs - 1 / n ** 2, 0.0)
        later = np.maximum.outer(idx, idx)  # keys i, i' are both seen by queries t ≥ max(i, i')
        softmax_path = 2 * logit_gain * value_gain * collision * (1 - collision) * spread * query_ms

        def backward(D: np.ndarray) -> np.ndarray:
            Dd = np.diagonal(D, axis1=-2, axis2=-1) * backward_gain
            rev_b = np.cumsum((b * Dd)[..., ::-1], axis=-1)[..., ::-1]
            rev_ab = np.cumsum(((a - b) * Dd)[..., ::-1], axis=-1)[..., ::-1]
            out = P.T @ (D * np.sqrt(backward_gain[..., :, None] * backward_gain[..., None, :])) @ P
            out = out + np.take_along_axis(rev_b, later.reshape(-1)[None], axis=-1).reshape(out.shape)
            out[..., idx, idx] += rev_ab + g.o * softmax_path * np.diagonal(D, axis1=-2, axis2=-1)
            return out

        return g.o * M, backward

    def ffn(self, K: np.ndarray) -> tuple[np.ndarray, Backward]:
        """Gram of the SwiGLU FFN's output for input Gram K (assumption 3) and its backward map: through
        W_g, the Jacobians at two tokens correlate as E[silu'(g_t) silu'(g_t')]·E[u_t u_t']; through W_u,
        as E[silu(g_t) silu(g_t')]."""
        g = self.gains
        r = np.sqrt(np.diagonal(K, axis1=-2, axis2=-1))
        rho = K / (r[..., :, None] * r[..., None, :])
        gate_var = g.gate * mean_square(K)
        scale = g.ffn_multiplicity * g.down * g.up
        kernel = silu_kernel(gate_var, rho)
        jacobian_kernel = scale * (g.gate * K * silu_derivative_kernel(gate_var, rho) + kernel)
        return scale * K * kernel, lambda D: D * jacobian_kernel

    def norm(self, K: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, Backward]:
        """A per-token norm with gain ``scale``; backward divides each token's gradient by its RMS (the
        projection off the token's own direction is left out: the gradient arriving from above is already
        nearly orthogonal to it)."""
        r = np.sqrt(np.diagonal(K, axis1=-2, axis2=-1))
        outer = r[..., :, None] * r[..., None, :]
        return scale ** 2 * K / outer, lambda D: scale ** 2 * D / outer

    # -------------------------------------------------------------- records
    def identity(self, position: str, skip: np.ndarray, total: np.ndarray, alpha: float = 1.0) -> None:
        """Record the identity-path factor α·RMS(skip)/RMS(sum) of the norm at ``position``."""
        expected = [p for p, _ in IDENTITY_PATH_NORMS[self.placement]]
        assert position in expected, f"{position} is not on {self.placement}'s identity path"
        self.identity_factors.append(
            (f"block{self.layer_index}.{position}", alpha * math.sqrt(mean_square(skip) / mean_square(total))))

    def branch(self, name: str, gram: np.ndarray, input_gram: np.ndarray) -> None:
        """Record a branch's variance relative to its input's mean square (v_l of SPEC §3)."""
        self.branch_variances[name] = mean_square(gram) / mean_square(input_gram)


# ---------------------------------------------------------------------------------------------- placements
# Each step maps the Gram of x_l to the Gram of x_{l+1}, and returns the backward map from the gradient Gram
# at x_{l+1} to the one at x_l. Skip and branch gradients add without cross terms (fresh output matrices),
# except where a norm's output is added back to its own input (span_b2t).

def _pre_step(b: BlockTheory, K: np.ndarray, norm_scale: float = 1.0) -> tuple[np.ndarray, Backward]:
    dt2 = b.delta_t ** 2
    n1, n1_back = b.norm(K, norm_scale)
    A, a_back = b.attention(n1)
    b.branch("attn", A, n1)
    h = K + dt2 * A
    n2, n2_back = b.norm(h, norm_scale)
    F, f_back = b.ffn(n2)
    b.branch("ffn", F, n2)

    def backward(D):
        D_h = D + dt2 * n2_back(f_back(D))
        return D_h + dt2 * n1_back(a_back(D_h))
    return h + dt2 * F, backward


def _lns_step(b: BlockTheory, K: np.ndarray) -> tuple[np.ndarray, Backward]:
    return _pre_step(b, K, norm_scale=1 / math.sqrt(b.layer_index + 1))


def _peri_step(b: BlockTheory, K: np.ndarray) -> tuple[np.ndarray, Backward]:
    dt2 = b.delta_t ** 2
    n1, n1_back = b.norm(K)
    A, a_back = b.attention(n1)
    b.branch("attn", A, n1)
    nA, nA_back = b.norm(A)
    h = K + dt2 * nA
    n2, n2_back = b.norm(h)
    F, f_back = b.ffn(n2)
    b.branch("ffn", F, n2)
    nF, nF_back = b.norm(F)

    def backward(D):
        D_h = D + dt2 * n2_back(f_back(nF_back(D)))
        return D_h + dt2 * n1_back(a_back(nA_back(D_h)))
    return h + dt2 * nF, backward


def _post_step(b: BlockTheory, K: np.ndarray) -> tuple[np.ndarray, Backward]:
    dt2 = b.delta_t ** 2
    A, a_back = b.attention(K)
    b.branch("attn", A, K)
    s1 = K + dt2 * A
    b.identity("attn_out", K, s1)
    h, n1_back = b.norm(s1)
    F, f_back = b.ffn(h)
    b.branch("ffn", F, h)
    s2 = h + dt2 * F
    b.identity("ffn_out", h, s2)
    out, n2_back = b.norm(s2)

    def backward(D):
        D_s2 = n2_back(D)
        D_s1 = n1_back(D_s2 + dt2 * f_back(D_s2))
        return D_s1 + dt2 * a_back(D_s1)
    return out, backward


def _deepnorm_step(b: BlockTheory, K: np.ndarray) -> tuple[np.ndarray, Backward]:
    a2 = b.alpha ** 2
    A, a_back = b.attention(K)
    b.branch("attn", A, K)
    s1 = a2 * K + A
    b.identity("attn_out", K, s1, b.alpha)
    h, n1_back = b.norm(s1)
    F, f_back = b.ffn(h)
    b.branch("ffn", F, h)
    s2 = a2 * h + F
    b.identity("ffn_out", h, s2, b.alpha)
    out, n2_back = b.norm(s2)

    def backward(D):
        D_s2 = n2_back(D)
        D_s1 = n1_back(a2 * D_s2 + f_back(D_s2))
        return a2 * D_s1 + a_back(D_s1)
    return out, backward


def _span_post_step(b: BlockTheory, K: np.ndarray) -> tuple[np.ndarray, Backward]:
    a2, b2 = b.alpha ** 2, b.beta ** 2
    n1, n1_back = b.norm(K)
    A, a_back = b.attention(n1)
    b.branch("attn", A, n1)
    h = K + A
    n2, n2_back = b.norm(h)
    F, f_back = b.ffn(n2)
    b.branch("ffn", F, n2)
    s = a2 * K + b2 * (A + F)
    b.identity("block_out", K, s, b.alpha)
    out, no_back = b.norm(s)

    def backward(D):
        D_s = no_back(D)
        D_h = b2 * n2_back(f_back(D_s))  # what reaches h = x + a through f
        return a2 * D_s + D_h + n1_back(a_back(b2 * D_s + D_h))
    return out, backward


def _span_b2t_step(b: BlockTheory, K: np.ndarray) -> tuple[np.ndarray, Backward]:
    alpha, beta = b.alpha, b.beta
    A, a_back = b.attention(K)
    b.branch("attn", A, K)
    s1 = K + A
    h, n1_back = b.norm(s1)
    F, f_back = b.ffn(h)
    b.branch("ffn", F, h)
    r1 = np.sqrt(np.diagonal(s1, axis1=-2, axis2=-1))
    cross = K / r1[..., None, :] + K / r1[..., :, None]  # E[x_t·h_t'] + E[h_t·x_t'], h = (x + A)/RMS
    s = alpha ** 2 * K + beta ** 2 * (h + F) + alpha * beta * cross
    b.identity("block_out", K, s, alpha)
    out, no_back = b.norm(s)

    def backward(D):
        D_s = no_back(D)
        D_s1 = n1_back(beta ** 2 * (D_s + f_back(D_s)))
        skip_cross = alpha * beta * (D_s / r1[..., None, :] + D_s / r1[..., :, None])
        return alpha ** 2 * D_s + D_s1 + a_back(D_s1) + skip_cross
    return out, backward


def _span_step(b: BlockTheory, K: np.ndarray) -> tuple[np.ndarray, Backward]:
    step2 = (b.delta_t * b.beta) ** 2
    n1, n1_back = b.norm(K)
    A, a_back = b.attention(n1)
    b.branch("attn", A, n1)
    h = K + A
    n2, n2_back = b.norm(h)
    F, f_back = b.ffn(n2)
    b.branch("ffn", F, n2)
    out, no_back = b.norm(A + F, block_init_rule(b.cfg, b.placement).block_out_gain)

    def backward(D):
        D_s = step2 * no_back(D)  # what reaches s = a + f
        D_h = n2_back(f_back(D_s))  # what reaches h = x + a through f
        return D + D_h + n1_back(a_back(D_s + D_h))
    return K + step2 * out, backward


def _hybrid_step(b: BlockTheory, K: np.ndarray) -> tuple[np.ndarray, Backward]:
    A, a_back = b.attention(K, qkv_norm=True)
    b.branch("attn", A, K)
    s1 = K + A
    b.identity("attn_out", K, s1)
    n, n_back = b.norm(s1)
    F, f_back = b.ffn(n)
    b.branch("ffn", F, n)

    def backward(D):
        D_s1 = n_back(D + f_back(D))
        return D_s1 + a_back(D_s1)
    return n + F, backward


# ---- ResiDual: two streams. The state is the joint Gram of the 2T vectors (x_1 … x_T, d_1 … d_T), i.e. the
# blocks [[K_x, C], [Cᵀ, K_d]] with C[t, t'] = E[x_t·d_t']/d; gradient Grams are joint the same way. The branch
# reads x only, and (assumption 1) its output is uncorrelated with both streams' past, so it adds its Gram to
# K_x's pre-norm sum, to K_d, and to C's pre-norm sum. Backward: d only accumulates, so ∂L/∂d is the same at
# every depth; each branch output receives the gradient of both streams (the Post-LN path and d's), which is
# how ResiDual keeps its branches' gradients from vanishing with depth.

def split_streams(J: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K_x, C, K_d) of a joint two-stream Gram (B, 2T, 2T)."""
    T = J.shape[-1] // 2
    return J[..., :T, :T], J[..., :T, T:], J[..., T:, T:]


def join_streams(Kx: np.ndarray, C: np.ndarray, Kd: np.ndarray) -> np.ndarray:
    """The joint Gram of blocks K_x, C (x with d) and K_d."""
    return np.concatenate([np.concatenate([Kx, C], axis=-1),
                           np.concatenate([np.swapaxes(C, -1, -2), Kd], axis=-1)], axis=-2)


def _residual_sublayer(b: BlockTheory, K: np.ndarray, C: np.ndarray, Kd: np.ndarray, branch: np.ndarray):
    """One ResiDual sub-layer given the branch's output Gram: x' = N(x + Δt·f), d' = d + Δt·f."""
    dt2 = b.delta_t ** 2
    s = K + dt2 * branch
    r = np.sqrt(np.diagonal(s, axis1=-2, axis2=-1))
    out, n_back = b.norm(s)
    return out, (C + dt2 * branch) / r[..., :, None], Kd + dt2 * branch, r, n_back


def _residual_sublayer_backward(dt2: float, r: np.ndarray, n_back: Backward, f_back: Backward,
                                G: np.ndarray, Gc: np.ndarray, Gd: np.ndarray):
    """Gradient Grams (δx, δx with δd, δd) at a sub-layer's input from those at its output."""
    Gs, Gsc = n_back(G), Gc / r[..., :, None]  # through the norm: each token divided by its RMS
    Gf = dt2 * (Gs + Gsc + np.swapaxes(Gsc, -1, -2) + Gd)  # the branch output feeds both streams
    return Gs + f_back(Gf), Gsc, Gd


def _residual_step(b: BlockTheory, J: np.ndarray) -> tuple[np.ndarray, Backward]:
    K, C, Kd = split_streams(J)
    A, a_back = b.attention(K)
    b.branch("attn", A, K)
    h, C, Kd, r1, n1_back = _residual_sublayer(b, K, C, Kd, A)
    F, f_back = b.ffn(h)
    b.branch("ffn", F, h)
    out, C, Kd, r2, n2_back = _residual_sublayer(b, h, C, Kd, F)
    dt2 = b.delta_t ** 2

    def backward(G):
        G_h = _residual_sublayer_backward(dt2, r2, n2_back, f_back, *split_streams(G))
        return join_streams(*_residual_sublayer_backward(dt2, r1, n1_back, a_back, *G_h))
    return join_streams(out, C, Kd), backward


def dual_stream_start(K: np.ndarray) -> np.ndarray:
    """The joint Gram at the embedding, where d_0 = x_0."""
    return join_streams(K, K, K)


def dual_stream_output_backward(J: np.ndarray, D: np.ndarray) -> np.ndarray:
    """The joint gradient Gram at (x_L, d_L) for a gradient Gram D at the model's output x_L + N(d_L) (joint
    forward Gram J): δx_L = δy, δd_L = δy divided per token by the RMS of d_L."""
    r = np.sqrt(np.diagonal(split_streams(J)[2], axis1=-2, axis2=-1))
    return join_streams(D, D / r[..., None, :], D / (r[..., :, None] * r[..., None, :]))


def dual_stream_input_gradient(G: np.ndarray) -> np.ndarray:
    """The gradient Gram at the embedding, which feeds both streams: δx_0 + δd_0."""
    Gx, Gc, Gd = split_streams(G)
    return Gx + Gc + np.swapaxes(Gc, -1, -2) + Gd


STEPS = {
    "pre": _pre_step, "lns": _lns_step, "peri": _peri_step, "post": _post_step, "deepnorm": _deepnorm_step,
    "span": _span_step, "span_post": _span_post_step, "span_b2t": _span_b2t_step, "hybrid": _hybrid_step,
    "residual": _residual_step,
}
"""The mean-field step of each block placement (``mixln`` is a pattern of ``post`` and ``pre``); ``residual``'s
maps the joint two-stream Gram (see :func:`split_streams`). Keyed like
:data:`~spannorm.model.placements.BLOCKS` (a test holds the keys equal): the Gram algebra is theory, a layer
above the model, so it lives here rather than on the block class."""


# ---------------------------------------------------------------------------------------------- prediction
@dataclass
class InitPrediction:
    """The theory's picture of a model at init (SPEC §3, §5)."""

    placements: list[str]
    """Block placement of each layer."""
    stream_mean_square: list[float]
    """Predicted mean square of x_0 … x_L: the variance recursion (≈ entry-wise variance at init)."""
    token_correlation: list[float]
    """Predicted mean pairwise cosine of the tokens of x_0 … x_L (token uniformity)."""
    branch_variance: list[dict[str, float]]
    """Per block, each branch's output mean square over its input's (v_l; keys ``attn`` and ``ffn``)."""
    identity_factor_names: list[str]
    """The norms on the identity path, as ``block{l}.{position}``, in forward order."""
    identity_factors: list[float]
    """α·RMS(skip)/RMS(pre-norm sum) of each of those norms."""
    grad_norm: list[float]
    """Predicted ‖∂L/∂x_l‖ for l = 0 … L-1, relative to the last block's input (1.0 at l = L-1), for a
    gradient at x_L that is independent across tokens."""
    dual_mean_square: list[float] | None = None
    """ResiDual only: predicted mean square of its dual stream d_0 … d_L (what ``hook_dual`` sees); None for
    single-stream placements."""

    @property
    def identity_product(self) -> float:
        """∏ α/σ over the identity path (1 when no norm sits on it)."""
        return float(np.prod(self.identity_factors)) if self.identity_factors else 1.0

    @property
    def variance_ratio(self) -> float:
        """Predicted Var(x_L)/Var(x_0)."""
        return self.stream_mean_square[-1] / self.stream_mean_square[0]

    @property
    def grad_ratio(self) -> float:
        """Predicted ‖∂L/∂x_0‖ / ‖∂L/∂x_{L-1}‖."""
        return self.grad_norm[0]


def token_gram(cfg: ModelConfig, tokens: torch.Tensor | np.ndarray | None = None,
               seq_len: int | None = None) -> np.ndarray:
    """Gram of the embedding output x_0 at init, shape (B, T, T): E[x_t·x_t']/d = (embedding std ·
    multiplier)² when tokens t and t' are the same token, else 0. Without ``tokens``: ``seq_len`` (default:
    the context length) distinct tokens."""
    std = cfg.init_std / math.sqrt(cfg.d_model) if cfg.init == "fan_in" else cfg.init_std
    scale = 1.0 if cfg.embed_norm else (std * cfg.embedding_multiplier) ** 2
    if tokens is None:
        T = seq_len or cfg.context_length
        return scale * np.eye(T)[None]
    tok = np.asarray(tokens)
    if tok.ndim == 1:
        tok = tok[None]
    return scale * (tok[:, :, None] == tok[:, None, :]).astype(float)


def target_gram(cfg: ModelConfig, targets: torch.Tensor | np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """Gram of the loss gradient at x_L, up to a constant: at init the softmax is near uniform (the default
    untied head, logits of std ~1/2; a tied head instead favours each input token), so the gradient of token
    t's logits is ≈ e_{y_t} − 1/V, and the random head maps it to a vector whose inner products are [y_t = y_t'] − 1/V.
    Without ``targets``: independent tokens (the identity)."""
    if targets is None:
        return np.broadcast_to(np.eye(like.shape[-1]), like.shape).copy()
    y = np.asarray(targets)
    if y.ndim == 1:
        y = y[None]
    return (y[:, :, None] == y[:, None, :]).astype(float) - 1.0 / cfg.vocab_size


def predict_init(cfg: ModelConfig, tokens: torch.Tensor | np.ndarray | None = None,
                 seq_len: int | None = None, *, targets: torch.Tensor | np.ndarray | None = None,
                 alpha: float | None = None) -> InitPrediction:
    """The mean-field prediction for ``cfg`` at init on ``tokens`` (B, T), or on ``seq_len`` distinct
    tokens; ``targets`` (B, T) shape the gradient's correlation across tokens (:func:`target_gram`).
    ``alpha`` overrides the skip multiplier of span_post, span_b2t and deepnorm blocks (DeepNet's α is not a
    config field). Cost: O(L·B·T³) in numpy (about 10 ms per block at T = 64, B = 8)."""
    K = token_gram(cfg, tokens, seq_len)
    placements = cfg.layer_placements()
    dual = has_dual_stream(cfg)
    if dual:  # ResiDual: K is the joint Gram of (x, d) from here on
        return _predict_dual_stream(cfg, dual_stream_start(K), targets, alpha)
    moments, correlations = [mean_square(K)], [token_correlation(K)]
    branches, names, factors, backwards = [], [], [], []
    for layer, placement in enumerate(placements):
        block = BlockTheory(cfg, layer, placement, alpha)
        K, backward = STEPS[placement](block, K)
        moments.append(mean_square(K))
        correlations.append(token_correlation(K))
        branches.append(dict(block.branch_variances))
        names += [n for n, _ in block.identity_factors]
        factors += [f for _, f in block.identity_factors]
        backwards.append(backward)
    D = target_gram(cfg, targets, K)
    grad_sq = []
    for backward in reversed(backwards[:-1] if backwards else []):
        D = backward(D)
        grad_sq.append(float(np.trace(D, axis1=-2, axis2=-1).mean()))
    T = K.shape[-1]
    grad_norm = [math.sqrt(v / T) for v in reversed(grad_sq)] + [1.0]
    return InitPrediction(placements=placements, stream_mean_square=moments, token_correlation=correlations,
                          branch_variance=branches, identity_factor_names=names, identity_factors=factors,
                          grad_norm=grad_norm)


def _predict_dual_stream(cfg: ModelConfig, J: np.ndarray, targets: torch.Tensor | np.ndarray | None,
                         alpha: float | None) -> InitPrediction:
    """:func:`predict_init` for ResiDual, on the joint Gram ``J`` of (x, d) at the embedding. The stream
    statistics are x's (what ``hook_out`` sees); d's mean square goes to ``dual_mean_square``. The gradient
    starts at the output x_L + N(d_L) (for the single-stream placements it starts at x_(L-1), as there the
    last block's backward would only rescale it), so every block's backward is applied; ∂L/∂x_0 is the
    gradient at the embedding, which feeds both streams."""
    placements = cfg.layer_placements()
    stream = [split_streams(J)]
    branches, backwards = [], []
    for layer, placement in enumerate(placements):
        block = BlockTheory(cfg, layer, placement, alpha)
        J, backward = STEPS[placement](block, J)
        stream.append(split_streams(J))
        branches.append(dict(block.branch_variances))
        backwards.append(backward)
    G = dual_stream_output_backward(J, target_gram(cfg, targets, stream[-1][0]))
    grad_sq = []  # ‖δx_l‖² for l = L-1 … 0
    for layer, backward in reversed(list(enumerate(backwards))):
        G = backward(G)
        at_x = dual_stream_input_gradient(G) if layer == 0 else split_streams(G)[0]
        grad_sq.append(float(np.trace(at_x, axis1=-2, axis2=-1).mean()))
    return InitPrediction(placements=placements, stream_mean_square=[mean_square(Kx) for Kx, _, _ in stream],
                          token_correlation=[token_correlation(Kx) for Kx, _, _ in stream],
                          branch_variance=branches, identity_factor_names=[], identity_factors=[],
                          grad_norm=[math.sqrt(v / grad_sq[0]) for v in reversed(grad_sq)],
                          dual_mean_square=[mean_square(Kd) for _, _, Kd in stream])
