"""The attention kernel per dtype on this CPU, and what the choice does to a whole training step.

Part 1, kernels: causal attention forward + backward for SDPA's flash kernel, SDPA's math kernel and a
hand-written one (QKᵀ, mask, softmax in fp32, ·V), in fp32 and bf16, at the ``cpu`` bench size (B=8, H=4,
T=128, head 64) and the ``tiny``/``shakespeare-char`` preset size (B=16, H=4, T=64, head 32).

Part 2, steps: forward + backward + AdamW of the ``cpu`` bench model (d=256, 4 layers, B=8, T=128) in fp32,
and under bf16 autocast with the flash kernel and with the model's table choice
(:data:`spannorm.model.layers.SDPA_BACKENDS`).

Every variant runs in rotated order round by round in one process, so load from other processes falls on
all alike; ratios are per round (paired), reported as median and range.

Usage: python benchmarks/bench_attention.py [--threads 1] [--rounds 9] [--steps-rounds 6]
                                            [--out benchmarks/results/bench_attention.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from spannorm.bench.harness import hardware_info
from spannorm.config import ModelConfig
from spannorm.hardware.calibrate import calibrate
from spannorm.model import layers
from spannorm.model.transformer import DecoderLM

SHAPES = {"cpu (B=8, H=4, T=128, head 64)": (8, 4, 128, 64),
          "tiny/shakespeare-char (B=16, H=4, T=64, head 32)": (16, 4, 64, 32)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa_with(backend: SDPBackend) -> Callable[..., torch.Tensor]:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


KERNELS = {"flash": sdpa_with(SDPBackend.FLASH_ATTENTION), "math": sdpa_with(SDPBackend.MATH),
           "manual": manual_attention}


def paired(variants: dict[str, Callable[[], None]], rounds: int, reps: int, base: str) -> dict[str, dict]:
    """Per variant: median ms over rounds, and the per-round ratio to ``base`` (median, min, max)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(reps):
                variants[name]()
            times[name].append((time.perf_counter() - start) / reps * 1e3)
    out = {}
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(ts, times[base])]
        out[name] = {"median_ms": statistics.median(ts), "ratio_to_" + base: statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def kernel_case(shape: tuple[int, int, int, int], dtype: torch.dtype, fn: Callable) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(grad)
    return run


def step_case(precision: str, backends: dict) -> Callable[[], None]:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, context_length=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(256, (8, 129), generator=torch.Generator().manual_seed(1))

    def run() -> None:
        saved = dict(layers.SDPA_BACKENDS)
        layers.SDPA_BACKENDS.clear()
        layers.SDPA_BACKENDS.update(backends)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(tokens[:, :-1], tokens[:, 1:]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            layers.SDPA_BACKENDS.clear()
            layers.SDPA_BACKENDS.update(saved)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9, help="kernel rounds (3 calls each)")
    parser.add_argument("--steps-rounds", type=int, default=6, help="training-step rounds (1 step each); 0: skip")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"hardware": hardware_info(torch.device("cpu")), "load_average": os.getloadavg(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernels": {}, "steps": {},
              "calibration_tflops": {d: calibrate("cpu", d).tflops for d in DTYPES}}
    print(f"CPU capability {report['cpu_capability']}; calibration peak (TFLOP/s): "
          f"{report['calibration_tflops']}; load average {report['load_average']}")
    for label, shape in SHAPES.items():
        for dname, dtype in DTYPES.items():
            res = paired({k: kernel_case(shape, dtype, fn) for k, fn in KERNELS.items()}, args.rounds, 3, "flash")
            report["kernels"][f"{label} {dname}"] = res
            print(f"{label} {dname}: " + "  ".join(
                f"{k} {r['median_ms']:.2f} ms (x{r['ratio_to_flash']:.2f}, {r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
                for k, r in res.items()), flush=True)
    if args.steps_rounds:
        variants = {"fp32": step_case("fp32", {}),
                    "bf16 flash": step_case("bf16", {}),
                    "bf16 table": step_case("bf16", dict(layers.SDPA_BACKENDS))}
        res = paired(variants, args.steps_rounds, 1, "fp32")
        report["steps"] = res
        for k, r in res.items():
            print(f"cpu-size step {k}: {r['median_ms']:.0f} ms (x{r['ratio_to_fp32']:.2f} of fp32, "
                  f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f})", flush=True)
    report["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
