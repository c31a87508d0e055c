"""Typed model configuration, validated in one place.

Every architectural choice of SPEC.md is a field here: the placement of normalization (with per-layer
overrides), the residual step Δt, SpanNorm's scaling rule, the init, and the optional MoE FFN. Enumerated
fields are ``Literal``-typed and checked, with every float's finiteness, by the shared machinery of
:mod:`spannorm.configuration`; ``validate`` checks ranges and relations between fields. Invalid values raise
:class:`ConfigError` with a one-line message that names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from spannorm.configuration import ConfigError, build, check_fields, fail

PLACEMENTS = ("pre", "post", "peri", "span", "span_b2t", "span_clean", "deepnorm", "mixln", "lns", "hybrid",
              "residual")
"""Every placement of SPEC §2 and §9. ``mixln`` is a pattern of ``post`` and ``pre`` blocks, not a block of its own."""
DUAL_STREAM_PLACEMENTS = ("residual",)
"""Placements whose blocks carry two streams (ResiDual's x and d) from the embedding to the head: every layer of
such a model must use them (a test keeps this equal to the block classes' ``dual_stream``)."""

BLOCK_PLACEMENTS = tuple(p for p in PLACEMENTS if p != "mixln")
Placement = Literal[PLACEMENTS]  # type: ignore[valid-type]  # the names are PLACEMENTS, written once
BlockPlacement = Literal[BLOCK_PLACEMENTS]  # type: ignore[valid-type]
SpanScaling = Literal["init", "skip", "both"]
SpanCleanScaling = Literal["fixed", "learnable"]
Norm = Literal["rms", "layer"]
Init = Literal["fan_in", "fixed"]
HeadInit = Literal["half", "small", "fan_in"]
SPAN_SCALINGS = typing.get_args(SpanScaling)
NORMS = typing.get_args(Norm)
INITS = typing.get_args(Init)
HEAD_INITS = typing.get_args(HeadInit)
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
"""RoPE scaling types (Hugging Face ``rope_type``) -> the keys each one requires (see
``spannorm.model.layers.rope_frequencies``). yarn also reads ``beta_fast``, ``beta_slow``, ``attention_factor``,
``mscale``, ``mscale_all_dim`` and ``truncate`` when present."""
OPTIONAL_FIELDS = ("rope_scaling", "sliding_window", "span_clean_scaling")
"""Fields :meth:`ModelConfig.to_dict` writes only when they differ from their default, so that configs and
checkpoints written before they existed read and compare the same."""
LEGACY_TIE_EMBEDDINGS = True
"""``tie_embeddings`` of a saved model config written before ``head_init`` existed (it lacks that key) that omits
it: the default of its time. Its head, when untied, had the fan-in init. See :meth:`ModelConfig.from_saved`."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts FFN (SPEC §4). Dropless top-k routing with a softmax router in fp32."""

    n_experts: int = 8
    top_k: int = 2
    d_expert: int | None = None
    """Hidden width of each SwiGLU expert. None: the dense FFN width divided by top_k (compute-matched)."""
    shared_expert: bool = False
    """Add an always-on SwiGLU expert of width d_expert beside the routed ones."""
    balance_coef: float = 0.01
    """Coefficient of the Switch load-balancing loss E·Σ f_e·p_e (used by the trainer)."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss mean(logsumexp(router logits)²) (used by the trainer)."""

    def validate(self, prefix: str = "model.moe") -> None:
        check_fields(self, prefix)
        if self.n_experts < 1:
            fail(f"{prefix}.n_experts", self.n_experts, "must be >= 1")
        if not 1 <= self.top_k <= self.n_experts:
            fail(f"{prefix}.top_k", self.top_k, f"must be between 1 and n_experts={self.n_experts}")
        if self.d_expert is not None and self.d_expert < 1:
            fail(f"{prefix}.d_expert", self.d_expert, "must be >= 1 or null")
        for name in ("balance_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                fail(f"{prefix}.{name}", getattr(self, name), "must be >= 0")


@dataclass
class ModelConfig:
    """A decoder-only LM. Defaults are a tiny CPU model with PreNorm."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention. None: as many as n_heads."""
    d_ff: int | None = None
    """SwiGLU hidden width. None: 8/3·d_model rounded up to a multiple of 16."""
    context_length: int = 256
    placement: Placement = "pre"
    placement_overrides: dict[int, BlockPlacement] = field(default_factory=dict)
    """Per-layer placements by block index, on top of ``placement`` (e.g. {0: "post"})."""
    norm: Norm = "rms"
    """``rms`` (RMSNorm) or ``layer`` (LayerNorm with bias)."""
    norm_eps: float = 1e-6
    delta_t: float = 1.0
    """Residual step Δt on the additive branches of pre, post, peri and lns (Kan et al.), and on span_clean's
    one block update x + Δt·β·Nₒ(a + f)."""
    span_scaling: SpanScaling = "init"
    """SpanNorm's variance-aware scaling (SPEC §3): init, skip or both."""
    span_alpha: float | None = None
    """Override the clean-skip multiplier α of span/span_b2t. None: from span_scaling."""
    span_beta: float = 1.0
    """Run-time branch multiplier β_run of span/span_b2t. span_alpha, span_beta and span_scaling do not apply
    to span_clean (its skip is the clean stream, its β comes from span_clean_scaling)."""
    span_clean_scaling: SpanCleanScaling = "fixed"
    """span_clean's variance-aware scaling (SPEC §9): ``fixed``, a run-time multiplier β = 1/sqrt(L) with the
    block-output norm's gain at 1; ``learnable``, β = 1 and that gain initialized at 1/sqrt(L)."""
    mixln_ratio: float = 0.25
    """Mix-LN: the first floor(ratio·L) blocks are post, the rest pre."""
    init: Init = "fan_in"
    """``fan_in``: std init_std/sqrt(fan_in) (SPEC §3). ``fixed``: std init_std (0.02 in GPT-2/Llama)."""
    init_std: float = 1.0
    """σ₀ for fan_in init; the std itself for fixed init."""
    scale_out_proj: bool = True
    """Scale the output projections of pre-style blocks (pre, lns, mixln's pre blocks) by 1/sqrt(2L)."""
    embed_scale: float | None = None
    """Multiplier on the embedding output. None: sqrt(d_model) under fan_in init (a unit-variance stream from
    embedding rows of norm ~1), 1.0 under fixed init."""
    tie_embeddings: bool = False
    """Use the embedding matrix as the output head. A tied head starts as a copy of the input: under fan_in init
    the model predicts its own input token with a logit of about sqrt(d_model), so the initial loss is far above
    ln(vocab_size) (10.2 against 5.55 at d=128, V=256). The default is an untied head (see ``head_init``)."""
    head_init: HeadInit = "half"
    """Init of the untied head (ignored when tied: the head is the embedding), as a multiple of the std the other
    input projections get (init_std/sqrt(d_model) under fan_in init, init_std under fixed). ``half``: half of it,
    so under fan_in the logits start with std about init_std/2 and the loss about init_std²/8 nats above
    ln(vocab_size) at any width. ``small``: that std over a further sqrt(d_model), muP's readout (logits of std
    ~init_std/sqrt(d_model), loss within ~1/(2·d_model) of ln V), which learned slower in a short run
    (docs/training.md). ``fan_in``: the same std (logits of std ~init_std, about 0.5 nats above ln V). Never
    zero, so that every gradient at init is nonzero."""
    final_norm: bool | None = None
    """None: the placement's default (SPEC §2): off when the last block already normalizes its output."""
    embed_norm: bool = False
    """Normalize the embedding output (Peri-LN's optional embedding norm)."""
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """Scaled RoPE of an imported checkpoint, as Hugging Face writes it: ``rope_type`` (linear, llama3 or
    yarn) and its parameters. None: plain RoPE."""
    sliding_window: int | None = None
    """The sliding attention window of an imported checkpoint (Mistral). spannorm attends to the whole causal
    prefix, which equals sliding-window attention only up to this many tokens, so context_length may not
    exceed it. None: no window."""
    bias: bool = False
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = build(MoEConfig, self.moe, "model.moe")
        self.placement_overrides = {int(k): v for k, v in (self.placement_overrides or {}).items()}
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, prefix: str = "model") -> None:
        check_fields(self, prefix)
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "context_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{prefix}.{name}", value, "must be a positive integer")
        for layer in self.placement_overrides:
            if not 0 <= layer < self.n_layers:
                fail(f"{prefix}.placement_overrides", layer,
                      f"layer index must be in [0, {self.n_layers - 1}]")
        if self.d_model % self.n_heads:
            fail(f"{prefix}.d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            fail(f"{prefix}.d_model", self.d_model, "d_model/n_heads must be even for RoPE")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            fail(f"{prefix}.n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.d_ff is not None and self.d_ff < 1:
            fail(f"{prefix}.d_ff", self.d_ff, "must be >= 1 or null")
        for name in ("norm_eps", "delta_t", "init_std", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                fail(f"{prefix}.{name}", value, "must be a positive finite number")
        if self.span_alpha is not None and not self.span_alpha > 0:
            fail(f"{prefix}.span_alpha", self.span_alpha, "must be > 0 or null")
        if not self.span_beta > 0:
            fail(f"{prefix}.span_beta", self.span_beta, "must be > 0")
        if not 0.0 <= self.mixln_ratio <= 1.0:
            fail(f"{prefix}.mixln_ratio", self.mixln_ratio, "must be in [0, 1]")
        dual = [p for p in self.layer_placements() if p in DUAL_STREAM_PLACEMENTS]
        if dual and len(dual) != self.n_layers:
            fail(f"{prefix}.placement_overrides", self.placement_overrides,
                 f"{dual[0]} carries two streams through every block, so it cannot be mixed with other "
                 f"placements; allowed: {dual[0]} on every layer or on none")
        if self.embed_scale is not None and not self.embed_scale > 0:
            fail(f"{prefix}.embed_scale", self.embed_scale, "must be > 0 or null")
        if self.moe is not None:
            self.moe.validate(f"{prefix}.moe")
        if self.rope_scaling is not None:
            self._validate_rope_scaling(prefix)
        if self.sliding_window is not None:
            if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) \
                    or self.sliding_window < 1:
                fail(f"{prefix}.sliding_window", self.sliding_window, "must be a positive integer or null")
            if self.context_length > self.sliding_window:
                fail(f"{prefix}.context_length", self.context_length,
                      f"the model was trained with sliding-window attention (window {self.sliding_window}), "
                      f"which spannorm does not implement; full attention equals it only up to the window, "
                      f"so allowed: <= {self.sliding_window}")

    def _validate_rope_scaling(self, prefix: str) -> None:
        scaling = self.rope_scaling
        where = f"{prefix}.rope_scaling"
        if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_SCALINGS:
            kind = scaling.get("rope_type") if isinstance(scaling, dict) else scaling
            fail(f"{where}.rope_type", kind, f"allowed: {', '.join(ROPE_SCALINGS)}")
        for key in ROPE_SCALINGS[scaling["rope_type"]]:
            value = scaling.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                fail(f"{where}.{key}", value, f"rope_type {scaling['rope_type']} needs a positive number")

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 16 * math.ceil(8 * self.d_model / 3 / 16)

    @property
    def expert_hidden(self) -> int:
        assert self.moe is not None
        if self.moe.d_expert is not None:
            return self.moe.d_expert
        return max(1, self.ffn_hidden // self.moe.top_k)

    @property
    def embedding_multiplier(self) -> float:
        if self.embed_scale is not None:
            return self.embed_scale
        return math.sqrt(self.d_model) if self.init == "fan_in" else 1.0

    def layer_placements(self) -> list[str]:
        """The block placement of every layer, with ``mixln`` expanded and overrides applied."""
        if self.placement == "mixln":
            n_post = math.floor(self.mixln_ratio * self.n_layers)
            layers = ["post"] * n_post + ["pre"] * (self.n_layers - n_post)
        else:
            layers = [self.placement] * self.n_layers
        for layer, placement in self.placement_overrides.items():
            layers[layer] = placement
        return layers

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in OPTIONAL_FIELDS:
            if data[name] == defaults[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a mapping (a ``model_config.json``, a config section): unknown keys refused, values
        coerced to their fields' types."""
        return build(cls, data, "model")

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a model config a checkpoint or run saved (``model_config.json``, ``run_config.json``'s
        model section): as :meth:`from_dict`, except that a config written before ``head_init`` existed reads
        the fields it omits with the defaults of its time (tied, :data:`LEGACY_TIE_EMBEDDINGS`; an untied head
        had the fan-in init), so that it loads with the head it was trained with."""
        if isinstance(data, dict) and "head_init" not in data:
            data = {"tie_embeddings": LEGACY_TIE_EMBEDDINGS, **data}
            if not data["tie_embeddings"]:  # a tied head has no init of its own: head_init stays the default
                data["head_init"] = "fan_in"
        return cls.from_dict(data)


__all__ = ["BLOCK_PLACEMENTS", "DUAL_STREAM_PLACEMENTS", "PLACEMENTS", "ConfigError", "ModelConfig", "MoEConfig"]
