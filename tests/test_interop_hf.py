"""Hugging Face interop against transformers itself: a tiny random Llama (GQA, RoPE θ ≠ 10000, untied head),
Qwen2 (q/k/v biases, tied) and Mistral (sliding window) saved locally; imported, their logits equal HF's to 1e-4
in fp32; exported, HF loads them and its logits equal ours. Plus sharding, tokenizers and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spannorm import ModelConfig, SpanNormLM  # noqa: E402
from spannorm.cli.main import main  # noqa: E402
from spannorm.interop import (  # noqa: E402
    InteropError,
    export_hf,
    export_model,
    import_hf,
    llama_incompatibilities,
    load_tokenizer,
    max_logit_difference,
)
from spannorm.model.io import save_model  # noqa: E402

TOL = 1e-4
VOCAB, T = 97, 24
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights at a scale where logits are O(1), norm gains away from 1 and non-zero biases, so that any
    mis-mapped tensor shows far above the tolerance."""
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
                p.copy_(noise / math.sqrt(p.shape[1]))


def _save_hf(model, directory: Path, **kw) -> Path:
    model.save_pretrained(str(directory), **kw)
    return directory


def _tokens(n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _max_diff(ours: SpanNormLM, hf_model, idx: torch.Tensor) -> float:
    return (ours(idx).logits - hf_model(input_ids=idx, use_cache=False).logits).abs().max().item()


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random Llama with GQA (4 heads, 2 kv), θ = 5000, an untied head, saved unsharded."""
    cfg = transformers.LlamaConfig(**SMALL, rope_theta=5000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(model)
    return model, _save_hf(model, tmp_path_factory.mktemp("llama"))


def test_llama_import_matches_hf_logits(hf_llama):
    hf_model, directory = hf_llama
    ours = import_hf(directory)
    cfg = ours.cfg
    assert (cfg.placement, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings, cfg.embedding_multiplier) == \
        ("pre", 2, 5000.0, False, 1.0)
    idx = _tokens()
    assert hf_model(input_ids=idx).logits.abs().max() > 1.0  # a parity test on near-zero logits would prove little
    assert _max_diff(ours, hf_model, idx) < TOL
    # The comparison is sensitive: the same weights with the default θ = 10000 miss by far more than TOL.
    wrong_theta = SpanNormLM(ModelConfig(**{**cfg.to_dict(), "rope_theta": 10000.0}))
    wrong_theta.load_state_dict(ours.state_dict())
    assert _max_diff(wrong_theta, hf_model, idx) > 100 * TOL


def test_llama_export_loads_in_hf_with_equal_logits(hf_llama, tmp_path):
    hf_model, directory = hf_llama
    ours = import_hf(directory)
    export_hf(ours, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    idx = _tokens()
    assert _max_diff(ours, reloaded, idx) < TOL
    assert _max_diff(ours, hf_model, idx) < TOL
    # Round trip: importing the export gives back exactly the same tensors.
    again = import_hf(tmp_path / "out")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_sharded_checkpoints_in_and_out(hf_llama, tmp_path):
    hf_model, _ = hf_llama
    sharded = _save_hf(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    ours = import_hf(sharded)
    idx = _tokens()
    assert _max_diff(ours, hf_model, idx) < TOL
    files = export_hf(ours, tmp_path / "out", max_shard_bytes=10_000)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert _max_diff(ours, reloaded, idx) < TOL


@pytest.mark.parametrize("model_kw", [
    # pre under fan-in init: embedding multiplier sqrt(d) with a tied head, Δt = 0.7
    dict(placement="pre", delta_t=0.7, tie_embeddings=True),
    # pre with the default untied small head
    dict(placement="pre", delta_t=0.7),
    # lns: 1/sqrt(l+1) on the norm outputs; untied head, biases everywhere
    dict(placement="lns", tie_embeddings=False, bias=True, embed_scale=3.0),
])
def test_export_folds_constants_llama_has_no_field_for(model_kw, tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, context_length=32,
                      rope_theta=20000.0, **model_kw)
    assert cfg.embedding_multiplier != 1.0
    ours = SpanNormLM(cfg).eval()
    _randomize(ours, seed=2)
    export_hf(ours, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    idx = _tokens()
    assert ours(idx).logits.abs().max() > 1.0
    assert _max_diff(ours, reloaded, idx) < TOL


def test_bf16_export_is_written_in_bf16(hf_llama, tmp_path):
    _, directory = hf_llama
    ours = import_hf(directory)
    export_hf(ours, tmp_path / "out", dtype="bfloat16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = import_hf(tmp_path / "out")
    w = reloaded.blocks[0].attn.q_proj.weight
    assert torch.equal(w, ours.blocks[0].attn.q_proj.weight.to(torch.bfloat16).float())


def test_qwen2_biases_import_and_export(tmp_path):
    """Qwen2 has q/k/v biases and none on o_proj or the MLP: imported as bias=True with those biases zero."""
    cfg = transformers.Qwen2Config(**SMALL, rope_theta=1_000_000.0, tie_word_embeddings=True)
    hf_model = transformers.Qwen2ForCausalLM(cfg).eval()
    _randomize(hf_model, seed=3)
    ours = import_hf(_save_hf(hf_model, tmp_path / "qwen2"))
    assert ours.cfg.bias and ours.cfg.tie_embeddings and ours.lm_head is None
    assert ours.blocks[0].attn.q_proj.bias.abs().sum() > 0
    assert torch.count_nonzero(ours.blocks[0].attn.o_proj.bias) == 0
    assert torch.count_nonzero(ours.blocks[1].ffn.down_proj.bias) == 0
    idx = _tokens()
    assert _max_diff(ours, hf_model, idx) < TOL
    export_hf(ours, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert _max_diff(ours, reloaded, idx) < TOL


def test_mistral_sliding_window_caps_the_context(tmp_path):
    cfg = transformers.MistralConfig(**SMALL, sliding_window=16, rope_theta=2000.0)
    hf_model = transformers.MistralForCausalLM(cfg).eval()
    _randomize(hf_model, seed=4)
    directory = _save_hf(hf_model, tmp_path / "mistral")
    ours = import_hf(directory)
    assert ours.cfg.context_length == 16  # full attention equals 16-token sliding attention up to 16 tokens
    assert _max_diff(ours, hf_model, _tokens(16)) < TOL
    with pytest.raises(InteropError, match="sliding-window"):
        import_hf(directory, context_length=32)


def test_max_logit_difference_helper_and_cli_check(hf_llama, tmp_path, capsys):
    hf_model, directory = hf_llama
    assert max_logit_difference(import_hf(directory), directory) < TOL
    assert main(["import-hf", str(directory), "--out", str(tmp_path / "sn"), "--check"]) == 0
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "hf"), "--check"]) == 0
    out = capsys.readouterr().out
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("max |logit")]
    assert len(diffs) == 2 and max(diffs) < TOL


def test_tokenizer_travels_with_the_weights(hf_llama, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, directory = hf_llama
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for f in directory.iterdir():
        (hf_dir / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 5, "world": 7}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))
    json.dump({"architectures": ["LlamaForCausalLM"], **json.loads((hf_dir / "config.json").read_text()),
               "bos_token_id": 5, "eos_token_id": 7}, (hf_dir / "config.json").open("w"))
    assert load_tokenizer(hf_dir).encode("hello world").ids == [5, 7]
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "sn")]) == 0
    assert load_tokenizer(tmp_path / "sn").encode("world hello").ids == [7, 5]
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "out")]) == 0
    assert load_tokenizer(tmp_path / "out").encode("hello").ids == [5]
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (5, 7)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(directory)


# ---------------------------------------------------------------------------------------------- errors
def _auto_model_class(directory: Path) -> str:
    """The modeling class a remote-code export names in its config.json (``auto_map``)."""
    return json.loads((directory / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spannorm: error: ")
    return err[0]


def test_unsupported_architecture_is_a_clear_error(tmp_path, capsys):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50,
                                                                    bos_token_id=0, eos_token_id=0))
    directory = _save_hf(gpt2, tmp_path / "gpt2")
    capsys.readouterr()
    with pytest.raises(InteropError, match="GPT2LMHeadModel.*allowed: LlamaForCausalLM"):
        import_hf(directory)
    assert main(["import-hf", str(directory), "--out", str(tmp_path / "out")]) == 2
    assert "GPT2LMHeadModel" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_files_are_clear_errors(hf_llama, tmp_path, capsys):
    hf_model, _ = hf_llama
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path)
    directory = _save_hf(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    next(directory.glob("model-00002-*.safetensors")).unlink()
    capsys.readouterr()
    with pytest.raises(FileNotFoundError, match="model-00002-of-.*listed in model.safetensors.index.json"):
        import_hf(directory)
    assert main(["import-hf", str(directory), "--out", str(tmp_path / "out")]) == 2
    assert "model-00002" in _error_line(capsys)
    assert not (tmp_path / "out").exists()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has no weights"):
        import_hf(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(InteropError, match="pickle; only safetensors"):
        import_hf(no_weights)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 8.0}}, "'dynamic' is not supported"),
    ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 2.0}}, "'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "lacks 'low_freq_factor'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0, "low_freq_factor": 1.0}},
     "key 'low_freq_factor' is not supported for rope_type 'linear'"),
    ({"head_dim": 16}, "head_dim=16 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_config_features_we_cannot_compute_are_refused(hf_llama, tmp_path, change, message):
    _, directory = hf_llama
    target = tmp_path / "edited"
    target.mkdir()
    (target / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = {**json.loads((directory / "config.json").read_text()), **change}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(InteropError, match=message):
        import_hf(target)


def test_non_llama_placements_export_with_their_own_modeling_code_and_the_reason(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, context_length=16, placement="span_post")
    model = SpanNormLM(cfg)
    assert any("block-output norm" in r for r in llama_incompatibilities(cfg))
    with pytest.raises(InteropError, match="cannot load this model as LlamaForCausalLM: span_post normalizes"):
        export_hf(model, tmp_path / "strict")
    assert not (tmp_path / "strict").exists()
    result = export_model(model, tmp_path / "loose")
    assert not result.hf_llama and "block-output norm" in result.message()
    assert _auto_model_class(tmp_path / "loose") == "modeling_spannorm.SpanNormForCausalLM"
    idx = _tokens(16)
    assert torch.equal(import_hf(tmp_path / "loose")(idx).logits, model(idx).logits)
    save_model(model, tmp_path / "sn")
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "cli"), "--require-llama"]) == 2
    assert "span_post normalizes the block output" in _error_line(capsys)
    assert not (tmp_path / "cli").exists()
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "cli")]) == 0
    assert "cannot load it as LlamaForCausalLM" in capsys.readouterr().err
    assert (tmp_path / "cli" / "modeling_spannorm.py").is_file()
    assert _auto_model_class(tmp_path / "cli") == "modeling_spannorm.SpanNormForCausalLM"


@pytest.mark.parametrize("model_kw, reason", [
    (dict(placement="post"), "post normalizes after each residual add, x' = N(x + F(x)); a Llama layer only "
                             "normalizes the inputs of its branches (every layer)"),
    (dict(placement="peri"), "peri also normalizes each branch output, N(A(N(x))); a Llama layer has no output "
                             "norms (every layer)"),
    (dict(placement="span_b2t"), "span_b2t normalizes after the attention add and at the block output"),
    (dict(placement="span"), "span normalizes the sum of both branch outputs, x + β·N(a + f); a Llama "
                                   "layer adds each branch to the stream unnormalized"),
    (dict(placement="deepnorm"), "deepnorm multiplies the skip by α and normalizes after each add"),
    (dict(placement="hybrid"), "hybrid normalizes Q, K and V per head"),
    # mixln at L = 3, ratio 0.5: block 0 is post; only that layer is named
    (dict(placement="mixln", mixln_ratio=0.5), "post normalizes after each residual add, x' = N(x + F(x)); a "
                                               "Llama layer only normalizes the inputs of its branches (layers [0])"),
    (dict(placement="pre", placement_overrides={1: "span_post"}),
     "span_post normalizes the block output, N(α·x + β·(a + f)); a Llama layer has no block-output norm (layers [1])"),
    (dict(norm="layer"), "norm=layer: Llama uses RMSNorm, which neither subtracts the mean nor has a bias"),
    (dict(moe={"n_experts": 4, "top_k": 2}), "moe: Llama's MLP is one dense SwiGLU, not a mixture of experts"),
    (dict(embed_norm=True), "embed_norm: Llama does not normalize the embedding output"),
    (dict(final_norm=False), "final_norm=false: Llama always applies a final RMSNorm"),
], ids=["post", "peri", "span_b2t", "span", "deepnorm", "hybrid", "mixln", "override", "layernorm", "moe",
        "embed_norm", "no_final_norm"])
def test_each_non_llama_feature_is_refused_with_its_reason(model_kw, reason, tmp_path, capsys):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, context_length=16, **model_kw)
    model = SpanNormLM(cfg)
    reasons = llama_incompatibilities(cfg)
    assert len(reasons) == 1 and reason in reasons[0], reasons  # one feature off Llama: exactly its reason
    with pytest.raises(InteropError) as err:
        export_hf(model, tmp_path / "strict")
    assert str(err.value).startswith("HF cannot load this model as LlamaForCausalLM: ") and reason in str(err.value)
    assert not (tmp_path / "strict").exists()
    result = export_model(model, tmp_path / "loose")
    assert not result.hf_llama and result.reasons == reasons and reason in result.message()
    assert _auto_model_class(tmp_path / "loose") == "modeling_spannorm.SpanNormForCausalLM"
    idx = _tokens(16)
    assert torch.equal(import_hf(tmp_path / "loose")(idx).logits, model(idx).logits)
    save_model(model, tmp_path / "sn")
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "cli"), "--require-llama"]) == 2
    assert reason in _error_line(capsys)
    assert not (tmp_path / "cli").exists()
    assert main(["export-hf", str(tmp_path / "sn"), "--out", str(tmp_path / "cli")]) == 0
    note = capsys.readouterr().err
    assert "cannot load it as LlamaForCausalLM" in note and reason in note


@pytest.mark.parametrize("model_kw", [dict(placement="pre"), dict(placement="lns"),
                                      dict(placement="mixln", mixln_ratio=0.25)])  # floor(0.75) = 0 post blocks
def test_llama_computable_configs_have_no_reasons(model_kw):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, context_length=16, **model_kw)
    assert set(cfg.layer_placements()) <= {"pre", "lns"}
    assert llama_incompatibilities(cfg) == []


def test_several_non_llama_features_are_all_named():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, context_length=16, placement="peri",
                      norm="layer", moe={"n_experts": 2, "top_k": 1}, embed_norm=True)
    reasons = llama_incompatibilities(cfg)
    assert [r.split(" ", 1)[0] for r in reasons] == ["peri", "norm=layer:", "moe:", "embed_norm:"]


def test_cli_refuses_to_overwrite(hf_llama, tmp_path, capsys):
    _, directory = hf_llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("results")
    assert main(["import-hf", str(directory), "--out", str(out)]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
