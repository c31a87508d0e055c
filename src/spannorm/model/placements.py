"""One block class per placement of SPEC §2 and §9. Every block maps the residual stream x_l -> x_{l+1}, except
ResiDual's, which maps the pair of streams (x_l, d_l) -> (x_{l+1}, d_{l+1}) (:class:`ResiDualBlock`).

Blocks differ only where their equations differ: read two ``forward`` methods side by side. Norms are named
by position (``attn_in_norm``, ``attn_out_norm``, ``ffn_in_norm``, ``ffn_out_norm``, ``block_out_norm``).
``hook_mid`` sees the stream after the attention sub-layer, ``hook_out`` the block's output.

The placement registry
----------------------
A block class is the one place that says what a placement is. Besides its equation (the docstring and
``forward``) it declares, as class attributes and classmethods of :class:`Block`:

- ``placement`` (its name, the key of :data:`BLOCKS`) and ``norm_positions``;
- ``init_rule(cfg)``: its init on top of the model-wide init (the model and the theory both call it);
- ``residual_scales(cfg)``: its skip multiplier α and run-time branch multiplier β;
- ``identity_path_norms``: the norms on its clean skip path (the identity-path product ∏ α/σ);
- ``knob``: its residual-scaling knob, Δt or α (:class:`Knob`), or None;
- ``normalizes_output``: whether x_{l+1} is a norm's output (then the model needs no final norm,
  :func:`has_final_norm`);
- ``why_not_llama``: why a Llama layer cannot compute it, or None when it can (after folding constants);
- ``span_variant``: whether it is a reading of SpanNorm (the study compares those against the baselines);
- ``dual_stream``: whether it maps a pair of streams (x, d) instead of x (ResiDual; the model, the theory and
  the diagnostics read it, and the config keeps such a placement on every layer or on none).

Everything else reads these: the theory (:mod:`spannorm.theory.meanfield`, :mod:`spannorm.theory.criterion`),
counting, the Hugging Face export and the study's results. :data:`PATTERNS` names the placements that are
patterns of block placements (``mixln``). ``tests/test_placement_registry.py`` asserts that every
per-placement table in the code has exactly the registry's keys.

**Adding a placement** means: one block class here, added to :data:`BLOCKS`, with every attribute above
declared (``knob`` and ``why_not_llama`` have no default, so a new class must decide them); its name in
``spannorm.config.PLACEMENTS`` (the config layer sits below the model and cannot import it; a test keeps
the two equal); its tests, a hand-written reference of its equation in ``tests/test_model_placements.py``
and its declared facts written out in ``tests/test_placement_registry.py``; its mean-field step in
``spannorm.theory.meanfield.STEPS`` (the theory is a layer above the model, so the Gram algebra lives
there); and its row in the README's placement table. The tests fail until each of these is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from spannorm.config import ModelConfig
from spannorm.model.layers import CausalSelfAttention, ResidualHook, SwiGLU, make_norm
from spannorm.model.moe import MoEFFN


@dataclass(frozen=True)
class BlockInit:
    """How a block's weights are initialized on top of the model-wide init (SPEC §3)."""

    out_proj_scale: float = 1.0
    """Multiplies the std of the output projections (attention out, FFN down, each expert's down)."""
    xavier_gain: float | None = None
    """DeepNet init: Xavier-normal with this gain on V, attention out and every FFN matrix; Xavier-normal
    with gain 1 on Q and K."""
    block_out_gain: float = 1.0
    """The initial gain of the block-output norm Nₒ, where the block has one (span's learnable form)."""


def deepnorm_constants(n_layers: int) -> tuple[float, float]:
    """DeepNet's decoder-only constants: skip α = (2L)^(1/4), init gain β = (8L)^(-1/4)."""
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


def span_scales(cfg: ModelConfig) -> tuple[float, float]:
    """span's run-time multiplier β and the initial gain of its norm Nₒ for ``cfg.span_scaling`` (SPEC §9):
    ``fixed``: β = 1/sqrt(L), gain 1; ``learnable``: β = 1, gain 1/sqrt(L). Either way each block adds a term
    of RMS 1/sqrt(L) at init, so Var(x_L) ≤ Var(x_0) + 1 for uncorrelated block outputs."""
    scale = 1 / math.sqrt(cfg.n_layers)
    return (scale, 1.0) if cfg.span_scaling == "fixed" else (1.0, scale)


