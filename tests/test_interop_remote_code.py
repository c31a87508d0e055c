"""Every placement, dense and MoE, exported as a Hugging Face folder with its own modeling code: loaded through
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, its fp32 logits equal ours to 1e-4; greedy
``generate()`` gives the same tokens with and without the cache; importing the folder gives our model back
exactly; the byte tokenizer travels as a ``tokenizer.json`` that encodes and decodes as ours does."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

transformers = pytest.importorskip("transformers")

from spannorm import ModelConfig, SpanNormLM  # noqa: E402
from spannorm.cli.main import main  # noqa: E402
from spannorm.config import PLACEMENTS  # noqa: E402
from spannorm.data.tokenizer import ByteTokenizer  # noqa: E402
from spannorm.interop import (  # noqa: E402
    InteropError,
    checkpoint_model_config,
    export_hf,
    import_hf,
    load_checkpoint,
    load_tokenizer,
)
from spannorm.interop.hf_export import MODELING_FILES, export_hf_remote_code  # noqa: E402
from spannorm.model.io import load_model, save_model  # noqa: E402

TOL = 1e-4
VOCAB = 97
transformers.utils.logging.set_verbosity_error()


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights at a scale where logits are O(1) or more, norm gains away from 1 and non-zero biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.3 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-2] if p.dim() == 3 else p.shape[1]))


def _tiny(seed: int = 0, **kw) -> SpanNormLM:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, context_length=40)
    model = SpanNormLM(ModelConfig(**{**base, **kw})).eval()
    _randomize(model, seed)
    return model


def _load(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True).eval()


def _tokens(batch: int = 2, n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


MOE = {"n_experts": 4, "top_k": 2}


@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@torch.no_grad()
def test_every_placement_loads_in_transformers_with_our_logits_and_cached_generation(placement, moe, tmp_path):
    ours = _tiny(placement=placement, moe=moe, mixln_ratio=0.5)
    files = export_hf_remote_code(ours, tmp_path / "hf")
    assert set(MODELING_FILES) <= set(files)
    modeling = (tmp_path / "hf" / "modeling_spannorm.py").read_text()
    assert "spannorm." not in modeling.replace("modeling_spannorm", "").replace("configuration_spannorm", "")
    theirs = _load(tmp_path / "hf")
    assert type(theirs).__name__ == "SpanNormForCausalLM"
    idx = _tokens()
    logits = ours(idx).logits
    assert logits.abs().max() > 1.0  # parity on near-zero logits would prove little
    assert (theirs(input_ids=idx, use_cache=False).logits - logits).abs().max().item() < TOL
    prompt = idx[:, :7]
    cached = theirs.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = theirs.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (2, 19) and torch.equal(cached, uncached)
    # and our own model picks the same greedy tokens
    assert torch.equal(ours(cached[:, :-1]).logits[:, 6:].argmax(-1), cached[:, 7:])
    # re-import gives the same model back: config and every tensor
    again = import_hf(tmp_path / "hf")
    assert again.cfg == ours.cfg
    state = again.state_dict()
    assert state.keys() == ours.state_dict().keys()
    assert all(torch.equal(t, state[k]) for k, t in ours.state_dict().items())


@pytest.mark.parametrize("model_kw", [
    dict(placement="pre", placement_overrides={0: "span_post", 2: "hybrid"}, delta_t=0.6, tie_embeddings=True),
    dict(placement="post", delta_t=0.5, norm="layer", bias=True, tie_embeddings=False),
    dict(placement="peri", embed_norm=True, embed_scale=2.5, final_norm=True),
    dict(placement="span_post", span_post_scaling="skip", span_post_beta=0.7, final_norm=True),
    dict(placement="span_post", span_post_scaling="both", span_post_alpha=1.7, tie_embeddings=False),
    dict(placement="span_b2t", span_post_scaling="both", tie_embeddings=True),
    dict(placement="span", delta_t=0.8, norm="layer", bias=True),
    dict(placement="span", span_scaling="learnable", moe={"n_experts": 4, "top_k": 2},
         placement_overrides={0: "pre"}),
    dict(placement="deepnorm", final_norm=True, norm="layer"),
    dict(placement="lns", final_norm=False, init="fixed", init_std=0.02),
    dict(placement="hybrid", n_kv_heads=1, bias=True),
    dict(placement="peri", moe={"n_experts": 3, "top_k": 1, "shared_expert": True, "d_expert": 24}),
    dict(placement="span_post", moe={"n_experts": 4, "top_k": 3, "shared_expert": True}, bias=True),
    dict(placement="span_post", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}),
    dict(placement="post", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    dict(placement="deepnorm", rope_scaling={"rope_type": "linear", "factor": 2.0}),
], ids=["overrides-dt", "post-layernorm-bias-untied", "peri-embed-norm", "span-skip-beta", "span-both-alpha",
        "span_b2t-both", "span-fixed-layernorm", "span-learnable-moe", "deepnorm-final", "lns-no-final",
        "hybrid-mqa-bias", "moe-shared-top1", "moe-shared-top3-bias", "rope-llama3", "rope-yarn", "rope-linear"])
@torch.no_grad()
def test_every_model_option_is_carried_into_the_export(model_kw, tmp_path):
    ours = _tiny(seed=3, **model_kw)
    export_hf_remote_code(ours, tmp_path / "hf")
    theirs = _load(tmp_path / "hf")
    idx = _tokens(seed=4)
    logits = ours(idx).logits
    assert logits.abs().max() > 1.0
    assert (theirs(input_ids=idx, use_cache=False).logits - logits).abs().max().item() < TOL
    prompt = idx[:1, :5]
    assert torch.equal(theirs.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True),
                       theirs.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False))
    again = import_hf(tmp_path / "hf")
    assert again.cfg == ours.cfg and all(torch.equal(t, again.state_dict()[k]) for k, t in ours.state_dict().items())


@torch.no_grad()
def test_the_parity_test_would_catch_a_wrong_constant(tmp_path):
    """The comparison is sensitive: the export with SpanNorm's α changed by 5% misses by far more than TOL."""
    ours = _tiny(placement="span_post", span_post_scaling="skip")
    export_hf_remote_code(ours, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["span_post_alpha"] == pytest.approx(math.sqrt(6))
    config["span_post_alpha"] *= 1.05
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    idx = _tokens()
    assert (_load(tmp_path / "hf")(input_ids=idx).logits - ours(idx).logits).abs().max() > 100 * TOL


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path):
    ours = _tiny(placement="span_post", moe=MOE)
    export_hf_remote_code(ours, tmp_path / "hf")
    theirs = _load(tmp_path / "hf")
    long, short = _tokens(1, 9, seed=5), _tokens(1, 5, seed=6)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = theirs.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate((long, short)):
        alone = theirs.generate(prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(out[row, 9:], alone[0, prompt.shape[1]:])


@torch.no_grad()
def test_bf16_export_is_bf16_and_runs(tmp_path):
    ours = _tiny(placement="hybrid")  # dense: in bf16 a router may pick other experts, which is no bug
    export_hf_remote_code(ours, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    theirs = _load(tmp_path / "hf").to(torch.bfloat16)  # transformers 4 loads in fp32 by default, 5 as saved
    assert theirs.embed.weight.dtype == torch.bfloat16
    idx = _tokens()
    logits = theirs(input_ids=idx).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    reference = ours(idx).logits
    assert (logits.float() - reference).abs().mean() < 0.02 * reference.abs().mean()  # bf16 rounding
    again = import_hf(tmp_path / "hf")
    assert torch.equal(again.blocks[0].attn.q_proj.weight, ours.blocks[0].attn.q_proj.weight.bfloat16().float())


def test_byte_tokenizer_is_exported_and_reproduces_ours(tmp_path):
    ours = _tiny(vocab_size=256, placement="span_post")
    save_model(ours, tmp_path / "sn")  # a byte model's folder has no tokenizer.json
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "hf")]) == 0
    byte = ByteTokenizer()
    texts = ["Hello, wörld!\n\tdef f(x):  return x", "日本語 ü ß", "a\x00b", "Ā", "  two  spaces ", ""]
    fast = load_tokenizer(tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, len(auto)) == (0, 0, 0, 256)
    for text in texts:
        ids = byte.encode(text).tolist()
        assert fast.encode(text).ids == ids
        assert auto(text)["input_ids"] == ids
        assert auto.decode(ids) == byte.decode(ids) == text
    broken = [0xFF, 0xFE, 65, 0xE6, 0x97]  # invalid UTF-8: both replace it the same way
    assert auto.decode(broken) == byte.decode(broken)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    # a pre byte model exported as Llama gets the same tokenizer
    pre = _tiny(vocab_size=256, placement="pre")
    save_model(pre, tmp_path / "pre")
    assert main(["export-hf", str(tmp_path / "pre"), "--out", str(tmp_path / "llama")]) == 0
    assert load_tokenizer(tmp_path / "llama").encode(texts[0]).ids == byte.encode(texts[0]).tolist()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.config.eos_token_id == 0


