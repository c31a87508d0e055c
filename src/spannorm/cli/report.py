"""``spannorm report DIR [DIR ...]``: markdown tables, Welch tests and PNG plots from finished sweeps."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spannorm.cli.main import UsageError
from spannorm.experiments.report import build_report
from spannorm.experiments.results import load_results


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="write the study report (tables, p-values, plots) of one or more sweep directories",
        description="Read the sweep directories written by `spannorm sweep` and write report.md, results.csv, "
                    "results.json and PNG plots: val loss vs depth per placement (mean ± std over seeds, at "
                    "each placement's best LR and at the shared LR), loss curves, a divergence table, "
                    "per-layer moments and gradients after training, Welch's t-test of SpanNorm against "
                    "the best baseline, the corpus's byte-unigram loss (did the models learn?), the LR "
                    "searches and their bracketing, and each plan's pre-registered comparison. Several "
                    "directories are merged (e.g. a study and its extras); directories on different corpora "
                    "are reported side by side, with a ranking table per depth. What each section means: "
                    "docs/sweeps.md.")
    p.add_argument("sweeps", nargs="+", help="sweep directories (each with plan.yaml and index.json) or sweep "
                                               "ledgers (`spannorm sweep --ledger FILE`)")
    p.add_argument("--out", default=None, help="report directory (default: FIRST_SWEEP/report, or "
                                                  "LEDGER_STEM-report beside a ledger file)")
    p.add_argument("--title", default="Study report", help="the report's title")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.set_defaults(run=run)
    return p


REPORT_FILES = ("report.md", "results.csv", "results.json")


def check_report_out(out: Path, overwrite: bool) -> None:
    """Refuse (before anything is read or written) an --out that is a file, is not writable, or already
    holds a report while ``overwrite`` is off."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; allowed: a folder")
    existing = [name for name in REPORT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise UsageError(f"--out {str(out)!r} already holds a report ({existing[0]}); allowed: --overwrite to "
                         "replace it, or another --out")
    nearest = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"--out {str(out)!r} is not writable ({str(nearest)!r} is read-only); allowed: a "
                         "writable folder")


def run(args: argparse.Namespace) -> int:
    for path in args.sweeps:
        folder = Path(path)
        if folder.is_file():
            continue  # a ledger file: load_results says what is wrong with it, in one line
        if not (folder / "plan.yaml").is_file() or not (folder / "index.json").is_file():
            raise UsageError(f"{path!r} is not a sweep directory: it needs plan.yaml and index.json "
                             "(written by `spannorm sweep PLAN --out DIR`), or a ledger file (`--ledger FILE`)")
    first = Path(args.sweeps[0])
    out = Path(args.out) if args.out else (first.with_name(f"{first.stem}-report") if first.is_file()
                                           else first / "report")
    check_report_out(out, args.overwrite)
    try:
        results = load_results(args.sweeps)
    except FileNotFoundError as err:  # a file that is no sweep ledger
        raise UsageError(str(err)) from None
    if not results.runs:
        raise UsageError(f"no finished run in {', '.join(args.sweeps)}: run `spannorm sweep` first")
    report = build_report(results, out, title=args.title)
    print(f"[report] {report}")
    return 0
