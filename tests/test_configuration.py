"""The one config machinery (:mod:`spannorm.configuration`): enumerated fields checked from their ``Literal``
annotations, every float finite, required and unknown keys, and the one ``KEY=VALUE`` parser that train,
check, profile, bench and sweep plans share (the same malformed value gives the same line everywhere)."""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import pytest

import spannorm.train.config as run_config_module
from spannorm.cli.main import main
from spannorm.config import PLACEMENTS, ConfigError, ModelConfig, MoEConfig
from spannorm.configuration import (
    apply_overrides,
    build,
    check_fields,
    coerce,
    field_types,
    parse_override,
    typed_overrides,
)
from spannorm.diagnostics.check import CheckSettings
from spannorm.experiments.plan import parse_plan
from spannorm.train.config import OptimConfig, RunConfig, TrainConfig, resolve_config


@dataclass
class Inner:
    mode: Literal["fast", "slow"] = "fast"
    ratio: float = 0.5


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    scale: float | None = None
    modes: dict[int, Literal["a", "b"]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------- Literal fields, from annotations
def test_literal_is_checked_by_the_builder_from_the_annotation():
    assert build(Outer, {"name": "x", "inner": {"mode": "slow"}}).inner.mode == "slow"
    with pytest.raises(ConfigError) as err:
        build(Outer, {"name": "x", "inner": {"mode": "medium"}}, "cfg")
    assert str(err.value) == "cfg.inner.mode='medium' is invalid: allowed: fast, slow"
    with pytest.raises(ConfigError, match=r"^cfg\.modes\[3\]='c' is invalid: allowed: a, b$"):
        build(Outer, {"name": "x", "modes": {3: "c"}}, "cfg")


def test_literal_is_checked_on_a_dataclass_built_directly():
    check_fields(Inner(mode="slow"), "cfg")
    with pytest.raises(ConfigError, match=r"^cfg\.mode='medium' is invalid: allowed: fast, slow$"):
        check_fields(Inner(mode="medium"), "cfg")  # type: ignore[arg-type]


def test_every_enumerated_config_field_is_a_literal():
    """No enumerated field is left as a bare str checked by hand: each lists its allowed values in its type."""
    enumerated = {ModelConfig: ["placement", "norm", "span_scaling", "init"], OptimConfig: ["schedule"],
                  TrainConfig: ["precision", "device", "progress", "parallel"], CheckSettings: ["device"]}
    for cls, names in enumerated.items():
        for name in names:
            assert getattr(field_types(cls)[name], "__origin__", None) is Literal, (cls.__name__, name)
    assert field_types(ModelConfig)["placement"].__args__ == PLACEMENTS  # PLACEMENTS stays the one list


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="batch"), "model.norm='batch' is invalid: allowed: rms, layer"),
    (dict(init="xavier"), "model.init='xavier' is invalid: allowed: fan_in, fixed"),
    (dict(placement_overrides={0: "mixln"}), "model.placement_overrides[0]='mixln' is invalid: allowed: pre, post"),
])
def test_model_config_literal_messages_name_field_value_and_allowed(kwargs, message):
    with pytest.raises(ConfigError) as direct:
        ModelConfig(**kwargs)
    with pytest.raises(ConfigError) as built:
        ModelConfig.from_dict(kwargs)
    assert str(direct.value).startswith(message) and str(built.value).startswith(message)


