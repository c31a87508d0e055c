"""``spannorm sweep PLAN.yaml --out DIR``: run a grid of training runs, resumably, with worker processes."""

from __future__ import annotations

import argparse
from pathlib import Path

from spannorm.cli.main import UsageError
from spannorm.experiments.ledger import read_ledger
from spannorm.experiments.plan import load_plan
from spannorm.experiments.plan_checks import check_sweep_folder
from spannorm.experiments.recover import recover_runs
from spannorm.experiments.runner import (
    RUNS_DIR,
    check_data_unchanged,
    check_ledger,
    check_run_settings,
    ledger_precision_setup,
    ledger_records,
    load_index,
    read_summary,
    resumable_runs,
    run_sweep,
    start_order,
)
from spannorm.experiments.sweep_setup import AUTO, choose_setup, parse_workers, stored_setup
from spannorm.hardware.calibrate import BF16_MIN_SPEEDUP
from spannorm.hardware.devices import usable_cpu_cores
from spannorm.interop.init_from import run_config_layer
from spannorm.train.config import resolve_config
from spannorm.train.run_lock import hold_run_folder

EXIT_INTERRUPTED = 130
"""The exit status after Ctrl-C (128 + SIGINT, as a shell reports it)."""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="run a sweep plan (placements x depths x dense/MoE x LRs x seeds), resumably",
        description="Expand PLAN.yaml into runs with stable ids (e.g. span-L24-moe-lr3e-3-s1) and train the "
                    "ones not finished under DIR/runs/. Finished runs (with a summary.json) are skipped, so "
                    "a killed sweep continues where it stopped. DIR/index.json lists every run and its "
                    "status; DIR/runs.jsonl logs each event. Precision: runs whose plan names no "
                    "train.precision train in fp32, or in bf16 on a CPU where a calibration matmul measures "
                    f"bf16 at least {BF16_MIN_SPEEDUP:g}x faster than fp32 (CPUs with AMX); the choice is made "
                    "at the folder's first start and kept. On CUDA they keep the config default. A precision "
                    "in the plan always wins. The sweep prints the workers, threads and precision it uses, and "
                    "why, and stores them in DIR/index.json (docs/training.md, 'Sweeps'). The plan format and the "
                    "protocols: docs/sweeps.md.")
    p.add_argument("plan", help="the sweep plan (YAML; the format: docs/sweeps.md; examples in studies/)")
    p.add_argument("--out", required=True, help="the sweep directory (created if missing)")
    p.add_argument("--workers", type=parse_workers, default=AUTO, metavar="{auto,N}",
                   help="worker processes (spawn), or 0 to train in this process. Default auto: on a CPU, one "
                        "worker per usable physical core (affinity mask, hyper-threads counted once) divided by "
                        "--threads, since two 1-thread workers trained several times the tokens/s of one "
                        "2-thread worker on a shared 2-core CPU (docs/benchmarks.md); on CUDA one worker "
                        "(N workers there all share the first GPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (default: 1; 0 leaves torch's default)")
    p.add_argument("--ledger", default=None, metavar="FILE",
                   help="a JSON-lines file that keeps every finished run's settings, numbers, loss curves and "
                        "per-layer stats, and each sweep start, a few kB per run: runs it holds count as "
                        "finished (settings checked), so a sweep and its report survive the loss of DIR; "
                        "commit it beside the plan (docs/sweeps.md, 'The ledger')")
    p.add_argument("--max-runs", type=int, default=None, help="start at most this many runs, then stop")
    p.add_argument("--order", choices=("longest", "shortest"), default="longest",
                   help="within a stage, start the deepest runs first (longest; the shortest makespan) or the "
                        "cheapest first (shortest; the most runs done by a deadline)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs the plan asks for now and their status, train nothing")
    p.add_argument("--recover", default=None, metavar="RUN_ID[,RUN_ID...]",
                   help="with --ledger: retrain these runs, which the ledger keeps as numbers only, into "
                        "DIR/runs/, and append each one's curves and layer stats to the ledger if it ends at "
                        "exactly the recorded final val loss; nothing else of the plan runs (docs/sweeps.md, "
                        "'Recovering curves')")
    p.set_defaults(run=run)
    return p


