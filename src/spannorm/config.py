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

import yaml

from spannorm.configuration import ConfigError, build, check_fields, fail, typed_overrides

PLACEMENTS = ("pre", "post", "peri", "span", "span_post", "span_b2t", "deepnorm", "mixln", "lns", "hybrid",
              "residual")
"""Every placement of SPEC §2 and §9. ``mixln`` is a pattern of ``post`` and ``pre`` blocks, not a block of its own.
``span`` is SpanNorm's clean reading (SPEC §9's ``span_clean``); ``span_post`` and ``span_b2t`` are the readings
that normalize the stream after every block (see :data:`PLACEMENT_NAMES`)."""
PLACEMENT_NAMES = 2
"""The version of the placement names. Version 1 (before the issue-16 study chose SpanNorm's default) called the
clean reading ``span_clean`` (with ``span_clean_scaling``) and the post-normalizing one ``span`` (with
``span_scaling``, ``span_alpha``, ``span_beta``). Every model config spannorm saves records the version it was
written with (``placement_names``); a saved config without it is read with version 1's names, so that an old
checkpoint loads as the model it was trained as. A config a user writes may say ``placement_names: 1`` to be read
the same way."""
RENAMED_PLACEMENTS_V1 = {"span": "span_post", "span_clean": "span"}
"""Version 1 placement name -> version 2 name (the others are unchanged)."""
RENAMED_FIELDS_V1 = {"span_scaling": "span_post_scaling", "span_alpha": "span_post_alpha",
                     "span_beta": "span_post_beta", "span_clean_scaling": "span_scaling"}
"""Version 1 model field -> version 2 field (the others are unchanged)."""
DUAL_STREAM_PLACEMENTS = ("residual",)
"""Placements whose blocks carry two streams (ResiDual's x and d) from the embedding to the head: every layer of
such a model must use them (a test keeps this equal to the block classes' ``dual_stream``)."""

BLOCK_PLACEMENTS = tuple(p for p in PLACEMENTS if p != "mixln")
Placement = Literal[PLACEMENTS]  # type: ignore[valid-type]  # the names are PLACEMENTS, written once
BlockPlacement = Literal[BLOCK_PLACEMENTS]  # type: ignore[valid-type]
SpanScaling = Literal["fixed", "learnable"]
SpanPostScaling = Literal["init", "skip", "both"]
Norm = Literal["rms", "layer"]
Init = Literal["fan_in", "fixed"]
HeadInit = Literal["half", "small", "fan_in"]
SPAN_SCALINGS = typing.get_args(SpanScaling)
SPAN_POST_SCALINGS = typing.get_args(SpanPostScaling)
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
OPTIONAL_FIELDS = ("rope_scaling", "sliding_window", "span_scaling")
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
    """Residual step Δt on the additive branches of pre, post, peri and lns (Kan et al.), and on span's one
    block update x + Δt·β·Nₒ(a + f)."""
    span_scaling: SpanScaling = "fixed"
    """span's variance-aware scaling (SPEC §9): ``fixed``, a run-time multiplier β = 1/sqrt(L) with the
    block-output norm's gain at 1 (the default, chosen by the issue-16 study: docs/results.md); ``learnable``,
    β = 1 and that gain initialized at 1/sqrt(L)."""
    span_post_scaling: SpanPostScaling = "init"
    """The variance-aware scaling of span_post and span_b2t (SPEC §3): init, skip or both."""
    span_post_alpha: float | None = None
    """Override the clean-skip multiplier α of span_post/span_b2t. None: from span_post_scaling."""
    span_post_beta: float = 1.0
    """Run-time branch multiplier β_run of span_post/span_b2t. span_post_alpha, span_post_beta and
    span_post_scaling do not apply to span (its skip is the clean stream, its β comes from span_scaling)."""
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
    placement_names: int = PLACEMENT_NAMES
    """The version of the placement names this config is written in (see :data:`PLACEMENT_NAMES`). A mapping
    that says 1 is read with version 1's names and becomes a version-2 config; a built config always holds
    the current version, and saves it, so that it is never read with the old names again."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = build(MoEConfig, self.moe, "model.moe")
        self.placement_overrides = {int(k): v for k, v in (self.placement_overrides or {}).items()}
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, prefix: str = "model") -> None:
        self._check_renamed(prefix)
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
        if self.span_post_alpha is not None and not self.span_post_alpha > 0:
            fail(f"{prefix}.span_post_alpha", self.span_post_alpha, "must be > 0 or null")
        if not self.span_post_beta > 0:
            fail(f"{prefix}.span_post_beta", self.span_post_beta, "must be > 0")
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

    def _check_renamed(self, prefix: str) -> None:
        if self.placement_names != PLACEMENT_NAMES:
            fail(f"{prefix}.placement_names", self.placement_names,
                 f"allowed: {PLACEMENT_NAMES}, or 1 in a mapping (a config file, a saved config), which is "
                 f"read with version 1's names")
        refused_v1_spelling(vars(self), prefix)

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
    def prepare_mapping(cls, data: Any, path: str = "model") -> Any:
        """The mapping :func:`~spannorm.configuration.build` reads: one that says ``placement_names: 1`` with its
        names and fields renamed to the current version's (:func:`upgrade_model_mapping`)."""
        if isinstance(data, dict) and says_names_1(data.get("placement_names")):
            return upgrade_model_mapping(data)
        if isinstance(data, dict):
            refused_v1_spelling(data, path or "model")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a mapping (a ``model_config.json``, a config section): unknown keys refused, values
        coerced to their fields' types, version 1's names read as such where it says ``placement_names: 1``."""
        return build(cls, data, "model")

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a model config a checkpoint or run saved (``model_config.json``, ``run_config.json``'s
        model section): as :meth:`from_dict`, except that a config written before ``head_init`` existed reads
        the fields it omits with the defaults of its time (tied, :data:`LEGACY_TIE_EMBEDDINGS`; an untied head
        had the fan-in init), so that it loads with the head it was trained with; and a config written before
        ``placement_names`` existed is read with version 1's names (its ``span`` is today's ``span_post``, its
        ``span_clean`` today's ``span``), so that it loads as the model it was trained as."""
        if isinstance(data, dict) and "placement_names" not in data:
            data = {**data, "placement_names": 1}
        if isinstance(data, dict) and "head_init" not in data:
            data = {"tie_embeddings": LEGACY_TIE_EMBEDDINGS, **data}
            if not data["tie_embeddings"]:  # a tied head has no init of its own: head_init stays the default
                data["head_init"] = "fan_in"
        return cls.from_dict(data)


