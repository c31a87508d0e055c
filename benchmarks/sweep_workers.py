"""How a sweep should use this machine: the same runs trained by N workers of T torch threads each, for the
study's model sizes, in fp32 and bf16. Not a test: it takes many minutes.

Each *cell* (depth, FFN, precision) trains ``--runs`` runs of the ``tiny`` preset reshaped to the study's size
(d_model 64, 4 heads, context 64, batch 16; issue 16); each *variant* ``WxT`` trains them W at a time, each
run a ``spannorm train`` process with T threads (``OMP_NUM_THREADS=T``). Round by round the variants run in
turn, their order rotated, so load drift on a shared machine hits every variant alike; the ratio to the first
variant is paired per round. Throughput is the training tokens of all runs divided by the wall time from the
first start to the last exit (process start-up included, as in a sweep's first run per worker), and, as
``loop tokens/s``, by the trainer's own training time (summary.json ``wall_s``; the busiest worker's sum).

Usage: python benchmarks/sweep_workers.py [--rounds 3] [--cells 12/dense/fp32 48/moe/fp32 ...]
       [--variants 2x1 1x2 1x1] [--steps fp32=40 bf16=8] [--out results.json]
       python benchmarks/sweep_workers.py --summarize results.json [...]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_CELLS = ["12/dense/fp32", "12/dense/bf16", "48/dense/fp32", "48/dense/bf16"]
STUDY_SIZE = ["--model.d_model=64", "--model.n_heads=4", "--model.context_length=64", "--train.batch_size=16"]
MOE = ["--model.moe.n_experts=4", "--model.moe.top_k=2"]

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="DEPTH/FFN/PRECISION, FFN dense or moe")
parser.add_argument("--variants", nargs="+", default=["2x1", "1x2"], help="WORKERSxTHREADS; the first is the "
                    "reference of the paired ratios")
parser.add_argument("--runs", type=int, default=2, help="runs per cell and variant")
parser.add_argument("--steps", nargs="+", default=["fp32=40", "bf16=8"], help="steps per run, per precision")
parser.add_argument("--out", default=None, help="write every measurement here as JSON")
parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: print the tables of files written by --out")
args = parser.parse_args()
steps = {k: int(v) for k, v in (s.split("=") for s in args.steps)}
variants = [tuple(int(x) for x in v.split("x")) for v in args.variants]


def start(out, cell, threads):
    depth, ffn, precision = cell.split("/")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    argv = [sys.executable, "-m", "spannorm", "train", "--preset", "tiny", "--out", out, "--overwrite",
            *STUDY_SIZE, f"--model.n_layers={depth}", *(MOE if ffn == "moe" else []),
            f"--train.precision={precision}", f"--train.steps={steps[precision]}", "--optim.warmup_steps=2",
            "--train.eval_every=0", "--train.eval_batches=1", "--train.progress=none",
            "--train.tensorboard=false", "--train.checkpoint_every=0"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(cell, workers, threads):
    """Train ``args.runs`` runs of ``cell``, ``workers`` at a time; (wall s, tokens, busiest worker's loop s)."""
    outs = [f"{work}/r{i}" for i in range(args.runs)]
    begin = time.perf_counter()
    for first in range(0, len(outs), workers):
        procs = [start(out, cell, threads) for out in outs[first:first + workers]]
        if any(proc.wait() != 0 for proc in procs):
            raise SystemExit(f"a run of {cell} failed; rerun one by hand to see why")
    wall = time.perf_counter() - begin
    summaries = [json.load(open(f"{out}/summary.json")) for out in outs]
    loop_by_worker = [sum(s["wall_s"] for s in summaries[w::workers]) for w in range(workers)]
    return wall, sum(s["tokens"] for s in summaries), max(loop_by_worker)


def summarize(records, cells, variants):
    """Markdown rows: median tokens/s per variant (wall, and trainer in brackets) and the paired ratio of each
    variant to the first, per round (median and range), by wall and by trainer time."""
    rounds = len({x["round"] for x in records})
    lines = [f"medians over {rounds} rounds; ratios paired per round to {variants[0]} (median, range)",
             "| cell | " + " | ".join(f"{v} tokens/s (trainer)" for v in variants) + " | " +
             " | ".join(f"{v} / {variants[0]}, wall | trainer" for v in variants[1:]) + " | load |",
             "|---" + "|---:" * (3 * len(variants) - 2) + "|---|"]
    for cell in cells:
        by = {v: sorted((x for x in records if x["cell"] == cell and x["variant"] == v), key=lambda x: x["round"])
              for v in variants}
        row = [f"{statistics.median(x['tokens_per_s'] for x in by[v]):.0f} "
               f"({statistics.median(x['loop_tokens_per_s'] for x in by[v]):.0f})" for v in variants]
        for v in variants[1:]:
            shown = []
            for key in ("tokens_per_s", "loop_tokens_per_s"):
                ratios = [b[key] / a[key] for a, b in zip(by[variants[0]], by[v])]
                shown.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")
            row.append(" | ".join(shown))
        loads = [x["load_before"] for v in variants for x in by[v]]
        lines.append(f"| {cell} | " + " | ".join(row) + f" | {min(loads):.1f}–{max(loads):.1f} |")
    return "\n".join(lines)


if args.summarize:
    for path in args.summarize:
        data = json.load(open(path))
        recs = data["records"]
        order = lambda seq: list(dict.fromkeys(seq))  # noqa: E731 - first-seen order
        print(f"{path}: {' '.join(data['argv'])}")
        print(summarize(recs, order(x["cell"] for x in recs), order(x["variant"] for x in recs)), "\n")
    raise SystemExit(0)


work = tempfile.mkdtemp(prefix="sweep-workers-")
records = []
for r in range(args.rounds):
    for c, cell in enumerate(args.cells):
        shift = (r + c) % len(variants)
        for workers, threads in variants[shift:] + variants[:shift]:
            load = os.getloadavg()[0]
            wall, tokens, loop = measure(cell, workers, threads)
            records.append({"round": r, "cell": cell, "variant": f"{workers}x{threads}", "wall_s": wall,
                            "tokens": tokens, "tokens_per_s": tokens / wall, "loop_tokens_per_s": tokens / loop,
                            "load_before": load})
            print(f"round {r} {cell:<14} {workers}x{threads}: {wall:7.1f} s {tokens / wall:8.0f} tokens/s "
                  f"(loop {tokens / loop:8.0f}) load {load:.1f}", flush=True)
            if args.out:  # after every measurement, so a run cut short keeps what it measured
                with open(args.out, "w") as fh:
                    json.dump({"argv": sys.argv[1:], "cpu_count": os.cpu_count(), "records": records}, fh,
                              indent=1)

print()
print(summarize(records, args.cells, args.variants))
print("load average at the end:", os.getloadavg())
shutil.rmtree(work, ignore_errors=True)
