"""Before/after timings of the model's speed paths, forward + backward, interleaved in one process:

- RMSNorm: ``F.rms_norm`` (separate ops and a composite backward on CPU) vs the model's CPU path (an
  autograd Function with a hand-written backward) vs a ``torch.compile``d norm (one generated kernel each
  way);
- RoPE: x·cos + rotate_half(x)·sin (chunk, neg, cat) vs x·cos + roll(x)·sin_signed (what the model uses);
- grouped-query attention: K/V repeated to every head vs SDPA's ``enable_gqa=True`` (what the model uses);
- AdamW: the default (for-loop), ``foreach=True`` and ``fused=True`` (what ``spannorm bench`` uses) on the
  parameters of the CPU benchmark model (``--size cpu``: d=256, 4 layers, 3.2M parameters);
- MoE experts: the old loop (slice and index per expert), the split/unbind loop (the model's fallback) and
  ``torch._grouped_mm`` (what the model uses where supported), at 8 and 64 experts.

Usage: python benchmarks/bench_fast_paths.py [--threads 1] [--repeats 30] [--no-compile]
                                             [--out benchmarks/results/bench_fast_paths.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from spannorm.bench.harness import hardware_info
from spannorm.model.layers import RotaryEmbedding, rms_norm, rotate_half


def interleaved_times(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and quartiles (ms) of each variant, run in rotating order ``repeats`` times after one warmup."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        out[name] = {"median_ms": 1e3 * statistics.median(ts), "p25_ms": 1e3 * q[0], "p75_ms": 1e3 * q[2]}
    return out


def fwd_bwd(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
            *inputs: torch.Tensor) -> Callable[[], None]:
    """A closure that runs ``fn`` on fresh leaf copies of ``inputs`` and back-propagates a fixed gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


def bench_norm(repeats: int, compile_norm: bool) -> dict:
    x, w = torch.randn(8 * 128, 256), torch.randn(256)
    variants = {"F.rms_norm (before)": fwd_bwd(lambda a, b: F.rms_norm(a, (256,), b, 1e-6), x, w),
                "hand-written backward (model, CPU)": fwd_bwd(lambda a, b: rms_norm(a, b, 1e-6), x, w)}
    if compile_norm:
        compiled = torch.compile(lambda a, b: F.rms_norm(a, (256,), b, 1e-6))
        variants["torch.compile(F.rms_norm)"] = fwd_bwd(compiled, x, w)
    return {"shape": [1024, 256], "times": interleaved_times(variants, repeats)}


def bench_rope(repeats: int) -> dict:
    rot = RotaryEmbedding(64, 128, 10000.0)
    q, k = torch.randn(8, 4, 128, 64), torch.randn(8, 4, 128, 64)

    def rotate_half_rope(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a * rot.cos + rotate_half(a) * rot.sin, b * rot.cos + rotate_half(b) * rot.sin

    variants = {"rotate_half (chunk, neg, cat)": fwd_bwd(rotate_half_rope, q, k),
                "roll + sin_signed (model)": fwd_bwd(rot, q, k)}
    return {"shape": [8, 4, 128, 64], "times": interleaved_times(variants, repeats)}


def bench_gqa(repeats: int) -> dict:
    q, k, v = torch.randn(8, 8, 128, 32), torch.randn(8, 2, 128, 32), torch.randn(8, 2, 128, 32)

    def repeated(a, b, c):
        return F.scaled_dot_product_attention(a, b.repeat_interleave(4, 1), c.repeat_interleave(4, 1),
                                              is_causal=True)

    def grouped(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)

    variants = {"repeat_interleave K/V": fwd_bwd(repeated, q, k, v),
                "enable_gqa=True (model)": fwd_bwd(grouped, q, k, v)}
    return {"shape": {"q": [8, 8, 128, 32], "kv": [8, 2, 128, 32]}, "times": interleaved_times(variants, repeats)}


def bench_adamw(repeats: int) -> dict:
    from spannorm import ModelConfig, SpanNormLM

    model = SpanNormLM(ModelConfig(d_model=256, n_layers=4, n_heads=4, context_length=128))
    variants = {}
    for name, kwargs in (("default (for-loop)", {"foreach": False}), ("foreach=True", {"foreach": True}),
                         ("fused=True (bench; trainer on CUDA)", {"fused": True})):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-4, **kwargs)
        variants[name] = opt.step
    return {"params": sum(p.numel() for p in model.parameters()), "times": interleaved_times(variants, repeats)}