def span_post_constants(cfg: ModelConfig) -> tuple[float, BlockInit]:
    """span_post's (and span_b2t's) clean-skip multiplier α and init for ``cfg.span_post_scaling`` (SPEC §3,
    our derivation): ``init``: α = 1, output projections scaled by 1/sqrt(2L); ``skip``: α = sqrt(2L),
    standard init; ``both``: DeepNorm's split, α = (2L)^(1/4) and Xavier gain (8L)^(-1/4)."""
    L = cfg.n_layers
    if cfg.span_post_scaling == "init":
        alpha, init = 1.0, BlockInit(out_proj_scale=1 / math.sqrt(2 * L))
    elif cfg.span_post_scaling == "skip":
        alpha, init = math.sqrt(2 * L), BlockInit()
    else:
        alpha, gain = deepnorm_constants(L)
        init = BlockInit(xavier_gain=gain)
    return (cfg.span_post_alpha if cfg.span_post_alpha is not None else alpha), init


@dataclass(frozen=True)
class Knob:
    """A placement's residual-scaling knob: what the stability criterion tunes."""

    name: str
    """``delta_t`` (a larger Δt is less damped) or ``alpha`` (a smaller α is less damped)."""
    config_field: str | None
    """Where a user sets it (``model.delta_t``, ``model.span_post_alpha``); None when fixed by the depth."""


DELTA_T = Knob("delta_t", "model.delta_t")
SPAN_POST_ALPHA = Knob("alpha", "model.span_post_alpha")
DEEPNORM_ALPHA = Knob("alpha", None)


def make_ffn(cfg: ModelConfig) -> nn.Module:
    return MoEFFN(cfg) if cfg.moe is not None else SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.bias)


class Block(nn.Module):
    """Shared parts: attention, FFN, the position-named norms of ``norm_positions`` and two hook points.

    The class attributes below are the placement registry (see the module docstring)."""

    placement: ClassVar[str]
    norm_positions: ClassVar[tuple[str, ...]]
    normalizes_output: ClassVar[bool] = False
    """True when x_{l+1} is the output of a norm, so the model needs no final norm after it."""
    qkv_norm: ClassVar[bool] = False
    identity_path_norms: ClassVar[tuple[tuple[str, str], ...]] = ()
    """The norms on the clean skip path, with where their skip input comes from: ``in`` is the block input
    x_l, ``mid`` the stream at ``hook_mid``. Such a norm's identity-path factor is α·RMS(skip)/RMS(pre-norm
    sum). Empty: no norm on the skip path (the identity-path product is 1)."""
    knob: ClassVar[Knob | None]
    """The residual-scaling knob the stability criterion tunes (None: this library has none for it)."""
    why_not_llama: ClassVar[str | None]
    """Why a Llama decoder layer cannot compute this block; None when it can (after folding constants into
    the weights, which :mod:`spannorm.interop.hf_export` does)."""
    span_variant: ClassVar[bool] = False
    """A reading of SpanNorm (the study tests these against the best baseline)."""
    dual_stream: ClassVar[bool] = False
    """The block maps a pair of streams (x_l, d_l) -> (x_{l+1}, d_{l+1}) instead of x_l -> x_{l+1}
    (ResiDual); the model then starts d at the embedding and merges the pair before the head
    (:class:`~spannorm.model.transformer.DecoderLM`), and every layer must be such a block."""

    # The norms of ``norm_positions``, made in ``__init__``: a block has those its positions name.
    attn_in_norm: nn.Module
    attn_out_norm: nn.Module
    ffn_in_norm: nn.Module
    ffn_out_norm: nn.Module
    block_out_norm: nn.Module

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index, self.n_layers = layer_index, cfg.n_layers
        self.delta_t = cfg.delta_t
        self.attn = CausalSelfAttention(cfg, qkv_norm=self.qkv_norm)
        self.ffn = make_ffn(cfg)
        for position in self.norm_positions:
            setattr(self, f"{position}_norm", make_norm(cfg))
        self.hook_mid = ResidualHook()
        self.hook_out = ResidualHook()

    @classmethod
    def init_rule(cls, cfg: ModelConfig) -> BlockInit:
        """The init of this placement's blocks on top of the model-wide init (SPEC §3)."""
        return BlockInit()

    @classmethod
    def residual_scales(cls, cfg: ModelConfig) -> tuple[float, float]:
        """The skip multiplier α and the run-time branch multiplier β of the block's equation (1 and 1 where
        the equation has none; Δt is separate)."""
        return 1.0, 1.0

    def extra_repr(self) -> str:
        return f"placement={self.placement}, layer={self.layer_index}"


