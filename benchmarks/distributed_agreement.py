"""Benchmark: how closely 2-process DDP and FSDP2 runs (torchrun, gloo, CPU) follow a 1-process run with the
same global batch, per configuration.

For each case it trains the same command three times (``spannorm train``, then ``torchrun
--nproc_per_node=2 -m spannorm train`` with ``train.parallel=ddp`` and ``fsdp``) and reports, over all
steps, the largest relative difference of the training loss and of the gradient norm, and the relative
difference of the final validation loss, against the 1-process run; also each run's wall time. Writes
``benchmarks/results/distributed_agreement.json`` and prints a Markdown table. Not a test: it takes minutes.

    python benchmarks/distributed_agreement.py [--steps 50] [--case fp32 ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = ["--preset", "tiny", "--train.progress=none", "--train.tensorboard=false", "--train.device=cpu",
        "--train.checkpoint_every=0"]
CASES: dict[str, list[str]] = {
    "fp32": ["--train.precision=fp32"],
    "fp32, grad_accum 2": ["--train.precision=fp32", "--train.grad_accum=2", "--train.batch_size=8"],
    "fp32, span": ["--train.precision=fp32", "--model.placement=span"],
    "bf16": ["--train.precision=bf16"],
    "fp32, MoE 4 experts top-2": ["--train.precision=fp32", "--model.moe.n_experts=4", "--model.moe.top_k=2"],
}


def run(command: list[str], out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    result = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--case", action="append", choices=list(CASES), help="default: every case")
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="spannorm-dist-"))
    common = [*BASE, f"--train.steps={args.steps}", f"--train.eval_every={args.steps}"]
    single = [sys.executable, "-m", "spannorm", "train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "spannorm", "train"]
    rows, resolved = [], {}
    for name in args.case or list(CASES):
        folder = root / name.replace(", ", "-").replace(" ", "_")
        shutil.rmtree(folder, ignore_errors=True)
        extra = [*common, *CASES[name]]
        walls = {"single": run([*single, *extra], folder / "single")}
        for mode in ("ddp", "fsdp"):
            walls[mode] = run([*torchrun, *extra, f"--train.parallel={mode}"], folder / mode)
        reference = metrics(folder / "single")
        resolved[name] = yaml.safe_load((folder / "single" / "config.yaml").read_text())
        for mode in ("ddp", "fsdp"):
            records = metrics(folder / mode)
            assert [r["step"] for r in records] == [r["step"] for r in reference]
            pairs = list(zip(records, reference))
            rows.append({
                "case": name, "mode": mode, "steps": len(records),
                "max_rel_train_loss": max(relative(r["train_loss"], s["train_loss"]) for r, s in pairs),
                "max_rel_grad_norm": max(relative(r["grad_norm"], s["grad_norm"]) for r, s in pairs),
                "rel_final_val_loss": relative(records[-1]["val_loss"], reference[-1]["val_loss"]),
                "final_train_loss": records[-1]["train_loss"], "single_final_train_loss": reference[-1]["train_loss"],
                "wall_s": walls[mode], "single_wall_s": walls["single"]})
    result = {"command": "python benchmarks/distributed_agreement.py " + " ".join(argv or sys.argv[1:]),
              "base_overrides": common, "torch": torch.__version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "rows": rows, "resolved_configs": resolved}
    out = REPO / "benchmarks" / "results" / "distributed_agreement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| case | parallel | steps | max rel. diff, train loss | max rel. diff, grad norm "
          "| rel. diff, final val loss |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['mode']} | {row['steps']} | {row['max_rel_train_loss']:.1e} | "
              f"{row['max_rel_grad_norm']:.1e} | {row['rel_final_val_loss']:.1e} |")
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
