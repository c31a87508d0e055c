"""``spannorm train --init-from DIR`` (``train.init_from``): the run's model section starts from the checkpoint,
the first step starts from its weights (converted to another placement when asked), and bad sources are clear
one-line errors before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from spannorm import ConfigError, ModelConfig, SpanNormLM
from spannorm.cli.main import main
from spannorm.interop import export_hf, import_hf
from spannorm.interop.init_from import run_config_layer
from spannorm.launch import train
from spannorm.model.io import load_model, save_model
from spannorm.train.config import resolve_config

SOURCE = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context_length=32,
                     rope_theta=5000.0)


def _run_settings(tmp_path) -> list[str]:
    return [f"data.cache_dir={tmp_path / 'cache'}", "data.embedded_max_bytes=60000", "train.steps=2",
            "train.batch_size=2", "train.eval_every=0", "train.eval_batches=1", "train.tensorboard=false",
            "train.progress=none", "optim.warmup_steps=0"]


@pytest.fixture()
def source_model() -> SpanNormLM:
    torch.manual_seed(0)
    model = SpanNormLM(SOURCE)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


class FirstWeights:
    """Records the weights the trainer starts from and the logits they give."""

    def on_train_start(self, trainer):
        self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        self.cfg = trainer.model.cfg


def test_init_from_spannorm_dir_converts_pre_to_span(source_model, tmp_path):
    save_model(source_model, tmp_path / "pre")
    cfg = resolve_config(None, None, [f"train.init_from={tmp_path / 'pre'}", "model.placement=span",
                                      "model.context_length=16", *_run_settings(tmp_path)], run_config_layer)
    assert (cfg.model.d_model, cfg.model.n_kv_heads, cfg.model.rope_theta, cfg.model.placement) == \
        (32, 2, 5000.0, "span")
    first = FirstWeights()
    summary = train(cfg, tmp_path / "run", callbacks=[first])
    assert summary.steps == 2 and not summary.diverged
    source = source_model.state_dict()
    assert torch.equal(first.state["blocks.1.attn.q_proj.weight"], source["blocks.1.attn.q_proj.weight"])
    assert torch.equal(first.state["blocks.0.ffn_in_norm.weight"], source["blocks.0.ffn_in_norm.weight"])
    assert torch.equal(first.state["blocks.0.block_out_norm.weight"], torch.ones(32))
    # the run folder itself is a valid source: its latest checkpoint
    cfg2 = resolve_config(None, None, [f"train.init_from={tmp_path / 'run'}", *_run_settings(tmp_path)],
                          run_config_layer)
    assert cfg2.model.placement == "span" and cfg2.model.context_length == 16


def test_resume_does_not_need_the_source_any_more(source_model, tmp_path):
    save_model(source_model, tmp_path / "pre")
    settings = [f"train.init_from={tmp_path / 'pre'}", "model.placement=peri", *_run_settings(tmp_path)]
    train(resolve_config(None, None, settings, run_config_layer), tmp_path / "run")
    (tmp_path / "pre" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    (tmp_path / "pre" / "model_config.json").unlink()
    (tmp_path / "pre" / "checksums.json").unlink()  # save_model writes it beside the weights
    (tmp_path / "pre").rmdir()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--train.steps=3"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["status"] == "completed"


def test_cli_init_from_hf_llama_starts_from_its_function(source_model, tmp_path, monkeypatch):
    """An HF directory (written by export) imported by the trainer: the first model computes the source's
    logits exactly (same placement, embedding multiplier folded to 1)."""
    export_hf(source_model, tmp_path / "hf")
    first = FirstWeights()
    import spannorm.train.trainer as trainer_module

    original = trainer_module.Trainer.__init__

    def with_callback(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "callbacks": [first]})

    monkeypatch.setattr(trainer_module.Trainer, "__init__", with_callback)
    args = ["train", "--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "hf")]
    assert main(args + [f"--{s}" for s in _run_settings(tmp_path)]) == 0
    assert first.cfg.embedding_multiplier == 1.0 and first.cfg.placement == "pre"
    model = SpanNormLM(first.cfg)
    model.load_state_dict(first.state)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(idx).logits, source_model(idx).logits, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    # and the trained run exports back to HF: export-hf takes the run folder (its latest checkpoint)
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf-trained")]) == 0
    trained = load_model(tmp_path / "run" / "checkpoints" / "step_00000002")
    assert not torch.equal(trained.blocks[0].attn.q_proj.weight, model.blocks[0].attn.q_proj.weight)
    torch.testing.assert_close(import_hf(tmp_path / "hf-trained")(idx).logits, trained(idx).logits,
                               atol=1e-5, rtol=1e-5)


def test_init_from_errors_are_one_line_and_write_nothing(source_model, tmp_path, capsys):
    save_model(source_model, tmp_path / "pre")
    base = ["train", "--out", str(tmp_path / "run")] + [f"--{s}" for s in _run_settings(tmp_path)]
    assert main(base + ["--init-from", str(tmp_path / "missing")]) == 2
    assert main(base + ["--init-from", str(tmp_path / "pre"), "--model.d_model=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("spannorm: error: ") for line in err)
    assert "train.init_from=" in err[0] and "neither a spannorm model directory" in err[0]
    assert "model.d_model=64 is invalid: the checkpoint has d_model=32" in err[1]
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="tokens but the checkpoint embeds only 100"):
        small = SpanNormLM(ModelConfig(**{**SOURCE.to_dict(), "vocab_size": 100}))
        save_model(small, tmp_path / "small")
        cfg = resolve_config(None, None, [f"train.init_from={tmp_path / 'small'}", *_run_settings(tmp_path)],
                             run_config_layer)
        train(cfg, tmp_path / "run")
