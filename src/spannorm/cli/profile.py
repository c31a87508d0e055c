"""``spannorm profile``: build models and print their init profiles across depth."""

from __future__ import annotations

import argparse
import json

from spannorm.cli.main import UsageError, seed_arg
from spannorm.config import PLACEMENTS, ModelConfig, tool_model_settings
from spannorm.diagnostics.profile import random_init_profile


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="print init profiles (stream-variance ratio, first-to-last gradient ratio) per placement",
        description="Build each placement at each depth with the default width-aware init (SPEC §3) and print "
                    "Var(x_L)/Var(x_0) and ||dL/dx_0|| / ||dL/dx_{L-1}|| on random tokens.")
    p.add_argument("--placements", default=",".join(PLACEMENTS), help="comma-separated placements (default: all)")
    p.add_argument("--depths", type=_int_list, default=[16, 64, 128], help="comma-separated depths")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ModelConfig field, e.g. --set scale_out_proj=false (parsed as spannorm "
                        "train's --model.KEY=VALUE)")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    placements = [p for p in args.placements.split(",") if p]
    extra = tool_model_settings(args.overrides)
    fixed = {"d_model", "n_heads", "n_layers", "placement"} & set(extra)
    if fixed:
        raise UsageError(f"--set {sorted(fixed)[0]} is not allowed: use the dedicated option instead")
    rows = []
    for placement in placements:
        cells = []
        for depth in args.depths:
            cfg = ModelConfig.from_dict(dict(dict(context_length=64), d_model=args.d_model, n_heads=args.n_heads,
                                             n_layers=depth, placement=placement, **extra))
            prof = random_init_profile(cfg, seed=args.seed)
            cells.append((prof.variance_ratio, prof.grad_ratio))
            if args.format == "json":
                print(json.dumps({"placement": placement, "n_layers": depth, "d_model": args.d_model,
                                  **extra, "variance_ratio": prof.variance_ratio, "grad_ratio": prof.grad_ratio}))
        rows.append((placement, cells))
    if args.format == "table":
        print(f"init profiles (d={args.d_model}, random tokens, seed {args.seed}"
              f"{', ' + str(extra) if extra else ''}): Var(x_L)/Var(x_0) | grad ratio x_0/x_(L-1)")
        print(f"{'placement':<10}" + "".join(f"{'L=' + str(L):>22}" for L in args.depths))
        for placement, cells in rows:
            print(f"{placement:<10}" + "".join(f"{v:>10.3g} | {g:<9.3g}" for v, g in cells))
    elif args.format == "markdown":
        print("| placement | " + " | ".join(f"L={L}: var ratio | L={L}: grad ratio" for L in args.depths) + " |")
        print("|---|" + "---|---|" * len(args.depths))
        for placement, cells in rows:
            print(f"| `{placement}` | " + " | ".join(f"{v:.3g} | {g:.3g}" for v, g in cells) + " |")
    return 0