@torch.no_grad()
def test_generate_with_the_exported_tokenizer_decodes_text(tmp_path):
    ours = _tiny(vocab_size=256, placement="peri")
    save_model(ours, tmp_path / "sn")
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "hf")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    theirs = _load(tmp_path / "hf")
    inputs = tok(["To be, or not"], return_tensors="pt")
    out = theirs.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = ours(out[:, :-1]).logits[0, -6:].argmax(-1)
    assert torch.equal(out[0, -6:], expected)
    assert tok.decode(out[0]).startswith("To be, or not")


def test_cli_export_and_import_check_remote_code_parity(tmp_path, capsys):
    ours = _tiny(placement="deepnorm", moe=MOE)
    save_model(ours, tmp_path / "sn")
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "hf"), "--check"]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--check"]) == 0
    captured = capsys.readouterr()
    assert "trust_remote_code=True" in captured.err and "deepnorm multiplies the skip" in captured.err
    diffs = [float(line.rsplit(" ", 1)[1]) for line in captured.out.splitlines() if line.startswith("max |logit")]
    assert len(diffs) == 2 and max(diffs) < TOL
    assert "placement deepnorm" in captured.out


def test_init_from_reads_a_remote_code_export(tmp_path):
    ours = _tiny(placement="span_b2t", moe=MOE)
    export_hf_remote_code(ours, tmp_path / "hf")
    assert checkpoint_model_config(tmp_path / "hf") == ours.cfg
    started = load_checkpoint(tmp_path / "hf")
    assert all(torch.equal(t, started.state_dict()[k]) for k, t in ours.state_dict().items())


