"""Scaled RoPE on import (Llama 3.x ``llama3``, ``linear``, ``yarn``) with logit parity against transformers past
``original_max_position_embeddings``; everything else refused in one line. Sliding windows (Mistral): spannorm
attends to the full prefix, so every path that would run past the window (import, ``--init-from``, a later
context change) is refused, and the refusal names the window."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spannorm import ConfigError, ModelConfig, SpanNormLM  # noqa: E402
from spannorm.cli.main import main  # noqa: E402
from spannorm.interop import InteropError, export_hf, export_model, import_hf  # noqa: E402
from spannorm.interop.hf_export import export_hf_remote_code  # noqa: E402
from spannorm.interop.init_from import check_init_target  # noqa: E402
from spannorm.train.config import RunConfig  # noqa: E402

TOL = 1e-4
VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LONG = 200  # well past original_max_position_embeddings = 32 below
transformers.utils.logging.set_verbosity_error()


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * noise if p.dim() == 1 else noise if "embed" in name else noise / math.sqrt(p.shape[1]))


def _tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _max_diff(ours, hf_model, idx) -> float:
    return (ours(idx).logits - hf_model(input_ids=idx, use_cache=False).logits).abs().max().item()


ROPES = {
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32),
    "yarn-params": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                        beta_fast=16, beta_slow=2, attention_factor=1.3),
}


@pytest.mark.parametrize("name", ROPES)
def test_scaled_rope_imports_with_parity_past_the_original_context(name, tmp_path):
    rope = ROPES[name]
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, rope_parameters=dict(rope))).eval()
    _randomize(hf_model)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.rope_scaling["rope_type"] == rope["rope_type"]
    idx = _tokens(LONG)
    assert _max_diff(ours, hf_model, idx) < TOL
    # Sensitive: the same weights with plain RoPE miss by far more than TOL at this length.
    plain = SpanNormLM(dataclasses.replace(ours.cfg, rope_scaling=None))
    plain.load_state_dict(ours.state_dict())
    assert _max_diff(plain, hf_model, idx) > 100 * TOL
    # Export back: as Llama, which reads the same scaling, except yarn, whose original context transformers 4
    # would take from max_position_embeddings: that goes out with the modeling code of every placement.
    result = export_model(ours, tmp_path / "out")
    assert result.hf_llama == (rope["rope_type"] != "yarn")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                                 trust_remote_code=True).eval()
    assert type(reloaded).__name__ == ("LlamaForCausalLM" if result.hf_llama else "SpanNormForCausalLM")
    assert _max_diff(ours, reloaded, idx) < TOL
    assert import_hf(tmp_path / "out").cfg == ours.cfg


def test_transformers4_rope_scaling_key_is_read(tmp_path):
    """transformers 4 wrote ``rope_scaling`` with ``type``; the same llama3 parameters give the same model."""
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, rope_parameters=ROPES["llama3"]))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert import_hf(tmp_path / "hf").cfg.rope_scaling == {k: v for k, v in ROPES["llama3"].items()
                                                           if k != "rope_theta"}


def test_unsupported_rope_is_one_line_and_writes_nothing(tmp_path, capsys):
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'dynamic' is not supported; allowed: default, linear, llama3, yarn" in err[0]
    assert not (tmp_path / "out").exists()


def test_rope_scaling_config_is_validated_and_default_configs_are_unchanged():
    with pytest.raises(ConfigError, match=r"model.rope_scaling.rope_type='ntk' is invalid: allowed: linear, "):
        ModelConfig(rope_scaling={"rope_type": "ntk", "factor": 2.0})
    with pytest.raises(ConfigError, match="model.rope_scaling.high_freq_factor=None is invalid"):
        ModelConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 64})
    # Unset, the new fields are not written: checkpoints and run configs read and compare as before.
    assert "rope_scaling" not in ModelConfig().to_dict() and "sliding_window" not in ModelConfig().to_dict()
    assert "rope_scaling" not in RunConfig().to_dict()["model"]
    scaled = ModelConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert ModelConfig.from_dict(scaled.to_dict()) == scaled


# ---------------------------------------------------------------------------------------------- sliding window
@pytest.fixture()
def mistral(tmp_path):
    cfg = transformers.MistralConfig(**{**SMALL, "hidden_size": 32}, sliding_window=16, rope_theta=2000.0)
    hf_model = transformers.MistralForCausalLM(cfg).eval()
    _randomize(hf_model, seed=4)
    hf_model.save_pretrained(str(tmp_path / "mistral"))
    return hf_model, tmp_path / "mistral"


def test_sliding_window_travels_with_the_model_and_caps_every_context(mistral, tmp_path):
    hf_model, directory = mistral
    ours = import_hf(directory)
    assert (ours.cfg.context_length, ours.cfg.sliding_window) == (16, 16)
    assert _max_diff(ours, hf_model, _tokens(16)) < TOL
    # Past the window full attention would compute something else (how far off, measured here).
    full = SpanNormLM(dataclasses.replace(ours.cfg, context_length=32, sliding_window=None))
    full.load_state_dict(ours.state_dict())
    assert _max_diff(full, hf_model, _tokens(32)) > 100 * TOL
    # The run-time error for a longer input does not advise raising the context past the window.
    with pytest.raises(ValueError, match="16-token sliding window.*shorten the input") as err:
        ours(_tokens(17))
    assert "raise" not in str(err.value)
    # A later context change is refused wherever the config is built.
    with pytest.raises(ConfigError, match=r"model.context_length=32 is invalid: the model was trained with "
                                          r"sliding-window attention \(window 16\).*allowed: <= 16"):
        dataclasses.replace(ours.cfg, context_length=32)
    with pytest.raises(ConfigError, match="model.sliding_window=None is invalid: the checkpoint was trained with"):
        check_init_target(directory, dataclasses.replace(ours.cfg, context_length=32, sliding_window=None))
    # Export keeps the window: transformers loads it as Mistral.
    export_hf(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["architectures"], config["sliding_window"]) == (["MistralForCausalLM"], 16)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert _max_diff(ours, reloaded, _tokens(16)) < TOL
    assert import_hf(tmp_path / "out").cfg == ours.cfg


def test_init_from_a_windowed_checkpoint_refuses_a_longer_context(mistral, tmp_path, capsys):
    _, directory = mistral
    settings = ["--data.embedded_max_bytes=60000", "--train.steps=1", "--train.batch_size=2",
                "--train.progress=none", f"--data.cache_dir={tmp_path / 'cache'}", "--data.tokenizer=byte"]
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--init-from", str(directory),
                 "--model.context_length=32", *settings]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sliding-window attention (window 16)" in err[0] and "allowed: <= 16" in err[0]
    assert "raise" not in err[0]
    assert not (tmp_path / "run").exists()
    assert main(["import-hf", str(directory), "--out", str(tmp_path / "out"), "--context-length", "32"]) == 2
    assert "sliding-window" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_remote_code_export_applies_the_window(mistral, tmp_path):
    """Our own modeling code masks keys outside the window, so the exported folder computes the Mistral
    function even past the window (where spannorm itself refuses to run)."""
    hf_model, directory = mistral
    ours = import_hf(directory)
    export_hf_remote_code(ours, tmp_path / "rc")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "rc"), trust_remote_code=True).eval()
    idx = _tokens(40)
    assert (theirs(input_ids=idx).logits - hf_model(input_ids=idx).logits).abs().max() < TOL
    prompt = idx[:1, :10]
    assert torch.equal(theirs.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True),
                       theirs.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False))
    with pytest.raises(InteropError):
        import_hf(directory, context_length=40)
