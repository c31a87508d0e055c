"""The KV cache and generation of :mod:`spannorm.inference`: cached logits and tokens equal uncached ones for
every placement, dense and MoE; padding, top-p, stop tokens and strings, n samples, one import path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import spannorm.inference
from spannorm.config import PLACEMENTS, ModelConfig, MoEConfig
from spannorm.inference import Sampling, generate, generate_batch, kv_cache
from spannorm.inference.generation import filter_logits
from spannorm.model import SpanNormLM
from spannorm.model.layers import CausalSelfAttention
from spannorm.train import checkpoint as ckpt_io

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny(placement: str, moe: bool, context: int = 24, **kw) -> SpanNormLM:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, context_length=context, placement=placement,
                      mixln_ratio=0.5, tie_embeddings=False,
                      moe=MoEConfig(n_experts=4, top_k=2) if moe else None, **kw)
    return SpanNormLM(cfg).eval()


CASES = [pytest.param(p, moe, id=f"{p}-{'moe' if moe else 'dense'}") for p in PLACEMENTS for moe in (False, True)]


@pytest.mark.parametrize("placement,moe", CASES)
def test_cached_logits_equal_a_full_forward_at_every_position(placement, moe):
    """Prefill 5 tokens, then decode 7 one by one: each position's logits equal the uncached forward's."""
    model = tiny(placement, moe)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        with kv_cache(model, batch_size=2) as cache:
            steps = [cache.feed(ids[:, :5]).logits] + [cache.feed(ids[:, t:t + 1]).logits for t in range(5, 12)]
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, CausalSelfAttention))


@pytest.mark.parametrize("placement,moe", CASES)
def test_cached_greedy_tokens_equal_uncached_ones(placement, moe):
    """Three prompts of different lengths (left-padded together in the cached batch, run one length at a
    time uncached), 30 new tokens each: past the context of 24, so the cache is rebuilt too."""
    model = tiny(placement, moe)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12], [4]]
    cached = generate_batch(model, prompts, 30, Sampling(temperature=0.0), use_cache=True)
    uncached = generate_batch(model, prompts, 30, Sampling(temperature=0.0), use_cache=False)
    tokens = [c.tokens for c in cached.completions]
    assert tokens == [c.tokens for c in uncached.completions]
    assert all(len(t) == 30 and len(set(t)) > 3 for t in tokens)  # not a degenerate repeat of one token
    # Each padded row also equals its prompt generated alone (batch of one, no padding).
    alone = [generate(model, p, 30, temperature=0.0) for p in prompts]
    assert alone == tokens


def test_sampled_tokens_do_not_depend_on_cache_or_batch():
    model = tiny("span", False)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.9)
    a = generate_batch(model, prompts, 20, sampling, n=3, seed=7)
    b = generate_batch(model, prompts, 20, sampling, n=3, seed=7, use_cache=False)
    c = generate_batch(model, prompts, 20, sampling, n=3, seed=7, batch_size=2)
    rows = [x.tokens for x in a.completions]
    assert rows == [x.tokens for x in b.completions] == [x.tokens for x in c.completions]
    assert [(x.prompt_index, x.sample_index) for x in a.completions] == [(p, s) for p in range(2) for s in range(3)]
    assert len({tuple(r) for r in rows[:3]}) == 3  # the n samples of one prompt differ
    assert a.new_tokens == 120 and a.tokens_per_second > 0


def test_top_p_draws_only_from_the_nucleus():
    model = tiny("pre", False)
    prompt = [65, 66, 67]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1] / 3.0
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    cumulative = probs[order].cumsum(0)
    nucleus = set(order[:int((cumulative < 0.5).sum()) + 1].tolist())  # smallest set reaching 0.5
    assert 1 < len(nucleus) < 256
    kept = filter_logits(logits[None] * 3.0, Sampling(temperature=3.0, top_p=0.5))[0].isfinite()
    assert set(kept.nonzero().flatten().tolist()) == nucleus
    drawn = {generate(model, prompt, 1, temperature=3.0, top_p=0.5, generator=torch.Generator().manual_seed(s))[0]
             for s in range(80)}
    assert drawn <= nucleus and len(drawn) > 1


def test_stop_tokens_and_stop_strings_end_a_row():
    model = tiny("pre", False)
    prompt = [1, 2, 3]
    free = generate_batch(model, [prompt], 20, Sampling(0.0)).completions[0].tokens
    stop_token = free[5]
    first = free.index(stop_token)
    by_token = generate_batch(model, [prompt], 20, Sampling(0.0), stop_tokens=[stop_token]).completions[0]
    assert by_token.tokens == free[:first + 1] and by_token.stop == "token"

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    stop_string = f"<{free[6]}><{free[7]}>"
    end = (decode(free).index(stop_string) + len(stop_string))
    by_string = generate_batch(model, [prompt], 20, Sampling(0.0), stop_strings=[stop_string], decode=decode)
    completion = by_string.completions[0]
    assert completion.stop == "string" and decode(completion.tokens) == decode(free)[:end]
    assert generate_batch(model, [prompt], 20, Sampling(0.0)).completions[0].stop == "length"


def test_a_cache_installs_once_and_is_removed_on_error():
    model = tiny("hybrid", False)
    with pytest.raises(RuntimeError, match="already installed"), kv_cache(model, 1):
        with kv_cache(model, 1):
            pass
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, CausalSelfAttention))
    with kv_cache(model, 1, capacity=4) as cache:
        cache.feed(torch.tensor([[1, 2, 3]]))
        with pytest.raises(ValueError, match="exceed the cache capacity 4"):
            cache.feed(torch.tensor([[1, 2]]))


@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"temperature": -1.0},
                                 {"temperature": float("inf")}, {"top_p": 0.0}, {"top_p": 1.5},
                                 {"top_k": 0}])
def test_invalid_sampling_is_refused(bad):
    with pytest.raises(ValueError, match="is invalid"):
        Sampling(**bad)


def test_inference_has_one_import_path():
    # The old paths (spannorm.train.generation, spannorm.train.checkpoint.load_for_inference) were removed:
    # train sits below inference, so it cannot hand out inference's functions.
    assert importlib.util.find_spec("spannorm.train.generation") is None
    assert not hasattr(ckpt_io, "load_for_inference")
    assert spannorm.inference.generate is generate and callable(spannorm.inference.load_for_inference)


def test_the_docs_python_snippet_runs(capsys):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    snippet = docs.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(snippet, "docs/evaluation.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]
    assert lines[4].endswith("tokens/s")
