"""nanoGPT's ``train.py`` and ``spannorm train`` side by side: same configuration, same data, same tokens,
same machine, at the same time with one thread each.

The configuration is nanoGPT's CPU one for character-level Shakespeare (its README: 4 layers, 4 heads, width
128, context 64, batch 12, lr 1e-3 with 100 warmup iterations and cosine decay to 1e-4 over the run, β₂ 0.99,
weight decay 0.1, clipping 1.0, no dropout, fp32, not compiled), which is spannorm's ``shakespeare-char``
preset. Both see the same tokens: the bytes of the text (vocabulary 256), split where spannorm splits it (the
first line start after 90%), written for nanoGPT as ``train.bin``/``val.bin`` (uint16) with a ``meta.pkl``
that gives it the vocabulary size. The models are each project's own (nanoGPT: LayerNorm, learned positions,
GELU MLP; spannorm ``pre``: RMSNorm, RoPE, SwiGLU), as is each one's validation estimate (nanoGPT: the mean
over ``eval_iters`` random batches; spannorm: 20 fixed, evenly spaced batches).

nanoGPT is never part of this repository: pass its source with ``--nanogpt`` (a checkout, or a git
directory such as the one the session's fetch tool makes for ``karpathy/nanoGPT``); it is copied into a new
temporary folder outside the repository, with the data and both runs' outputs, and deleted at the end
(``--keep`` keeps it). Both runs start together as subprocesses with ``OMP_NUM_THREADS=1`` so that load
from other processes falls on both alike. Step time is the median over the run's steps (each run's own
timer; evaluation steps excluded for spannorm, the median ignores nanoGPT's few evaluation iterations);
tokens/s = 768 tokens per step / median step time.

Usage: python benchmarks/nanogpt_side_by_side.py --nanogpt PATH [--data PATH/tinyshakespeare.txt]
           [--steps 2000] [--out benchmarks/results/nanogpt_side_by_side.json] [--keep]
       python benchmarks/nanogpt_side_by_side.py --from-folder FOLDER [--out ...]
           (report from a kept or still-running folder: both runs up to the last step each has logged)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spannorm.data.dataset import split_point

REPO = Path(__file__).resolve().parents[1]
BATCH, CONTEXT = 12, 64
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--dtype=float32",
                "--eval_iters=20", "--log_interval=1", f"--block_size={CONTEXT}", f"--batch_size={BATCH}",
                "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0", "--wandb_log=False"]
ITER_LINE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
EVAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def export_nanogpt(source: Path, dest: Path) -> str:
    """Copy nanoGPT's files into ``dest``; returns the commit (or "working tree")."""
    git_dir = source / ".git" if (source / ".git").exists() else source
    if (git_dir / "HEAD").is_file():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    shutil.copytree(source, dest)
    return "working tree"


