"""RunConfig: layering of defaults, presets, YAML files and dotted overrides; coercion; one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from spannorm.config import ConfigError, MoEConfig
from spannorm.model.counting import param_counts
from spannorm.train.config import (
    OptimConfig,
    RunConfig,
    apply_overrides,
    load_preset,
    parse_override,
    preset_names,
    resolve_config,
)


def test_overrides_are_coerced_to_field_types():
    cfg = resolve_config(None, None, ["model.n_layers=3", "optim.lr=3e-4", "train.compile=true",
                                      "model.n_kv_heads=null", "model.placement_overrides={0: post, 2: span}",
                                      "model.moe.n_experts=4", "model.moe.top_k=1", "data.val_fraction=0.05",
                                      "train.steps=1e3"])
    assert cfg.model.n_layers == 3 and isinstance(cfg.model.n_layers, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.compile is True
    assert cfg.model.n_kv_heads is None
    assert cfg.model.placement_overrides == {0: "post", 2: "span"}
    assert cfg.model.moe == MoEConfig(n_experts=4, top_k=1)
    assert cfg.data.val_fraction == 0.05
    assert cfg.train.steps == 1000


def test_layers_apply_in_order_preset_then_file_then_overrides(tmp_path):
    file = tmp_path / "run.yaml"
    # "2e-3" is a *string* to YAML 1.1; the config must still read it as a number.
    file.write_text("model:\n  n_layers: 6\n  d_model: 64\noptim:\n  lr: 2e-3\n")
    cfg = resolve_config("tiny", file, ["model.n_layers=2"])
    tiny = load_preset("tiny")
    assert cfg.model.n_layers == 2  # override beats file
    assert cfg.model.d_model == 64  # file beats preset
    assert cfg.optim.lr == 2e-3
    assert cfg.train.steps == tiny["train"]["steps"]  # preset beats defaults
    assert cfg.model.n_heads == tiny["model"]["n_heads"]


def test_round_trip_through_yaml_and_dict():
    cfg = resolve_config("tiny", None, ["model.moe.n_experts=4", "model.placement_overrides={1: post}"])
    again = RunConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, fragment", [
    (["model.n_layer=3"], "model.n_layer is not a known config key (did you mean 'n_layers'?); allowed:"),
    (["optim.lr=-1e-3"], "optim.lr=-0.001 is invalid: must be a finite number > 0"),
    (["optim.lr=fast"], "optim.lr='fast' is invalid: must be a number"),
    (["train.steps=ten"], "train.steps='ten' is invalid: must be an integer"),
    (["train.steps=2.5"], "train.steps='2.5' is invalid: must be an integer"),
    (["model.placement=middle"], "model.placement='middle' is invalid: allowed: pre, post, peri, span"),
    (["modle.n_layers=3"], "modle is not a known config key (did you mean 'model'?)"),
    (["model.moe.experts=3"], "model.moe.experts is not a known config key"),
    (["train.compile=maybe"], "train.compile='maybe' is invalid: must be true or false"),
    (["optim.fused=maybe"], "optim.fused='maybe' is invalid: must be true or false"),
    (["optim.schedule=linear"], "optim.schedule='linear' is invalid: allowed: cosine, wsd, constant"),
    (["model.n_layers"], "override 'model.n_layers' is invalid: it has no '='; write KEY=VALUE"),
])
def test_bad_values_raise_one_line_config_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_config(None, None, override)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_optim_fused_is_written_only_when_set():
    """Unset (None: the fused AdamW on CUDA only) it is left out of the dict, so run configs written before the
    switch existed read back equal; set, it round-trips."""
    assert "fused" not in resolve_config("tiny", None, []).to_dict()["optim"]
    assert RunConfig.from_dict(resolve_config("tiny", None, []).to_dict()).optim.fused is None
    for value in (True, False):
        cfg = resolve_config("tiny", None, [f"optim.fused={str(value).lower()}"])
        assert cfg.to_dict()["optim"]["fused"] is value and RunConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_in_files_and_presets(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="optimizer in config file .* is not a known config section"):
        resolve_config(None, file, [])
    file.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate is not a known config key"):
        resolve_config(None, file, [])
    with pytest.raises(ConfigError, match="preset 'huge' does not exist; allowed: .*tiny"):
        resolve_config("huge", None, [])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(None, tmp_path / "missing.yaml", [])


def test_optim_config_rejects_negative_lr_directly():
    with pytest.raises(ConfigError, match="optim.lr"):
        RunConfig(optim=OptimConfig(lr=-1.0))


def test_parse_override_accepts_leading_dashes():
    assert parse_override("--model.d_model=64") == (["model", "d_model"], "64")
    nested = apply_overrides({}, ["model.moe.top_k=1"])
    assert nested == {"model": {"moe": {"top_k": "1"}}}


def test_presets_have_the_promised_shapes():
    assert {"tiny", "gpt2-small", "shakespeare-char"} <= set(preset_names())
    gpt2 = resolve_config("gpt2-small", None, ["model.vocab_size=50257"])
    m = gpt2.model
    assert (m.n_layers, m.n_heads, m.d_model, m.context_length) == (12, 12, 768, 1024)
    tied = dataclasses.replace(m, tie_embeddings=True)
    assert 120e6 < param_counts(tied).total < 130e6  # 124M class when tied, as GPT-2
    assert param_counts(m).total == param_counts(tied).total + 50257 * 768  # the default untied head
    shakes = resolve_config("shakespeare-char")
    m, t, o = shakes.model, shakes.train, shakes.optim
    assert (m.n_layers, m.n_heads, m.d_model, m.context_length, m.placement) == (4, 4, 128, 64, "pre")
    assert (t.batch_size, t.steps, o.lr) == (12, 2000, 1e-3)
    assert shakes.data.tokenizer == "byte"