class PreBlock(Block):
    """h = x + Δt·A(N₁(x)); x' = h + Δt·F(N₂(h))."""

    placement = "pre"
    norm_positions = ("attn_in", "ffn_in")
    knob = DELTA_T
    why_not_llama = None

    @classmethod
    def init_rule(cls, cfg: ModelConfig) -> BlockInit:
        return BlockInit(out_proj_scale=1 / math.sqrt(2 * cfg.n_layers) if cfg.scale_out_proj else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(x + self.delta_t * self.attn(self.attn_in_norm(x)))
        return self.hook_out(h + self.delta_t * self.ffn(self.ffn_in_norm(h)))


class PostBlock(Block):
    """h = N₁(x + Δt·A(x)); x' = N₂(h + Δt·F(h))."""

    placement = "post"
    norm_positions = ("attn_out", "ffn_out")
    normalizes_output = True
    identity_path_norms = (("attn_out", "in"), ("ffn_out", "mid"))
    knob = DELTA_T
    why_not_llama = ("post normalizes after each residual add, x' = N(x + F(x)); a Llama layer only normalizes "
                     "the inputs of its branches")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(self.attn_out_norm(x + self.delta_t * self.attn(x)))
        return self.hook_out(self.ffn_out_norm(h + self.delta_t * self.ffn(h)))


class PeriBlock(Block):
    """Peri-LN: h = x + Δt·N₁ᵒ(A(N₁(x))); x' = h + Δt·N₂ᵒ(F(N₂(h)))."""

    placement = "peri"
    norm_positions = ("attn_in", "attn_out", "ffn_in", "ffn_out")
    knob = DELTA_T
    why_not_llama = "peri also normalizes each branch output, N(A(N(x))); a Llama layer has no output norms"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(x + self.delta_t * self.attn_out_norm(self.attn(self.attn_in_norm(x))))
        return self.hook_out(h + self.delta_t * self.ffn_out_norm(self.ffn(self.ffn_in_norm(h))))


class SpanBlock(Block):
    """SpanNorm (its clean reading, SPEC §9; the default since the issue-16 study): a = A(N₁(x)); h = x + a;
    f = F(N₂(h)); x' = x + Δt·β·Nₒ(a + f).

    The stream is never normalized: from the embedding to the final norm it is only added to. The block's
    aggregated output (both branches) is normalized before it joins the stream, so each block moves a token
    by at most Δt·β·(√d·‖γ‖∞ + ‖b‖) whatever its weights (the Peri-LN argument with one norm per block).
    β (``model.span_scaling``): ``fixed`` multiplies by β = 1/sqrt(L) at run time; ``learnable`` puts
    1/sqrt(L) into Nₒ's initial gain instead (β = 1), so training can move it. The output projections keep the
    standard init: Nₒ divides out their scale, and β does the variance-aware scaling.

    The knob is Δt, on β: the block has one additive update to a clean stream, like pre and peri, and a
    larger step is less damped. A knob on a skip multiplier α would compound as α^L along the stream instead
    of scaling each block's share, so there is no α; span_post_alpha, span_post_beta and span_post_scaling
    do not apply. Named ``span_clean`` before placement names 2 (:data:`spannorm.config.PLACEMENT_NAMES`)."""

    placement = "span"
    norm_positions = ("attn_in", "ffn_in", "block_out")
    knob = DELTA_T
    why_not_llama = ("span normalizes the sum of both branch outputs, x + β·N(a + f); a Llama layer adds "
                     "each branch to the stream unnormalized and has no block-output norm")
    span_variant = True

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.beta = self.residual_scales(cfg)[1]

    @classmethod
    def init_rule(cls, cfg: ModelConfig) -> BlockInit:
        return BlockInit(block_out_gain=span_scales(cfg)[1])

    @classmethod
    def residual_scales(cls, cfg: ModelConfig) -> tuple[float, float]:
        return 1.0, span_scales(cfg)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.attn_in_norm(x))
        h = self.hook_mid(x + a)
        f = self.ffn(self.ffn_in_norm(h))
        return self.hook_out(x + self.delta_t * self.beta * self.block_out_norm(a + f))


