"""Benchmark: nanoGPT's CPU configuration for character-level Shakespeare (SPEC §8) with spannorm's trainer.

Trains the ``shakespeare-char`` preset (4 layers, 4 heads, width 128, context 64, batch 12, 2000 iterations,
lr 1e-3, PreNorm, byte tokenizer = characters for this ASCII file) on tinyshakespeare.txt, then reports the
final validation loss next to nanoGPT's ≈ 1.88 and the training throughput, and writes a JSON result to
``benchmarks/results/``. Not a test: it takes minutes.

    python benchmarks/shakespeare_nanogpt.py [PATH/tinyshakespeare.txt] [--threads 1] [--precision fp32]
        [--set train.eval_every=100 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from spannorm.launch import train
from spannorm.train.config import resolve_config

REPO = Path(__file__).resolve().parents[1]
NANOGPT_VAL_LOSS = 1.88


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = REPO / ".." / "shared" / "data" / "tinyshakespeare.txt"
    parser.add_argument("data", nargs="?", type=Path, default=default_data,
                        help="tinyshakespeare.txt (default: ../shared/data/tinyshakespeare.txt from the repo)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=None, help="override the 2000 iterations (quick checks)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-shakespeare-char")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="an extra config override (repeatable)")
    args = parser.parse_args(argv)

    if not args.data.is_file():
        print(f"error: {args.data} does not exist; pass the path of tinyshakespeare.txt", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    overrides = [f"data.path={args.data.resolve()}", f"train.precision={args.precision}", "train.device=cpu",
                 *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = resolve_config("shakespeare-char", None, overrides)
    started = time.perf_counter()
    summary = train(cfg, args.out, overwrite=True)
    wall = time.perf_counter() - started
    result = {
        "benchmark": "shakespeare_nanogpt",
        "preset": "shakespeare-char",
        "data": str(args.data.resolve()),
        "overrides": overrides,
        "steps": summary.steps,
        "final_val_loss": summary.final_val_loss,
        "best_val_loss": summary.best_val_loss,
        "final_train_loss": summary.final_train_loss,
        "nanogpt_val_loss": NANOGPT_VAL_LOSS,
        "tokens": summary.tokens,
        "tokens_per_s": summary.tokens_per_s,
        "wall_s": wall,
        "precision": args.precision,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "status": summary.status,
        "command": " ".join(["python benchmarks/shakespeare_nanogpt.py",
                             *(argv if argv is not None else sys.argv[1:])]),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"shakespeare_nanogpt_{args.precision}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"final val loss {summary.final_val_loss:.4f} (nanoGPT ~{NANOGPT_VAL_LOSS}), best "
          f"{summary.best_val_loss:.4f}, {summary.tokens_per_s:.0f} tokens/s over {summary.steps} steps "
          f"({args.precision}, {args.threads} thread(s)), {wall:.0f} s wall; wrote {path}")
    return 0 if summary.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
