"""Generation speed with and without the KV cache, at 1 and 8 prompts, greedy, on the CPU.

The model is a seeded random ``span`` model (no checkpoint needed; speed does not depend on the weights):
by default d=256, 4 layers, 4 heads, context 256, byte vocabulary (the ``--size cpu`` model of ``spannorm
bench``). Each prompt is 32 tokens, each row generates 128 new tokens, so every row stays inside the context
(past it, cached generation rebuilds its cache every step and runs at the uncached speed). The four cases
run interleaved, ``--repeats`` times each, in rotated order, after one warm-up each; the table gives the
median tokens/s (new tokens over the whole call, prefill included) and the cached/uncached ratio. It also
checks that cached and uncached generation return the same tokens.

Usage: python benchmarks/bench_generate.py [--threads 1] [--repeats 5] [--new-tokens 128]
                                           [--out benchmarks/results/bench_generate.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from spannorm.bench.harness import hardware_info
from spannorm.config import ModelConfig
from spannorm.inference import Sampling, generate_batch
from spannorm.model import SpanNormLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, context_length=args.context,
                      placement="span")
    model = SpanNormLM(cfg).eval()
    text = (Path(__file__).read_bytes() * 2)
    prompts = {n: [list(text[i * 101:i * 101 + args.prompt_tokens]) for i in range(n)] for n in (1, 8)}
    cases = {(n, cache): (lambda n=n, cache=cache: generate_batch(model, prompts[n], args.new_tokens,
                                                                  Sampling(0.0), use_cache=cache))
             for n in (1, 8) for cache in (True, False)}
    tokens = {key: [c.tokens for c in fn().completions] for key, fn in cases.items()}  # warm-up
    same = all(tokens[(n, True)] == tokens[(n, False)] for n in (1, 8))
    rates: dict[tuple[int, bool], list[float]] = {key: [] for key in cases}
    keys = list(cases)
    for r in range(args.repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            result = cases[key]()
            rates[key].append(result.new_tokens / (time.perf_counter() - start))
    rows = []
    for n in (1, 8):
        cached, uncached = statistics.median(rates[(n, True)]), statistics.median(rates[(n, False)])
        rows.append({"prompts": n, "cached_tokens_per_s": cached, "uncached_tokens_per_s": uncached,
                     "speedup": cached / uncached,
                     "cached_range": [min(rates[(n, True)]), max(rates[(n, True)])],
                     "uncached_range": [min(rates[(n, False)]), max(rates[(n, False)])]})
    print(f"model: span, d={cfg.d_model}, {cfg.n_layers} layers, context {cfg.context_length}; prompts of "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens each, greedy; {args.threads} thread(s); "
          f"median of {args.repeats}; cached == uncached tokens: {same}")
    print("| prompts | KV cache tokens/s | no cache tokens/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['prompts']} | {row['cached_tokens_per_s']:.0f} | {row['uncached_tokens_per_s']:.0f} | "
              f"{row['speedup']:.1f}x |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "same_tokens": same,
                                        "rows": rows, "hardware": hardware_info(torch.device("cpu"))}, indent=2))


if __name__ == "__main__":
    main()
