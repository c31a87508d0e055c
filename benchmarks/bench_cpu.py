"""The CPU benchmark runs behind docs/benchmarks.md, each one ``spannorm bench`` command.

- ``headline``: pre and span, dense, eager fp32, beside the Hugging Face Llama, one step of each per round
  (60 rounds), so that the paired ratios compare steps taken seconds apart. Gives the two CPU targets:
  span/pre step time and ours/HF tokens/s.
- ``placements``: every placement, dense and MoE, eager fp32, beside a Hugging Face Llama of the same size.
  Gives span/pre, the other placements/pre, MoE/dense and ours/HF.
- ``modes``: pre and span (and the HF reference), eager and compiled, fp32 and bf16 autocast.
- ``moe-modes``: pre dense and MoE, eager and compiled, fp32 and bf16 (MoE/dense per mode).

One thread by default: the machine these were measured on is shared, and a two-thread OpenMP team stalls
when another process holds a core. Usage:

    python benchmarks/bench_cpu.py placements [--threads 1] [--steps 30] [--rounds 10]

Writes benchmarks/results/bench_cpu_<run>.json (``..._<N>threads.json`` with ``--threads N`` > 1), replacing
it, and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spannorm.cli.main import main as spannorm_main

RESULTS = Path(__file__).resolve().parent / "results"
RUNS: dict[str, list[str]] = {
    "headline": ["--placements", "pre,span", "--ffn", "dense", "--modes", "eager", "--dtypes", "fp32",
                 "--steps", "60", "--rounds", "60"],
    "placements": ["--placements", "pre,span,span_post,span_b2t,post,peri,deepnorm,mixln,lns,hybrid,residual",
                   "--ffn", "dense,moe", "--modes", "eager", "--dtypes", "fp32"],
    "modes": ["--placements", "pre,span", "--ffn", "dense", "--modes", "eager,compiled", "--dtypes", "fp32,bf16"],
    "moe-modes": ["--placements", "pre", "--ffn", "dense,moe", "--modes", "eager,compiled", "--dtypes", "fp32,bf16",
                  "--reference", "off"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", choices=sorted(RUNS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 30; headline 60)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: 10; headline 60)")
    args = parser.parse_args()
    suffix = "" if args.threads == 1 else f"_{args.threads}threads"
    out = RESULTS / f"bench_cpu_{args.run.replace('-', '_')}{suffix}.json"
    run_args = list(RUNS[args.run])
    for flag, value, default in (("--steps", args.steps, "30"), ("--rounds", args.rounds, "10")):
        if value is not None:
            if flag in run_args:
                run_args[run_args.index(flag) + 1] = str(value)
            else:
                run_args += [flag, str(value)]
        elif flag not in run_args:
            run_args += [flag, default]
    out_arg = str(out.relative_to(Path.cwd())) if out.is_relative_to(Path.cwd()) else str(out)
    return spannorm_main(["bench", "--size", "cpu", *run_args, "--device", "cpu", "--threads", str(args.threads),
                          "--warmup", str(args.warmup), "--out", out_arg, "--overwrite"])


if __name__ == "__main__":
    raise SystemExit(main())
