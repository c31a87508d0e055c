"""``spannorm check TARGET [TARGET ...]``: screen placements or a user's block for stability (SPEC §6)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from spannorm.cli.main import UsageError, seed_arg
from spannorm.config import tool_model_settings
from spannorm.configuration import ConfigError, as_flags, build
from spannorm.diagnostics.check import CheckError, CheckSettings, run_check
from spannorm.diagnostics.report import REPORT_JSON, REPORT_MD, format_run, write_report


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "depths", "steps", "d_model", "n_heads", "seq_len", "batch_size", "lr", "clip", "weight_decay", "band", "seed",
    "device")} | {"warmup_steps": "--warmup"}
"""The option that sets each CheckSettings field, so that a refused value is named as the user wrote it."""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "check", help="screen placements or your own block for stability at init and after a short run",
        description="Measure each TARGET at every depth at init and after --steps training steps on the "
                    "embedded corpus, beside the theory's predictions; print verdicts and write report.json, "
                    "report.md and plots to --out. TARGET is a placement name, 'all', or package.module:factory "
                    "where factory(d_model, n_heads, layer_index, n_layers) returns an nn.Module mapping "
                    "(B, T, d) to (B, T, d). Placements use the library's default config (e.g. pre scales its "
                    "output projections by 1/sqrt(2L)); change it with --set.")
    p.add_argument("targets", nargs="+", metavar="TARGET")
    p.add_argument("--depths", type=_int_list, default=[4, 16, 64], help="comma-separated depths (default 4,16,64)")
    p.add_argument("--steps", type=int, default=50, help="training steps after init (default 50; 0: init only)")
    p.add_argument("--out", required=True, help="output folder (must not already hold a report)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any verdict is unstable")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps/10)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip threshold (0: none)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--band", type=float, default=4.0,
                   help="growth, gradient ratio and identity product are judged against [1/band, band]")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config field for placement targets, e.g. --set scale_out_proj=false (parsed as "
                        "spannorm train's --model.KEY=VALUE)")
    p.add_argument("--path", action="append", default=[], metavar="DIR",
                   help="import package.module:factory from DIR (repeatable); without it, only modules already "
                        "importable are found (the current folder is not searched)")
    p.add_argument("--no-suggest", action="store_true", help="skip the Δt/α stability criterion")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; name a folder")
    if not args.overwrite and any((out / name).exists() for name in (REPORT_JSON, REPORT_MD)):
        raise UsageError(f"--out {str(out)!r} already holds a report; allowed: --overwrite or another folder")
    model_overrides = tool_model_settings(args.overrides)
    try:
        settings = build(CheckSettings, dict(
            depths=args.depths, steps=args.steps, d_model=args.d_model, n_heads=args.n_heads, seq_len=args.seq_len,
            batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, clip=args.clip,
            weight_decay=args.weight_decay, seed=args.seed, band=args.band, model_overrides=model_overrides,
            device=args.device, suggest=not args.no_suggest))
    except ConfigError as err:
        raise as_flags(err, FLAGS) from None
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads} is invalid: must be >= 1")
        torch.set_num_threads(args.threads)
    for folder in args.path:
        if not Path(folder).is_dir():
            raise UsageError(f"--path {folder!r} is not a folder; allowed: the folder that holds your module")
    # A user's module is imported only from where the user says: the working folder (which `python -m` puts
    # first on sys.path) is dropped, and each --path folder is put first.
    sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]
    for folder in reversed(args.path):
        sys.path.insert(0, str(Path(folder).resolve()))
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(f"[check] {msg}", file=sys.stderr, flush=True))
    try:
        result = run_check(args.targets, settings, log)
    except CheckError as err:
        raise UsageError(str(err)) from None
    write_report(result, out)
    print(format_run(result))
    print(f"\nwrote {out / REPORT_JSON}, {out / REPORT_MD} and plots")
    return 1 if args.strict and result.overall == "unstable" else 0