def test_train_literal_fields_fail_through_overrides():
    for override, allowed in (("train.precision=fp16", "fp32, bf16"), ("train.device=tpu", "auto, cpu, cuda"),
                              ("train.progress=loud", "auto, bar, plain, none"),
                              ("train.parallel=zero3", "auto, none, ddp, fsdp")):
        with pytest.raises(ConfigError) as err:
            resolve_config(None, None, [override])
        key, value = override.split("=")
        assert str(err.value) == f"{key}={value!r} is invalid: allowed: {allowed}"
    with pytest.raises(ConfigError, match=r"^train\.device='tpu' is invalid: allowed: auto, cpu, cuda$"):
        RunConfig(train=TrainConfig(device="tpu"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- finiteness
@pytest.mark.parametrize("key", ["model.span_post_alpha", "model.span_post_beta", "model.embed_scale",
                                 "model.moe.balance_coef", "model.moe.z_loss_coef", "optim.lr",
                                 "train.spike_sigmas", "data.val_fraction"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_non_finite_floats_are_refused_with_one_line(key, value, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_config(None, None, [f"{key}={value}"])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{key}=") and "must be a finite number" in message
    section, *rest = key.split(".")
    text = f"{section}:\n" + "".join("  " * (i + 1) + f"{name}:\n" for i, name in enumerate(rest[:-1]))
    file = tmp_path / "cfg.yaml"
    file.write_text(text + "  " * len(rest) + f"{rest[-1]}: .{value.lower().lstrip('-')[:3]}\n")  # YAML .inf/.nan
    message = rf"^{key.replace('.', '[.]')}=(inf|nan) is invalid: must be a finite number$"
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, file, [])


@pytest.mark.parametrize("name", ["span_post_alpha", "span_post_beta", "embed_scale"])
def test_non_finite_model_floats_are_refused_in_python_too(name):
    for bad in (math.inf, math.nan):
        with pytest.raises(ConfigError, match=rf"^model\.{name}=(inf|nan) is invalid: must be a finite number$"):
            ModelConfig(**{name: bad})
    for coef in ("balance_coef", "z_loss_coef"):
        with pytest.raises(ConfigError, match=rf"^model\.moe\.{coef}=inf is invalid: must be a finite number$"):
            ModelConfig(moe=MoEConfig(**{coef: math.inf}))


def test_coerce_refuses_non_finite_floats_and_accepts_finite_ones():
    assert coerce("x", "1e-3", float) == 1e-3 and coerce("x", 2, float) == 2.0
    assert coerce("x", "null", float | None) is None
    for bad in (math.inf, "nan", "-Infinity"):
        with pytest.raises(ConfigError, match="must be a finite number"):
            coerce("x", bad, float)


# ---------------------------------------------------------------------- keys
def test_required_and_unknown_keys():
    with pytest.raises(ConfigError, match=r"^cfg is missing 'name'"):
        build(Outer, {}, "cfg")
    with pytest.raises(ConfigError, match=r"^cfg\.inner\.ratoi is not a known config key \(did you mean 'ratio'\?\); "
                                          r"allowed: mode, ratio$"):
        build(Outer, {"name": "x", "inner": {"ratoi": 1}}, "cfg")
    assert build(Outer, {"name": "x", "sizes": "[1, 2]", "scale": "none"}) == Outer("x", sizes=[1, 2])


# ---------------------------------------------------------------------- the one KEY=VALUE parser
def test_parse_override_and_apply_overrides():
    assert parse_override("--model.d_model=64") == (["model", "d_model"], "64")
    assert parse_override("a.b=c=d") == (["a", "b"], "c=d")
    for bad in ("model.n_layers", "=3", "model..x=1"):
        with pytest.raises(ConfigError, match=r"is invalid: .*; write KEY=VALUE, the KEY dotted into sections, "
                                              r"e\.g\. model\.n_layers=24$"):
            parse_override(bad)
    assert apply_overrides({}, ["inner.mode=slow"], Outer) == {"inner": {"mode": "slow"}}
    with pytest.raises(ConfigError, match=r"'name\.x=1' is invalid: name is a value, not a section"):
        apply_overrides({}, ["name.x=1"], Outer)
    with pytest.raises(ConfigError, match=r"name a field, e\.g\. inner\.FIELD=value"):
        apply_overrides({}, ["inner=3"], Outer)


def test_typed_overrides_accept_the_section_prefix_and_coerce():
    settings = typed_overrides(["scale_out_proj=false", "model.norm_eps=1e-5", "moe.n_experts=4",
                                "placement_overrides={0: post}", "d_ff=null"], ModelConfig, "model")
    assert settings == {"scale_out_proj": False, "norm_eps": 1e-5, "moe": {"n_experts": 4},
                        "placement_overrides": {0: "post"}, "d_ff": None}
    cfg = ModelConfig.from_dict(settings)
    assert cfg.moe == MoEConfig(n_experts=4) and cfg.placement_overrides == {0: "post"}


MALFORMED = [
    ("norm_eps=abc", "spannorm: error: model.norm_eps='abc' is invalid: must be a number"),
    ("span_post_beta=nan", "spannorm: error: model.span_post_beta='nan' is invalid: must be a finite number"),
    ("norm=batch", "spannorm: error: model.norm='batch' is invalid: allowed: rms, layer"),
    ("n_kv_heds=2", "spannorm: error: model.n_kv_heds is not a known config key (did you mean 'n_kv_heads'?)"),
    ("scale_out_proj", "spannorm: error: override 'scale_out_proj' is invalid: it has no '='; write KEY=VALUE"),
    ("placement_overrides={0: [", "spannorm: error: model.placement_overrides='{0: [' is invalid: must be a YAML"),
]


@pytest.mark.parametrize("setting, line", MALFORMED)
def test_every_command_gives_the_same_line_for_the_same_malformed_setting(setting, line, tmp_path, capsys):
    """train takes --model.KEY=VALUE, check/profile/bench take --set KEY=VALUE (or --set model.KEY=VALUE);
    all go through one parser and one coercion, so each prints the same single line and exits 2."""
    prefixed = setting if "=" not in setting else f"model.{setting}"
    commands = {
        "train": ["train", "--out", str(tmp_path / "run"), f"--{prefixed}" if "=" in setting else prefixed],
        "check": ["check", "pre", "--depths", "2", "--steps", "0", "--out", str(tmp_path / "chk"), "--set", setting],
        "check model.": ["check", "pre", "--depths", "2", "--out", str(tmp_path / "chk"), "--set", prefixed],
        "profile": ["profile", "--depths", "2", "--set", setting],
        "bench": ["bench", "--size", "tiny", "--out", str(tmp_path / "b.json"), "--set", setting],
    }
    if "=" not in setting:  # train reads a bare word as an option, not an override
        commands.pop("train")
    for name, argv in commands.items():
        assert main(argv) == 2, name
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(line), (name, err)
        assert "Traceback" not in captured.err
    assert not any(tmp_path.iterdir())  # nothing written


def test_plan_overrides_use_the_same_parser():
    grid = {"placements": ["pre"], "depths": [2]}
    with pytest.raises(ConfigError, match=r"^plan\.base\.overrides=\['model\.n_layers'\] is invalid: must be a list "
                                          r"of 'section\.field=value' strings$"):
        parse_plan({"grid": grid, "base": {"overrides": ["model.n_layers"]}})
    plan = parse_plan({"grid": grid, "base": {"overrides": ["--model.d_model=64"]}})
    assert plan.base_overrides == ("--model.d_model=64",)


def test_check_settings_are_built_by_the_machinery():
    settings = build(CheckSettings, {"depths": "[8, 4, 8]", "weight_decay": "0.2", "device": "cpu"})
    assert settings.depths == [4, 8] and settings.weight_decay == 0.2
    with pytest.raises(ConfigError, match=r"^weight_decay=inf is invalid: must be a finite number$"):
        CheckSettings(weight_decay=math.inf).validate()
    with pytest.raises(ConfigError, match=r"^device='tpu' is invalid: allowed: cpu, cuda$"):
        build(CheckSettings, {"device": "tpu"})
    assert dataclasses.asdict(settings)["model_overrides"] == {}


# ---------------------------------------------------------------------- the init-from layer is passed in
def test_resolve_config_reads_a_checkpoint_only_through_the_layer_it_is_given(tmp_path):
    """train/config sits below interop: it never reads a checkpoint itself. The caller passes the function
    that does, and its layer goes between the preset and the overrides."""
    calls = []

    def layer(path):
        calls.append(path)
        return {"model": {"d_model": 48, "n_heads": 4, "placement": "peri"}}

    overrides = [f"train.init_from={tmp_path}", "model.placement=span"]
    plain = resolve_config("tiny", None, overrides)
    assert calls == [] and plain.model.d_model != 48
    cfg = resolve_config("tiny", None, overrides, init_from_layer=layer)
    assert calls == [str(tmp_path)]
    assert (cfg.model.d_model, cfg.model.placement) == (48, "span")  # the override still wins
    tree = ast.parse(open(run_config_module.__file__).read())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("spannorm.interop")]  # no import of the layer above