class SpanPostBlock(Block):
    """SpanNorm, post-normalizing reading (``span`` before placement names 2): a = A(N₁(x)); h = x + a;
    f = F(N₂(h)); x' = Nₒ(α·x + β·(a + f)). The stream is normalized after every block."""

    placement = "span_post"
    norm_positions: ClassVar[tuple[str, ...]] = ("attn_in", "ffn_in", "block_out")
    normalizes_output = True
    identity_path_norms = (("block_out", "in"),)
    knob = SPAN_POST_ALPHA
    why_not_llama = ("span_post normalizes the block output, N(α·x + β·(a + f)); a Llama layer has no "
                     "block-output norm")
    span_variant = True

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.alpha, self.beta = self.residual_scales(cfg)

    @classmethod
    def init_rule(cls, cfg: ModelConfig) -> BlockInit:
        return span_post_constants(cfg)[1]

    @classmethod
    def residual_scales(cls, cfg: ModelConfig) -> tuple[float, float]:
        return span_post_constants(cfg)[0], cfg.span_post_beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.attn_in_norm(x))
        h = self.hook_mid(x + a)
        f = self.ffn(self.ffn_in_norm(h))
        return self.hook_out(self.block_out_norm(self.alpha * x + self.beta * (a + f)))


class SpanB2TBlock(SpanPostBlock):
    """SpanNorm, B2T reading (on a Post-LN block): h = N₁(x + A(x)); f = F(h); x' = Nₒ(α·x + β·(h + f))."""

    placement = "span_b2t"
    norm_positions = ("attn_out", "block_out")
    why_not_llama = ("span_b2t normalizes after the attention add and at the block output; a Llama layer "
                     "normalizes only branch inputs")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(self.attn_out_norm(x + self.attn(x)))
        f = self.ffn(h)
        return self.hook_out(self.block_out_norm(self.alpha * x + self.beta * (h + f)))


class DeepNormBlock(Block):
    """DeepNet: h = N₁(α·x + A(x)); x' = N₂(α·h + F(h)), α = (2L)^(1/4), Xavier gain (8L)^(-1/4)."""

    placement = "deepnorm"
    norm_positions = ("attn_out", "ffn_out")
    normalizes_output = True
    identity_path_norms = (("attn_out", "in"), ("ffn_out", "mid"))
    knob = DEEPNORM_ALPHA
    why_not_llama = "deepnorm multiplies the skip by α and normalizes after each add; a Llama layer does neither"

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.alpha, self.beta = deepnorm_constants(cfg.n_layers)

    @classmethod
    def init_rule(cls, cfg: ModelConfig) -> BlockInit:
        return BlockInit(xavier_gain=deepnorm_constants(cfg.n_layers)[1])

    @classmethod
    def residual_scales(cls, cfg: ModelConfig) -> tuple[float, float]:
        return deepnorm_constants(cfg.n_layers)[0], 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(self.attn_out_norm(self.alpha * x + self.attn(x)))
        return self.hook_out(self.ffn_out_norm(self.alpha * h + self.ffn(h)))


