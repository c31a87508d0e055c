"""The Hugging Face export figures of docs/interop.md.

- ``parity``: every placement, dense and MoE, at the default (fan-in) init: max |logit difference| between
  spannorm and the exported folder loaded through ``AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)``, fp32, on 2 × 128 random tokens; and whether greedy ``generate()`` gives the same 32
  tokens with and without the cache.
- ``rope``: a random Llama (2 layers, d_model 64, GQA 4/2) with each scaled RoPE that import reads, with
  ``original_max_position_embeddings`` 32: max |logit difference| between transformers' ``LlamaForCausalLM`` and
  the imported spannorm model on 2 × 200 tokens, and the same with the scaling dropped (what ignoring it costs).
- ``timing``: export, transformers load and re-import times for a model of about 100M parameters (``span``
  through the remote-code export, ``pre`` through the Llama export), the median of ``--repeats`` runs.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_hf_export.py parity|rope|timing [--repeats 3]``. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from spannorm import ModelConfig, SpanNormLM
from spannorm.config import PLACEMENTS
from spannorm.interop import export_hf, import_hf
from spannorm.interop.hf_export import export_hf_remote_code


def parity() -> None:
    print("| placement | FFN | max abs logit difference | largest logit | cached = uncached greedy (32 tokens) |")
    print("|---|---|---|---|---|")
    for placement in PLACEMENTS:
        for moe in (None, {"n_experts": 4, "top_k": 2}):
            torch.manual_seed(0)
            cfg = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, context_length=128,
                              placement=placement, moe=moe)
            ours = SpanNormLM(cfg).eval()
            with tempfile.TemporaryDirectory() as tmp:
                export_hf_remote_code(ours, Path(tmp) / "hf")
                theirs = transformers.AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "hf"),
                                                                           trust_remote_code=True).eval()
            idx = torch.randint(0, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = ours(idx).logits
                diff = (theirs(input_ids=idx, use_cache=False).logits - logits).abs().max().item()
                prompt = idx[:, :16]
                same = torch.equal(theirs.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True),
                                   theirs.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=False))
            print(f"| {placement} | {'MoE 4×top-2' if moe else 'dense'} | {diff:.1e} | {logits.abs().max():.1f} "
                  f"| {'yes' if same else 'NO'} |")


ROPES = {
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32),
}


def rope() -> None:
    print("| rope_type | max abs logit difference | largest logit | with the scaling dropped |")
    print("|---|---|---|---|")
    for name, params in ROPES.items():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                          rope_parameters=dict(params))
        hf_model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():  # weights at a scale where logits are O(1), norm gains away from 1
            for p in hf_model.parameters():
                p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp)
            ours = import_hf(tmp).eval()
        plain = SpanNormLM(dataclasses.replace(ours.cfg, rope_scaling=None)).eval()
        plain.load_state_dict(ours.state_dict())
        idx = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            theirs = hf_model(input_ids=idx).logits
            diff = (ours(idx).logits - theirs).abs().max().item()
            dropped = (plain(idx).logits - theirs).abs().max().item()
        print(f"| {name} | {diff:.1e} | {theirs.abs().max():.1f} | {dropped:.2g} |")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(repeats: int) -> None:
    cfg = dict(vocab_size=32000, d_model=768, n_layers=11, n_heads=12, context_length=1024)
    print("| model | parameters | export | transformers load | spannorm re-import |")
    print("|---|---|---|---|---|")
    for placement, write, remote in (("span", export_hf_remote_code, True), ("pre", export_hf, False)):
        model = SpanNormLM(ModelConfig(**cfg, placement=placement)).eval()
        n = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "hf"
            # functools.partial binds this iteration's model, folder and flags (a lambda would read the loop's
            # variables when called).
            export_s = _median_seconds(functools.partial(write, model, out, overwrite=True), repeats)
            load_s = _median_seconds(functools.partial(transformers.AutoModelForCausalLM.from_pretrained,
                                                       str(out), trust_remote_code=remote), repeats)
            import_s = _median_seconds(functools.partial(import_hf, out), repeats)
        kind = "remote code" if remote else "LlamaForCausalLM"
        print(f"| {placement} ({kind}) | {n / 1e6:.0f}M | {export_s:.2f} s | {load_s:.2f} s | {import_s:.2f} s |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("parity", "rope", "timing"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.what == "timing":
        timing(args.repeats)
    else:
        {"parity": parity, "rope": rope}[args.what]()
