"""The model starts at the loss of a uniform guess (issue 16 item 0): an untied head initialized at half the
fan-in std (or muP-small), the
stream's init unchanged, and checkpoints written before ``head_init`` existed loading with the head they had."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from spannorm.config import ModelConfig
from spannorm.model.checksums import write_manifest
from spannorm.model.io import CONFIG_NAME, WEIGHTS_NAME, load_model, save_model
from spannorm.model.placements import placement_names
from spannorm.model.transformer import DecoderLM
from spannorm.train.config import RunConfig, load_preset, preset_names, resolve_config
from spannorm.train.trainer import _first_difference, _normalize_model_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEEDS = (0, 1, 2)


def initial_loss(cfg: ModelConfig, seed: int, batch: int = 8, seq_len: int = 64) -> float:
    """Cross-entropy at init on uniformly random tokens (forward only); 512 tokens by default, so that the
    batch's own scatter (about 0.5/sqrt(tokens) nats under the default head) stays small beside 0.2."""
    torch.manual_seed(seed)
    model = DecoderLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens[:, :-1], tokens[:, 1:]).loss.item()


@pytest.mark.parametrize("placement", placement_names())
def test_every_placement_starts_at_the_loss_of_a_uniform_guess(placement):
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=6, n_heads=4, context_length=64, placement=placement)
    for seed in SEEDS:
        loss = initial_loss(cfg, seed)
        assert abs(loss - math.log(256)) < 0.2, (placement, seed, loss)
    # the tied head of before starts far above it (the model predicts its own input token)
    tied = initial_loss(dataclasses.replace(cfg, tie_embeddings=True), 0)
    assert tied > math.log(256) + 0.3, (placement, tied)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_starts_at_the_loss_of_a_uniform_guess(preset):
    """Each preset's own head settings (only depth and context shrunk; the width and the vocabulary, which set
    the head's scale, are the preset's: GPT-2's 768 wide with 50257 tokens)."""
    data = load_preset(preset)
    vocab = data.get("data", {}).get("bpe_vocab_size", 256)
    cfg = resolve_config(preset, None, ["model.n_layers=1", "model.context_length=64",
                                        f"model.vocab_size={vocab}"]).model
    preset_model = data.get("model", {})
    assert {"tie_embeddings", "head_init"}.isdisjoint(preset_model), "a preset keeps the default head"
    assert (cfg.tie_embeddings, cfg.head_init) == (False, "half")
    for seed in SEEDS[:2]:
        loss = initial_loss(cfg, seed, batch=4, seq_len=64)
        assert abs(loss - math.log(vocab)) < 0.2, (preset, seed, loss)


@pytest.mark.parametrize("head_init,factor,logit_std", [("half", 0.5, 0.5), ("small", 1 / 8, 1 / 8),
                                                        ("fan_in", 1.0, 1.0)])
def test_each_head_init_has_the_promised_std_and_logit_scale(head_init, factor, logit_std):
    d = 64  # sqrt(d) = 8
    for init, init_std in (("fan_in", 1.0), ("fixed", 0.02)):
        torch.manual_seed(0)
        model = DecoderLM(ModelConfig(vocab_size=512, d_model=d, n_layers=2, n_heads=4, init=init,
                                      init_std=init_std, head_init=head_init))
        want = factor * (init_std / math.sqrt(d) if init == "fan_in" else init_std)
        assert model.head_std() == pytest.approx(want)
        assert model.lm_head.weight.std().item() == pytest.approx(want, rel=0.05)
    # under fan_in init the final norm's output has RMS 1, so the logits' std is the head std times sqrt(d)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=512, d_model=d, n_layers=2, n_heads=4, head_init=head_init))
    with torch.no_grad():
        logits = model(torch.randint(0, 512, (2, 32))).logits
    assert logits.std().item() == pytest.approx(logit_std, rel=0.15)


