"""Interop without transformers: export/import through safetensors alone, and converting a checkpoint to another
placement for continued pretraining (copied weights, identity norms, reported function changes)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spannorm import ConfigError, ModelConfig, SpanNormLM
from spannorm.interop import (
    checkpoint_model_config,
    convert_model,
    export_hf,
    import_hf,
    init_model_from,
    llama_state_dict,
)
from spannorm.model.io import save_model

CFG = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, context_length=16)


def _model(**kw) -> SpanNormLM:
    model = SpanNormLM(ModelConfig(**{**CFG, **kw})).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # trained-looking norm gains and biases, so that identity norms are visible
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _idx() -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_interop_does_not_import_transformers():
    code = ("import sys, spannorm.interop, spannorm.cli.main as m; m.build_parser(); "
            "sys.exit(int('transformers' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("kw", [dict(delta_t=0.5, tie_embeddings=True), dict(delta_t=0.5),
                                dict(placement="lns", tie_embeddings=False, bias=True)])
def test_export_then_import_computes_the_same_logits(kw, tmp_path):
    """The folds of Δt, the embedding multiplier and LNS's scale are exact: the re-imported plain Llama (embed
    scale 1, Δt 1, no LNS) gives the same logits."""
    model = _model(**kw)
    export_hf(model, tmp_path / "hf")
    again = import_hf(tmp_path / "hf")
    assert again.cfg.embedding_multiplier == 1.0 and again.cfg.delta_t == 1.0 and again.cfg.placement == "pre"
    assert model.cfg.embedding_multiplier != 1.0
    torch.testing.assert_close(again(_idx()).logits, model(_idx()).logits, atol=1e-5, rtol=1e-5)
    # and the exported tensors really are rescaled, not copied: the embedding carries sqrt(d)
    state = llama_state_dict(model)
    torch.testing.assert_close(state["model.embed_tokens.weight"], model.embed.weight * 32 ** 0.5)


def test_init_from_spannorm_dir_without_target_is_the_saved_model(tmp_path):
    model = _model()
    save_model(model, tmp_path / "m")
    assert checkpoint_model_config(tmp_path / "m") == model.cfg
    assert torch.equal(init_model_from(tmp_path / "m")(_idx()).logits, model(_idx()).logits)
    with pytest.raises(FileNotFoundError, match="neither a spannorm model directory"):
        init_model_from(tmp_path)


def test_same_config_conversion_is_exact():
    model = _model(placement="span")
    converted, report = convert_model(model, model.cfg)
    assert report.function_changes == [] and report.dropped == [] and report.identity_norms == []
    assert torch.equal(converted(_idx()).logits, model(_idx()).logits)


@pytest.mark.parametrize("placement, new_norms, dropped_norms", [
    ("span", ["block_out_norm"], []),
    ("peri", ["attn_out_norm", "ffn_out_norm"], []),
    ("post", ["attn_out_norm", "ffn_out_norm"], ["attn_in_norm", "ffn_in_norm"]),
])
def test_pre_to_other_placement_copies_weights_and_starts_new_norms_at_identity(placement, new_norms,
                                                                                 dropped_norms, tmp_path):
    pre = _model(placement="pre")
    save_model(pre, tmp_path / "pre")
    target_cfg = dataclasses.replace(checkpoint_model_config(tmp_path / "pre"), placement=placement)
    model, report = convert_model(pre, target_cfg)
    source = pre.state_dict()
    for name, tensor in model.state_dict().items():
        if any(f".{norm}." in name for norm in new_norms):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
            assert name in report.identity_norms
        else:
            assert torch.equal(tensor, source[name]), name
    for layer in range(CFG["n_layers"]):
        for norm in dropped_norms:
            assert f"blocks.{layer}.{norm}.weight" in report.dropped
    assert f"pre->{placement}" in report.function_changes[0]
    # a norm at identity still normalizes: the converted model computes something else
    assert not torch.allclose(model(_idx()).logits, pre(_idx()).logits, atol=1e-3)
    assert init_model_from(tmp_path / "pre", target_cfg).state_dict().keys() == model.state_dict().keys()


def test_embedding_multiplier_change_is_reported():
    pre = _model(placement="pre", embed_scale=1.0)
    _, report = convert_model(pre, dataclasses.replace(pre.cfg, embed_scale=None))
    assert any("embedding multiplier 1 ->" in c and "embed_scale=1" in c for c in report.function_changes)


def test_untying_copies_the_embedding_into_the_head_and_tying_an_untied_head_is_refused():
    tied = _model(tie_embeddings=True)
    untied, report = convert_model(tied, dataclasses.replace(tied.cfg, tie_embeddings=False))
    assert report.head_from_embedding and torch.equal(untied.lm_head.weight, tied.embed.weight)
    torch.testing.assert_close(untied(_idx()).logits, tied(_idx()).logits)
    with pytest.raises(ConfigError, match="tie_embeddings=True is invalid"):
        convert_model(untied, tied.cfg)


@pytest.mark.parametrize("change, field", [({"d_model": 64}, "d_model"), ({"n_kv_heads": 4}, "n_kv_heads"),
                                           ({"d_ff": 80}, "d_ff"), ({"bias": True}, "bias")])
def test_shape_changes_are_refused(change, field):
    pre = _model()
    with pytest.raises(ConfigError, match=f"model.{field}=.* is invalid: the checkpoint has"):
        convert_model(pre, dataclasses.replace(pre.cfg, **change))


def test_import_needs_only_safetensors_and_config(tmp_path):
    """A Llama directory written by hand (no transformers): config.json with θ in transformers-4 style."""
    model = _model(embed_scale=1.0)
    export_hf(model, tmp_path / "hf")
    config_path = Path(tmp_path / "hf" / "config.json")
    config = json.loads(config_path.read_text())
    del config["rope_parameters"]
    config_path.write_text(json.dumps(config))
    again = import_hf(tmp_path / "hf")
    assert again.cfg.rope_theta == model.cfg.rope_theta
    torch.testing.assert_close(again(_idx()).logits, model(_idx()).logits, atol=1e-5, rtol=1e-5)