class LNSBlock(PreBlock):
    """LayerNorm Scaling: ``pre`` with each norm output multiplied by 1/sqrt(l+1) (l counts from 0)."""

    placement = "lns"

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.norm_scale = 1 / math.sqrt(layer_index + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.norm_scale
        h = self.hook_mid(x + self.delta_t * self.attn(s * self.attn_in_norm(x)))
        return self.hook_out(h + self.delta_t * self.ffn(s * self.ffn_in_norm(h)))


class HybridBlock(Block):
    """HybridNorm: h = x + A_qkv(x), with Q, K and V normalized per head; x' = N(h) + F(N(h))."""

    placement = "hybrid"
    norm_positions = ("attn_out",)
    qkv_norm = True
    identity_path_norms = (("attn_out", "in"),)
    knob = None
    why_not_llama = ("hybrid normalizes Q, K and V per head and normalizes after the attention add; a Llama "
                     "layer does neither")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_mid(x + self.attn(x))
        n = self.attn_out_norm(h)
        return self.hook_out(n + self.ffn(n))


class ResiDualBlock(Block):
    """ResiDual (Xie et al. 2023, arXiv 2304.14802): a Post-LN stream x and a dual stream d that receives the
    same branch outputs and is never normalized. Per sub-layer k with branch f_k:
    x_{k+1} = N(x_k + Δt·f_k(x_k)) and d_{k+1} = d_k + Δt·f_k(x_k); for the block, a = A(x); h = N₁(x + Δt·a);
    f = F(h); x' = N₂(h + Δt·f); d' = d + Δt·(a + f). The model starts both streams at the embedding output
    (d_0 = x_0) and feeds x_L + N_d(d_L) to the head (``DecoderLM.dual_final_norm``), with no final norm after it.

    What we checked (Δt = 1 is the paper's model; Δt scales every branch as in ``post``). Only the paper's
    abstract was available here (it calls the design Pre-Post-LN: a gradient lower bound from the Pre-LN-style
    connection, diverse representations from the Post-LN one). Its official code, microsoft/ResiDual at 8682f75:
    ``resi_dual/resi_dual_layers.py`` adds each sub-layer's output to ``res`` and passes x + output through the
    sub-layer's LayerNorm (encoder layer lines 37-39 and 50-51, decoder layer lines 135-136 and 176-177);
    ``resi_dual/resi_dual.py`` starts ``res`` at the embedding output (lines 107 and 252,
    ``res = x * res_input_norm_scale``, with the alternative ``torch.zeros_like(x)`` left in a comment) and,
    once after the loop (lines 131 and 283), returns ``x * alpha + layer_norm(res)``. ``ResiDualConfig`` (lines
    295-300) defaults ``res_input_norm_scale`` and ``alpha`` to 1; ``hydra_config/opus.yaml`` sets the scale to
    0.05, iwslt to 1. The scale multiplies d_0 and every addition alike, so the final norm cancels it (up to ε;
    it only keeps d's values small): d carries no scaling of its own. The final norm sits outside the loop
    (x-transformers once applied it inside, lucidrains/x-transformers#145). We omit the output multiplier
    ``alpha`` (1 in every official config).

    Hook points: ``hook_mid`` sees h (the x stream after the attention sub-layer), ``hook_out`` x_{l+1} (the
    Post-LN stream, unit RMS); ``hook_dual`` sees d_{l+1} (point ``block{l}.dual``), which the stream
    statistics leave out (they describe x; d grows like unscaled ``pre``'s stream). The clean skip path is d's,
    which meets no norm until the head, so ``identity_path_norms`` is empty."""

    placement = "residual"
    norm_positions = ("attn_out", "ffn_out")
    normalizes_output = True
    knob = DELTA_T
    why_not_llama = ("residual keeps a second, never-normalized stream beside a Post-LN one; a Llama layer has one "
                     "stream and only normalizes the inputs of its branches")
    dual_stream = True

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.hook_dual = ResidualHook()

    def forward(self, stream: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, d = stream
        a = self.delta_t * self.attn(x)
        h = self.hook_mid(self.attn_out_norm(x + a))
        f = self.delta_t * self.ffn(h)
        return self.hook_out(self.ffn_out_norm(h + f)), self.hook_dual(d + a + f)


BLOCKS: dict[str, type[Block]] = {
    cls.placement: cls
    for cls in (PreBlock, PostBlock, PeriBlock, SpanBlock, SpanPostBlock, SpanB2TBlock, DeepNormBlock, LNSBlock,
                HybridBlock, ResiDualBlock)
}
"""The placement registry: block class by placement name. ``mixln`` is not here: it is a pattern."""

PATTERNS: dict[str, tuple[str, ...]] = {"mixln": ("post", "pre")}
"""Placements that are patterns of block placements, with the block placements they use
(:meth:`~spannorm.config.ModelConfig.layer_placements` lays them out)."""


def placement_names() -> tuple[str, ...]:
    """Every placement a config may name: the block placements, then the patterns."""
    return (*BLOCKS, *PATTERNS)


def block_classes(placement: str) -> tuple[type[Block], ...]:
    """The block classes a placement (a block placement or a pattern) is made of."""
    return tuple(BLOCKS[p] for p in PATTERNS.get(placement, (placement,)))


def placement_knob(placement: str) -> Knob | None:
    """The residual-scaling knob of a placement; a pattern's is its blocks' common knob (None if they differ)."""
    knobs = {cls.knob for cls in block_classes(placement)}
    return knobs.pop() if len(knobs) == 1 else None


def has_final_norm(cfg: ModelConfig) -> bool:
    """Whether the model ends with a final norm: ``cfg.final_norm`` when set, else only when the last block
    does not already normalize its output (SPEC §2)."""
    if cfg.final_norm is not None:
        return cfg.final_norm
    return not BLOCKS[cfg.layer_placements()[-1]].normalizes_output


def has_dual_stream(cfg: ModelConfig) -> bool:
    """Whether the model's blocks carry ResiDual's pair of streams (then every layer does: the config checks)."""
    return any(BLOCKS[p].dual_stream for p in cfg.layer_placements())


def make_block(cfg: ModelConfig, layer_index: int) -> Block:
    return BLOCKS[cfg.layer_placements()[layer_index]](cfg, layer_index)
