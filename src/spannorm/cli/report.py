"""``spannorm report DIR [DIR ...]``: markdown tables, Welch tests and PNG plots from finished sweeps."""

from __future__ import annotations

import argparse
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
                    "per-layer moments and gradients after training, and Welch's t-test of SpanNorm against "
                    "the best baseline. Several directories are merged (e.g. a study and its extras).")
    p.add_argument("sweeps", nargs="+", help="sweep directories (each with plan.yaml and index.json)")
    p.add_argument("--out", default=None, help="report directory (default: FIRST_SWEEP/report)")
    p.add_argument("--title", default="Study report", help="the report's title")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    for path in args.sweeps:
        folder = Path(path)
        if not (folder / "plan.yaml").is_file() or not (folder / "index.json").is_file():
            raise UsageError(f"{path!r} is not a sweep directory: it needs plan.yaml and index.json "
                             "(written by `spannorm sweep PLAN --out DIR`)")
    results = load_results(args.sweeps)
    if not results.runs:
        raise UsageError(f"no finished run in {', '.join(args.sweeps)}: run `spannorm sweep` first")
    out = Path(args.out) if args.out else Path(args.sweeps[0]) / "report"
    report = build_report(results, out, title=args.title)
    print(f"[report] {report}")
    return 0