@pytest.mark.parametrize("placement", placement_names())
def test_the_stream_draws_what_the_tied_model_draws(placement):
    """The untied head is built without random draws and initialized last, so for one seed the embedding and
    every block weight are bit-identical to the tied model's (whose init is the one of before this change),
    and so is the stream at every hook point."""
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, context_length=16, placement=placement)
    torch.manual_seed(7)
    untied = DecoderLM(cfg)
    torch.manual_seed(7)
    tied = DecoderLM(dataclasses.replace(cfg, tie_embeddings=True))
    tied_state = tied.state_dict()
    untied_state = untied.state_dict()
    assert set(untied_state) - set(tied_state) == {"lm_head.weight"}
    for name, tensor in tied_state.items():
        assert torch.equal(tensor, untied_state[name]), name
    seen: dict[str, list[torch.Tensor]] = {"tied": [], "untied": []}
    for key, model in (("tied", tied), ("untied", untied)):
        model.hook_embed.register_forward_hook(lambda m, i, o, key=key: seen[key].append(o.detach().clone()))
        for block in model.blocks:
            block.register_forward_hook(lambda m, i, o, key=key: seen[key].extend(  # residual: the pair (x, d)
                t.detach().clone() for t in (o if isinstance(o, tuple) else (o,))))
        with torch.no_grad():
            model(torch.arange(16).view(1, 16))
    assert len(seen["tied"]) == 1 + cfg.n_layers * (2 if placement == "residual" else 1)
    for a, b in zip(seen["tied"], seen["untied"]):
        assert torch.equal(a, b)


def _write_old_model_folder(path, model: DecoderLM, drop: tuple[str, ...]) -> None:
    """A model folder as a version before ``head_init`` wrote it, without the keys in ``drop``."""
    save_model(model, path)
    data = json.loads((path / CONFIG_NAME).read_text())
    for key in drop:
        data.pop(key)
    (path / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True))
    write_manifest(path, (WEIGHTS_NAME, CONFIG_NAME))


@pytest.mark.parametrize("drop", [("head_init",), ("head_init", "tie_embeddings")])
def test_a_tied_checkpoint_from_before_head_init_loads_tied(tmp_path, drop):
    """Old folders always wrote tie_embeddings; one that omits it (a default at the time) still means tied."""
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, context_length=16, tie_embeddings=True)
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    _write_old_model_folder(tmp_path, model, drop)
    loaded = load_model(tmp_path)
    assert loaded.cfg.tie_embeddings and loaded.lm_head is None
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, model(idx).logits)


def test_an_untied_checkpoint_from_before_head_init_loads_untied_with_its_fan_in_head(tmp_path):
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, context_length=16, head_init="fan_in")
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    _write_old_model_folder(tmp_path, model, ("head_init",))
    loaded = load_model(tmp_path)
    assert (loaded.cfg.tie_embeddings, loaded.cfg.head_init) == (False, "fan_in")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_saved_run_configs_keep_the_head_they_were_trained_with():
    old = RunConfig().to_dict()
    for key in ("head_init", "tie_embeddings"):
        old["model"].pop(key)
    assert RunConfig.from_saved(old).model.tie_embeddings is True
    assert RunConfig.from_dict(old).model.tie_embeddings is False  # a config section: today's defaults
    new = RunConfig().to_dict()
    assert RunConfig.from_saved(new).model == RunConfig().model  # written now: read as written
    assert _normalize_model_dict(old["model"])["tie_embeddings"] is True
    # a resume of the old run with today's defaults is refused, naming the field; with it set, it matches
    diff = _first_difference(_normalize_model_dict(old["model"]), RunConfig().model.to_dict(), "model")
    assert diff == ("model.tie_embeddings", True, False)
    tied = dataclasses.replace(RunConfig().model, tie_embeddings=True)
    assert _first_difference(_normalize_model_dict(old["model"]), tied.to_dict(), "model") is None