def _recover(args: argparse.Namespace, plan, out: Path) -> int:
    if args.ledger is None:
        raise UsageError("--recover needs --ledger FILE (the ledger that keeps the runs as numbers only)")
    if args.dry_run or args.max_runs is not None:
        raise UsageError("--recover trains exactly the runs it names; allowed: no --dry-run or --max-runs with it")
    run_ids = list(dict.fromkeys(r.strip() for r in args.recover.split(",") if r.strip()))
    threads = args.threads or None
    workers = args.workers if args.workers != AUTO else min(len(run_ids), max(1, usable_cpu_cores() // (threads or 1)))
    try:
        outcome = recover_runs(plan, out, args.ledger, run_ids, workers=workers, threads=threads)
    except KeyboardInterrupt:
        print(f"[recover] stopped by Ctrl-C; the lines recovered so far are in the ledger ({args.ledger}), and the "
              "same command goes on with the rest")
        return EXIT_INTERRUPTED
    print(f"[recover] {len(outcome.recovered)} recovered, {len(outcome.mismatched)} did not reproduce, "
          f"{len(outcome.failed)} failed, {len(outcome.had_curves)} had their curves already; ledger: {args.ledger}")
    return 0 if len(outcome.recovered) + len(outcome.had_curves) == len(run_ids) else 1


def run(args: argparse.Namespace) -> int:
    if args.threads < 0:
        raise UsageError(f"--threads={args.threads} is invalid: must be >= 0")
    if args.max_runs is not None and args.max_runs < 1:
        raise UsageError(f"--max-runs={args.max_runs} is invalid: must be >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out={args.out!r} is invalid: it exists and is not a directory")
    plan = load_plan(args.plan)
    if args.recover is not None:
        return _recover(args, plan, out)
    book = None if args.ledger is None else read_ledger(args.ledger)  # not a ledger: refused, one line
    # Resolve every run's config now, so a bad override fails before anything is written.
    index = load_index(out) if out.is_dir() else {}
    check_sweep_folder(plan, out, index)  # a sweep folder belongs to one plan: nothing replaced
    specs = plan.expand({**(ledger_records(book) if book is not None else {}), **index})
    for spec in specs:
        resolve_config(spec.preset, None, list(spec.overrides), init_from_layer=run_config_layer)
        check_run_settings(spec, out / RUNS_DIR / spec.run_id)  # a changed plan must not reuse old runs
    stored = stored_setup(out) or (ledger_precision_setup(book) if book is not None else None)
    setup = choose_setup(specs, args.workers, args.threads or None, stored=stored, earlier_runs=bool(index))
    if book is not None:
        check_ledger(plan, book, out, setup.precision)
    check_data_unchanged(specs, out / RUNS_DIR, book)  # before the setup line: a refusal is its only line
    print(f"[sweep] {setup.describe()}")
    if args.dry_run:
        status = {}
        for spec in specs:
            done = read_summary(out / RUNS_DIR / spec.run_id)
            if done is None and book is not None and spec.run_id in book.runs:
                done = book.runs[spec.run_id].get("summary") or {}
            status[spec.run_id] = "pending" if done is None else ("diverged" if done.get("diverged") else "done")
        pending = start_order([s for s in specs if status[s.run_id] == "pending"], plan, args.order,
                              resumable_runs(out / RUNS_DIR))
        for spec in [s for s in specs if status[s.run_id] != "pending"] + pending:
            print(f"{spec.run_id:<40} {spec.stage:<7} {status[spec.run_id]}")
        print(f"{len(specs)} runs now ({plan.protocol} protocol; more may follow the LR search); the finished first, "
              f"then the {len(pending)} pending in the order the sweep starts them")
        return 0
    try:
        with hold_run_folder(out):  # one sweep per folder at a time
            outcome = run_sweep(plan, out, workers=setup.workers, threads=setup.threads,
                                plan_text=Path(args.plan).read_text(), max_runs=args.max_runs,
                                order=args.order, precision=setup.precision, setup=setup.to_dict(),
                                plan_path=args.plan, ledger=args.ledger)
    except KeyboardInterrupt:
        print(f"[sweep] stopped by Ctrl-C; finished runs are kept, and the same command resumes the rest "
              f"(index: {out / 'index.json'})")
        return EXIT_INTERRUPTED
    print(f"[sweep] {len(outcome.executed)} runs trained ({len(outcome.diverged)} diverged, "
          f"{len(outcome.failed)} failed), {len(outcome.skipped)} already finished; "
          f"{outcome.wall_s:.1f} s; index: {out / 'index.json'}")
    return 1 if outcome.failed else 0
