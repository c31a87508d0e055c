"""The placement registry (``spannorm.model.placements``): every per-placement table in the code has exactly
the registry's keys, and what the rest of the code reads from a block class (init rule, residual scales,
final-norm rule, identity path, knob, Llama export, SpanNorm variant) agrees with what the model does."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from spannorm import DecoderLM, ModelConfig, SpanNormLM, param_counts
from spannorm.config import BLOCK_PLACEMENTS, DUAL_STREAM_PLACEMENTS, PLACEMENTS
from spannorm.experiments.results import SPAN_PLACEMENTS
from spannorm.interop.hf_export import LLAMA_LAYER_PLACEMENTS, llama_incompatibilities
from spannorm.model.placements import (
    BLOCKS,
    DEEPNORM_ALPHA,
    DELTA_T,
    PATTERNS,
    SPAN_POST_ALPHA,
    BlockInit,
    Knob,
    block_classes,
    has_final_norm,
    placement_knob,
    placement_names,
)
from spannorm.theory.criterion import KNOBS, configured_value, suggest_scaling
from spannorm.theory.meanfield import IDENTITY_PATH_NORMS, STEPS, BlockTheory, block_init_rule, predict_init

README = Path(__file__).resolve().parents[1] / "README.md"


def _cfg(placement: str, **kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_layers=6, context_length=16, placement=placement)
    base.update(kw)
    return ModelConfig(**base)


# ---------------------------------------------------------------------------------------------- the keys
def test_config_names_are_the_registry():
    """The config layer sits below the model and keeps its own tuple of names; it must be the registry's."""
    assert set(PLACEMENTS) == set(placement_names()) and len(PLACEMENTS) == len(placement_names())
    assert set(BLOCK_PLACEMENTS) == set(BLOCKS)
    assert set(PATTERNS) == set(PLACEMENTS) - set(BLOCKS) == {"mixln"}
    assert all(p in BLOCKS for members in PATTERNS.values() for p in members)


def test_every_per_placement_table_has_the_registry_keys():
    assert set(STEPS) == set(BLOCKS)
    assert set(IDENTITY_PATH_NORMS) == set(BLOCKS)
    assert set(KNOBS) == set(PLACEMENTS)
    assert set(LLAMA_LAYER_PLACEMENTS) <= set(BLOCKS)
    assert set(SPAN_PLACEMENTS) <= set(BLOCKS)


def test_registry_class_names_match_their_keys():
    for name, cls in BLOCKS.items():
        assert cls.placement == name


@pytest.mark.parametrize("placement", sorted(BLOCKS))
def test_every_block_declares_the_registry_attributes(placement):
    cls = BLOCKS[placement]
    assert cls.__doc__ and ("x'" in cls.__doc__ or "``pre`` with" in cls.__doc__)  # its equation
    assert set(cls.norm_positions) <= {"attn_in", "attn_out", "ffn_in", "ffn_out", "block_out"}
    for position, source in cls.identity_path_norms:
        assert position in cls.norm_positions and source in ("in", "mid")
    assert cls.knob is None or isinstance(cls.knob, Knob)
    assert cls.why_not_llama is None or (isinstance(cls.why_not_llama, str) and "Llama" in cls.why_not_llama)
    assert isinstance(cls.normalizes_output, bool) and isinstance(cls.span_variant, bool)
    assert isinstance(cls.dual_stream, bool)
    assert isinstance(cls.init_rule(_cfg(placement)), BlockInit)