def says_names_1(value: Any) -> bool:
    """Whether a ``placement_names`` value asks for version 1's names: 1, or "1" as an override gives it."""
    return str(value).strip() == "1"


V1_HINT = "write placement_names: 1 to read a config with version 1's names"


def refused_v1_spelling(data: dict[str, Any], prefix: str = "model") -> None:
    """Refuse, in one line that says what it is now, a version 1 spelling that version 2 has no value for: the
    placement ``span_clean``, a span_post scaling (init, skip, both) as ``span_scaling``, or a field version 2
    renamed. (A name that version 2 reads otherwise, such as ``span``, cannot be caught.)"""
    where = [(f"{prefix}.placement", data.get("placement"))]
    overrides = data.get("placement_overrides")
    if isinstance(overrides, dict):
        where += [(f"{prefix}.placement_overrides", v) for v in overrides.values()]
    for path, value in where:
        if value == "span_clean":
            fail(path, value, f"allowed: {', '.join(PLACEMENTS)}; version 1's span_clean is span since placement "
                 f"names {PLACEMENT_NAMES} ({V1_HINT})")
    if data.get("span_scaling") in SPAN_POST_SCALINGS:
        fail(f"{prefix}.span_scaling", data["span_scaling"],
             f"allowed: {', '.join(SPAN_SCALINGS)}; {data['span_scaling']} is a span_post_scaling since placement "
             f"names {PLACEMENT_NAMES} ({V1_HINT})")
    for old in ("span_clean_scaling", "span_alpha", "span_beta"):
        if old in data:
            fail(f"{prefix}.{old}", data[old], f"the field is {RENAMED_FIELDS_V1[old]} since placement names "
                 f"{PLACEMENT_NAMES}; allowed: {RENAMED_FIELDS_V1[old]} ({V1_HINT})")


def tool_model_settings(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The ``--set`` model settings of check, profile and bench (:func:`~spannorm.configuration.typed_overrides`),
    in today's placement names only: these tools name their placements themselves, so a ``placement_names``
    setting would reread them with the old names."""
    settings = typed_overrides(overrides, ModelConfig, "model")
    if "placement_names" in settings:
        fail("model.placement_names", settings["placement_names"],
             f"these tools take today's placement names only (version {PLACEMENT_NAMES}); allowed: no "
             "placement_names setting")
    return settings


def upgrade_placement_name(name: Any) -> Any:
    """A version 1 placement name as version 2 writes it."""
    return RENAMED_PLACEMENTS_V1.get(name, name) if isinstance(name, str) else name


def upgrade_model_mapping(data: dict[str, Any]) -> dict[str, Any]:
    """A model config mapping written with version 1's names (see :data:`PLACEMENT_NAMES`), as version 2 writes
    it: placements and per-layer placements renamed, SpanNorm's fields renamed, ``placement_names: 2``. A field
    that names both versions' keys keeps the version-2 key's value out: the mapping is refused as it is."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "placement":
            value = upgrade_placement_name(value)
        elif key == "placement_overrides" and isinstance(value, dict):
            value = {layer: upgrade_placement_name(p) for layer, p in value.items()}
        elif key == "placement_names":
            value = PLACEMENT_NAMES
        new_key = RENAMED_FIELDS_V1.get(key, key) if isinstance(key, str) else key
        if new_key in out:
            fail(f"model.{key}", value, f"a config with placement_names: 1 names {new_key} twice (as {key} and "
                 f"as {new_key}); allowed: version 1's names only")
        out[new_key] = value
    return out


def upgrade_override(text: str) -> str:
    """A dotted override (``model.placement=span_clean``) written with version 1's names, as version 2 writes
    it (``model.placement=span``); an override of any other field comes back unchanged."""
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("model.") or key.count(".") != 1:
        return text
    field_name = key[len("model."):]
    if field_name == "placement":
        value = upgrade_placement_name(value.strip())
    elif field_name == "placement_overrides":
        try:  # a YAML mapping of layer -> placement, as the override parser reads it
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return text
        if isinstance(parsed, dict):
            parsed = {layer: upgrade_placement_name(p) for layer, p in parsed.items()}
            value = yaml.safe_dump(parsed, default_flow_style=True).strip()
    return f"model.{RENAMED_FIELDS_V1.get(field_name, field_name)}={value}"


__all__ = ["BLOCK_PLACEMENTS", "DUAL_STREAM_PLACEMENTS", "PLACEMENTS", "PLACEMENT_NAMES", "ConfigError",
           "ModelConfig", "MoEConfig", "tool_model_settings", "upgrade_model_mapping", "upgrade_override",
           "upgrade_placement_name"]