def bench_moe(n_experts: int, repeats: int) -> dict:
    # 2048 = batch 8 x 128 tokens x top-2; 344 = the compute-matched expert width of d=256 at top-2
    n_tokens, d, h = 2048, 256, (344 if n_experts <= 8 else 64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, d, generator=gen)
    counts = torch.bincount(torch.randint(n_experts, (n_tokens,), generator=gen), minlength=n_experts)
    weights = [0.05 * torch.randn(shape, generator=gen) for shape in
               ((n_experts, d, h), (n_experts, d, h), (n_experts, h, d))]

    def old_loop(xs, wg, wu, wd):  # the model's dispatch before this change: slice and index per expert
        out, start = torch.empty_like(xs), 0
        for e, n in enumerate(counts.tolist()):
            xe = xs[start:start + n]
            out[start:start + n] = (F.silu(xe @ wg[e]) * (xe @ wu[e])) @ wd[e]
            start += n
        return out

    def split_loop(xs, wg, wu, wd):
        return torch.cat([(F.silu(xe @ g) * (xe @ u)) @ dn for xe, g, u, dn in
                          zip(xs.split(counts.tolist()), wg.unbind(0), wu.unbind(0), wd.unbind(0))])

    def grouped(xs, wg, wu, wd):
        offs = counts.cumsum(0).to(torch.int32)
        hid = F.silu(torch._grouped_mm(xs, wg, offs=offs)) * torch._grouped_mm(xs, wu, offs=offs)
        return torch._grouped_mm(hid, wd, offs=offs)

    variants = {"per-expert slice/index loop (before)": fwd_bwd(old_loop, x, *weights),
                "split/unbind loop (fallback)": fwd_bwd(split_loop, x, *weights)}
    if hasattr(torch, "_grouped_mm"):
        variants["torch._grouped_mm (model)"] = fwd_bwd(grouped, x, *weights)
    return {"n_experts": n_experts, "tokens_x_top_k": n_tokens, "d_model": d, "d_expert": h,
            "times": interleaved_times(variants, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd norm")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"hardware": hardware_info(torch.device("cpu")), "repeats": args.repeats,
              "command": f"python benchmarks/bench_fast_paths.py --threads {args.threads} --repeats {args.repeats}"
                         + (" --no-compile" if args.no_compile else "")
                         + (f" --out {args.out}" if args.out else ""),
              "rms_norm": bench_norm(args.repeats, not args.no_compile), "rope": bench_rope(args.repeats),
              "gqa_attention": bench_gqa(args.repeats), "adamw": bench_adamw(args.repeats),
              "moe_experts": [bench_moe(8, args.repeats), bench_moe(64, max(5, args.repeats // 3))]}
    for section in ("rms_norm", "rope", "gqa_attention", "adamw"):
        print(section)
        for name, t in report[section]["times"].items():
            print(f"  {name:<40}{t['median_ms']:>9.2f} ms  (IQR {t['p25_ms']:.2f}-{t['p75_ms']:.2f})")
    for moe in report["moe_experts"]:
        print(f"moe experts E={moe['n_experts']} d_expert={moe['d_expert']}")
        for name, t in moe["times"].items():
            print(f"  {name:<40}{t['median_ms']:>9.2f} ms  (IQR {t['p25_ms']:.2f}-{t['p75_ms']:.2f})")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