def test_registry_values():
    """The declared facts, written out once more by hand so that a changed declaration shows here."""
    assert {p: cls.knob for p, cls in BLOCKS.items()} == {
        "pre": DELTA_T, "post": DELTA_T, "peri": DELTA_T, "lns": DELTA_T, "span_post": SPAN_POST_ALPHA,
        "span_b2t": SPAN_POST_ALPHA, "span": DELTA_T, "deepnorm": DEEPNORM_ALPHA, "hybrid": None,
        "residual": DELTA_T}
    assert placement_knob("mixln") == DELTA_T
    assert [cls.placement for cls in block_classes("mixln")] == ["post", "pre"]
    assert KNOBS == {"pre": "delta_t", "lns": "delta_t", "peri": "delta_t", "post": "delta_t", "mixln": "delta_t",
                     "span_post": "alpha", "span_b2t": "alpha", "span": "delta_t", "deepnorm": "alpha",
                     "hybrid": None, "residual": "delta_t"}
    assert {p for p, cls in BLOCKS.items() if cls.normalizes_output} == {"post", "span_post", "span_b2t", "deepnorm",
                                                                         "residual"}
    assert {p for p, cls in BLOCKS.items() if cls.dual_stream} == set(DUAL_STREAM_PLACEMENTS) == {"residual"}
    assert set(LLAMA_LAYER_PLACEMENTS) == {"pre", "lns"}
    assert set(SPAN_PLACEMENTS) == {"span_post", "span_b2t", "span"}
    assert {p: cls.identity_path_norms for p, cls in BLOCKS.items() if cls.identity_path_norms} == {
        "post": (("attn_out", "in"), ("ffn_out", "mid")),
        "deepnorm": (("attn_out", "in"), ("ffn_out", "mid")),
        "span_post": (("block_out", "in"),),
        "span_b2t": (("block_out", "in"),),
        "hybrid": (("attn_out", "in"),),
    }


def test_readme_has_one_row_per_placement_with_its_final_norm_rule():
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| (yes|no)[^|]* \|", README.read_text(), re.M))
    assert set(rows) == set(PLACEMENTS)
    for placement, final in rows.items():
        assert has_final_norm(_cfg(placement)) == (final == "yes"), placement


# ---------------------------------------------------------------------------------------------- init rules
def _expected_init(cfg: ModelConfig, placement: str) -> BlockInit:
    """SPEC §3 written out: GPT-2 output scaling for pre-style blocks, SpanNorm's scaling rule, DeepNet's
    Xavier gain; nothing on top of the model-wide init for the others."""
    L = cfg.n_layers
    if placement in ("pre", "lns"):
        return BlockInit(out_proj_scale=1 / math.sqrt(2 * L) if cfg.scale_out_proj else 1.0)
    if placement in ("span_post", "span_b2t"):
        return {"init": BlockInit(out_proj_scale=1 / math.sqrt(2 * L)), "skip": BlockInit(),
                "both": BlockInit(xavier_gain=(8 * L) ** -0.25)}[cfg.span_post_scaling]
    if placement == "deepnorm":
        return BlockInit(xavier_gain=(8 * L) ** -0.25)
    if placement == "span":  # SPEC §9: the learnable form starts Nₒ's gain at 1/sqrt(L)
        return BlockInit(block_out_gain=1 / math.sqrt(L) if cfg.span_scaling == "learnable" else 1.0)
    return BlockInit()


@pytest.mark.parametrize("extra", [{}, {"scale_out_proj": False}, {"span_post_scaling": "skip"},
                                   {"span_post_scaling": "both", "n_layers": 24}, {"span_scaling": "learnable"}])
@pytest.mark.parametrize("placement", sorted(BLOCKS))
def test_theory_init_rule_is_the_blocks_classmethod(placement, extra):
    cfg = _cfg(placement, **extra)
    rule = BLOCKS[placement].init_rule(cfg)
    assert block_init_rule(cfg, placement) == rule == _expected_init(cfg, placement)
    model = DecoderLM(cfg)
    assert all(block.init_rule(cfg) == rule for block in model.blocks)