def test_pre_and_lns_keep_the_llama_export_and_round_trip(tmp_path):
    for placement in ("pre", "lns"):
        ours = _tiny(placement=placement, init="fixed", init_std=0.02, embed_scale=1.0)
        export_hf(ours, tmp_path / placement)
        config = json.loads((tmp_path / placement / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    pre = _tiny(placement="pre", embed_scale=1.0, init="fixed")
    again = import_hf(tmp_path / "pre")
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in pre.state_dict().items())


# ---------------------------------------------------------------------------------------------- bad input
def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spannorm: error: ")
    return err[0]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("spannorm_config"), "without a 'spannorm_config' object"),
    (lambda c: c.update(layer_placements=["pre"] * 3), "layer_placements=.* disagrees with spannorm_config"),
    (lambda c: c["spannorm_config"].update(placement="sideways"), "spannorm_config is invalid: model.placement"),
], ids=["no-spannorm-config", "edited", "invalid"])
def test_a_folder_that_is_not_our_export_is_one_line_and_writes_nothing(edit, message, tmp_path, capsys):
    export_hf_remote_code(_tiny(placement="span_post"), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    edit(config)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InteropError, match=message):
        import_hf(tmp_path / "hf")
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_export_of_a_folder_that_is_not_ours_or_a_tokenizer_too_big_is_one_line(tmp_path, capsys):
    export_hf_remote_code(_tiny(placement="span_post"), tmp_path / "hf")  # an HF folder, not a spannorm model folder
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "not a spannorm model directory" in _error_line(capsys)
    save_model(_tiny(placement="peri"), tmp_path / "sn")  # vocabulary 97
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(120)}, unk_token="w0")).save(
        str(tmp_path / "sn" / "tokenizer.json"))
    with pytest.raises(InteropError, match="has 120 tokens but the model embeds only 97"):
        export_hf_remote_code(load_model(tmp_path / "sn"), tmp_path / "out", source_dir=tmp_path / "sn")
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "out")]) == 2
    assert "has 120 tokens but the model embeds only 97" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_require_llama_still_refuses_and_writes_nothing(tmp_path, capsys):
    save_model(_tiny(placement="hybrid"), tmp_path / "sn")
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "hf"), "--require-llama"]) == 2
    assert "hybrid normalizes Q, K and V per head" in _error_line(capsys)
    assert not (tmp_path / "hf").exists()


def test_check_without_transformers_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    save_model(_tiny(placement="span_post"), tmp_path / "sn")
    export_hf_remote_code(_tiny(placement="span_post"), tmp_path / "hf")
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra 'hf' were not installed
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "out"), "--check"]) == 2
    assert "pip install 'spannorm[hf]'" in _error_line(capsys)
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--check"]) == 2
    assert "pip install 'spannorm[hf]'" in _error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "back").exists()


@pytest.mark.parametrize("placement, v1_name", [("span_post", "span"), ("span", "span_clean")])
@torch.no_grad()
def test_an_export_written_before_placement_names_2_loads_as_the_model_it_was(placement, v1_name, tmp_path):
    """An export from before the rename has no ``placement_names`` in config.json and version 1's names: its
    ``span`` blocks are today's span_post, its ``span_clean`` blocks today's span, and its ``span_alpha``,
    ``span_beta`` and ``span_clean_beta`` are span_post's α and β and span's β. Both the modeling code and
    re-import read it as such."""
    ours = _tiny(placement=placement, span_post_scaling="skip", span_post_beta=0.7, span_scaling="fixed")
    export_hf_remote_code(ours, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    assert config.pop("placement_names") == 2
    config["layer_placements"] = [v1_name] * len(config["layer_placements"])
    clean_beta = config.pop("span_beta")
    config["span_alpha"], config["span_beta"] = config.pop("span_post_alpha"), config.pop("span_post_beta")
    config["span_clean_beta"] = clean_beta
    saved = config["spannorm_config"]
    saved.pop("placement_names")
    saved["placement"] = v1_name
    saved["span_scaling"], saved["span_alpha"], saved["span_beta"] = (
        saved.pop("span_post_scaling"), saved.pop("span_post_alpha"), saved.pop("span_post_beta"))
    path.write_text(json.dumps(config))
    idx = _tokens()
    theirs = _load(tmp_path / "hf")
    assert theirs.config.layer_placements == [placement] * 3 and theirs.config.placement_names == 2
    assert (theirs(input_ids=idx, use_cache=False).logits - ours(idx).logits).abs().max().item() < TOL
    assert import_hf(tmp_path / "hf").cfg == ours.cfg