def write_byte_dataset(text_path: Path, folder: Path) -> dict:
    """The text's bytes as nanoGPT's train.bin/val.bin, split as spannorm splits them, and a meta.pkl
    holding the vocabulary size (nanoGPT reads it; nothing here reads a pickle)."""
    corpus = text_path.read_bytes()
    cut = split_point(corpus, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.frombuffer(corpus, dtype=np.uint8).astype(np.uint16)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as fh:
        pickle.dump({"vocab_size": 256}, fh)
    return {"train_tokens": cut, "val_tokens": len(corpus) - cut}


def parse_nanogpt(log: str) -> dict:
    step_ms = [float(m.group(3)) for m in map(ITER_LINE.match, log.splitlines()) if m and int(m.group(1)) > 0]
    evals = [(int(m.group(1)), float(m.group(3))) for m in map(EVAL_LINE.match, log.splitlines()) if m]
    median_s = statistics.median(step_ms) / 1e3 if step_ms else float("nan")
    return {"median_step_s": median_s, "tokens_per_s": BATCH * CONTEXT / median_s, "steps_timed": len(step_ms),
            "val_losses": evals, "final_val_loss": evals[-1][1] if evals else None}


def parse_spannorm(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    step_s = [BATCH * CONTEXT / r["tokens_per_s"] for r in records[1:] if r.get("tokens_per_s")]
    median_s = statistics.median(step_s)
    return {"median_step_s": median_s, "tokens_per_s": BATCH * CONTEXT / median_s, "steps_timed": len(step_s),
            "val_losses": [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None],
            "final_val_loss": summary.get("final_val_loss"), "summary_tokens_per_s": summary.get("tokens_per_s"),
            "last_step": records[-1]["step"] if records else 0}


def report_from_folder(work: Path) -> dict:
    """Both runs' figures from a run folder as far as each got (an unfinished run has no final loss: compare
    the validation losses at the steps both reached)."""
    nano, ours = parse_nanogpt((work / "nanogpt.log").read_text()), parse_spannorm(work / "spannorm-out")
    nano["last_step"] = nano["steps_timed"]
    common = sorted(set(dict(nano["val_losses"])) & set(dict(ours["val_losses"])))
    return {"nanogpt": nano, "spannorm": ours, "tokens_per_s_ratio": ours["tokens_per_s"] / nano["tokens_per_s"],
            "val_loss_at_common_steps": [(s, dict(nano["val_losses"])[s], dict(ours["val_losses"])[s])
                                         for s in common]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, help="nanoGPT checkout or git directory")
    parser.add_argument("--from-folder", type=Path, help="only report from this (kept or running) folder")
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=2000, help="iterations of both runs (default 2000)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.from_folder is not None:
        report = {"benchmark": "nanogpt_side_by_side", "from_folder": str(args.from_folder),
                  "load_average": os.getloadavg(), **report_from_folder(args.from_folder)}
        print(json.dumps(report, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    if args.nanogpt is None:
        print("error: --nanogpt is required (a nanoGPT checkout or git directory)", file=sys.stderr)
        return 2
    for path, what in ((args.nanogpt, "--nanogpt"), (args.data, "--data")):
        if not path.exists():
            print(f"error: {what}={path} does not exist", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="nanogpt-side-by-side-"))
    try:
        nano = work / "nanoGPT"
        commit = export_nanogpt(args.nanogpt.resolve(), nano)
        data_info = write_byte_dataset(args.data.resolve(), nano / "data" / "shakespeare_char")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
        nano_cmd = [sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={args.steps}",
                    f"--lr_decay_iters={args.steps}", f"--eval_interval={args.eval_every}",
                    f"--out_dir={work / 'nanogpt-out'}"]
        ours_cmd = [sys.executable, "-m", "spannorm", "train", "--preset", "shakespeare-char",
                    f"--data.path={args.data.resolve()}", f"--train.steps={args.steps}", "--train.device=cpu",
                    f"--train.eval_every={args.eval_every}", "--train.progress=none", "--train.tensorboard=false",
                    "--out", str(work / "spannorm-out")]
        load_start = os.getloadavg()
        started = time.perf_counter()
        with open(work / "nanogpt.log", "w") as nano_log, open(work / "spannorm.log", "w") as ours_log:
            procs = [subprocess.Popen(nano_cmd, cwd=nano, env=env, stdout=nano_log, stderr=subprocess.STDOUT),
                     subprocess.Popen(ours_cmd, cwd=REPO, env=env, stdout=ours_log, stderr=subprocess.STDOUT)]
            codes = [p.wait() for p in procs]
        wall = time.perf_counter() - started
        if any(codes):
            for name in ("nanogpt.log", "spannorm.log"):
                print(f"--- {name} (tail)\n" + "\n".join((work / name).read_text().splitlines()[-15:]),
                      file=sys.stderr)
            print(f"error: exit codes nanoGPT={codes[0]} spannorm={codes[1]}", file=sys.stderr)
            return 1
        nano_res = parse_nanogpt((work / "nanogpt.log").read_text())
        ours_res = parse_spannorm(work / "spannorm-out")
        report = {"benchmark": "nanogpt_side_by_side", "steps": args.steps, "nanogpt_commit": commit,
                  "data": str(args.data.resolve()), **data_info, "threads_each": 1, "concurrent": True,
                  "load_average_start": load_start, "load_average_end": os.getloadavg(), "wall_s": wall,
                  "nanogpt": nano_res, "spannorm": ours_res,
                  "tokens_per_s_ratio": ours_res["tokens_per_s"] / nano_res["tokens_per_s"],
                  "nanogpt_command": " ".join(nano_cmd[1:]), "spannorm_command": " ".join(ours_cmd[1:])}
        print(f"{args.steps} steps, concurrent, 1 thread each, load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
        for name, res in (("nanoGPT", nano_res), ("spannorm", ours_res)):
            print(f"{name:9} {1e3 * res['median_step_s']:7.1f} ms/step  {res['tokens_per_s']:7.0f} tokens/s  "
                  f"final val loss {res['final_val_loss']}")
        print(f"spannorm/nanoGPT tokens/s: {report['tokens_per_s_ratio']:.3f}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.out}")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