@pytest.mark.parametrize("extra", [{}, {"span_post_alpha": 3.0, "span_post_beta": 0.5}, {"span_post_scaling": "skip"}])
@pytest.mark.parametrize("placement", ["span_post", "span_b2t", "deepnorm"])
def test_theory_and_model_use_the_same_residual_scales(placement, extra):
    cfg = _cfg(placement, **extra)
    alpha, beta = BLOCKS[placement].residual_scales(cfg)
    block = DecoderLM(cfg).blocks[0]
    theory = BlockTheory(cfg, 0, placement)
    assert block.alpha == theory.alpha == alpha == configured_value(cfg)
    assert theory.beta == beta == (cfg.span_post_beta if placement != "deepnorm" else 1.0)
    if placement != "deepnorm":
        assert block.beta == beta


@pytest.mark.parametrize("extra,beta", [({}, 1 / math.sqrt(6)), ({"span_scaling": "learnable"}, 1.0),
                                        ({"span_post_alpha": 3.0, "span_post_beta": 0.5, "span_post_scaling": "skip"},
                                         1 / math.sqrt(6))])
def test_span_clean_residual_scales_are_the_models_and_the_theorys(extra, beta):
    """SPEC §9: no skip multiplier, β = 1/sqrt(L) (fixed) or 1 (learnable); the span_* knobs do not apply."""
    cfg = _cfg("span", **extra)
    assert BLOCKS["span"].residual_scales(cfg) == pytest.approx((1.0, beta))
    block = DecoderLM(cfg).blocks[0]
    assert block.beta == BlockTheory(cfg, 0, "span", alpha=5.0).beta == pytest.approx(beta)
    assert BlockTheory(cfg, 0, "span", alpha=5.0).alpha == 1.0 and not hasattr(block, "alpha")
    assert configured_value(cfg) == cfg.delta_t
    # the field is written only when not at its default, so configs written before it existed compare the same
    assert ("span_scaling" in cfg.to_dict()) == (cfg.span_scaling != "fixed")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_other_blocks_have_unit_residual_scales():
    for placement, cls in BLOCKS.items():
        if placement == "span":  # β = 1/sqrt(L): the test above
            continue
        if cls.knob is None or cls.knob.name != "alpha":
            assert cls.residual_scales(_cfg(placement)) == (1.0, 1.0)
            assert BlockTheory(_cfg(placement), 0, placement, alpha=5.0).alpha == 1.0  # no α knob: ignored


# ---------------------------------------------------------------------------------------------- the rest
@pytest.mark.parametrize("final_norm", [None, True, False])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_final_norm_rule_is_the_models_and_the_counts(placement, final_norm):
    cfg = _cfg(placement, final_norm=final_norm, n_layers=3)
    model = DecoderLM(cfg)
    expected = final_norm if final_norm is not None else not BLOCKS[cfg.layer_placements()[-1]].normalizes_output
    assert has_final_norm(cfg) == expected == (model.final_norm is not None)
    assert param_counts(cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("placement", sorted(BLOCKS))
def test_identity_path_of_the_theory_is_the_blocks(placement):
    cfg = _cfg(placement, n_layers=2)
    pred = predict_init(cfg, seq_len=8)
    positions = [p for p, _ in BLOCKS[placement].identity_path_norms]
    assert pred.identity_factor_names == [f"block{layer}.{p}" for layer in range(2) for p in positions]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_llama_export_reads_the_blocks_reason(placement):
    reasons = llama_incompatibilities(_cfg(placement))
    whys = [cls.why_not_llama for cls in dict.fromkeys(block_classes(placement)) if cls.why_not_llama]
    assert len(reasons) == len(whys) and all(r.startswith(w) for r, w in zip(reasons, whys))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_criterion_reads_the_knob(placement):
    knob = placement_knob(placement)
    s = suggest_scaling(_cfg(placement, n_layers=2), steps=1, seq_len=8)
    assert s.knob == (knob.name if knob else None)
    assert s.config_field == (knob.config_field if knob else None)


def test_spannormlm_is_the_decoder_lm():
    assert SpanNormLM is DecoderLM
    torch.manual_seed(0)
    a = SpanNormLM(_cfg("span_post"))
    torch.manual_seed(0)
    b = DecoderLM(_cfg("span_post"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
