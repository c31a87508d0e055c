"""``spannorm train``: train a model from a preset and/or a YAML config, with dotted overrides."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from spannorm.cli.main import UsageError
from spannorm.interop.init_from import run_config_layer
from spannorm.launch import train
from spannorm.train.config import preset_names, resolve_config
from spannorm.train.distributed import is_main_process
from spannorm.train.layout import RunFolder
from spannorm.train.run_lock import LOCK_NAME, hold_run_folder

EXIT_DIVERGED = 3
"""Exit status of a run that stopped on a non-finite loss or gradient (bad input is 2)."""
EXIT_INTERRUPTED = 130
"""Exit status of a run stopped by Ctrl-C (after a checkpoint; resumable)."""


def collect_overrides(extra: list[str] | None) -> list[str]:
    """Turn leftover command-line words (``--model.n_layers=24`` or ``--optim.lr 1e-3``) into
    ``section.field=value`` strings. Unknown keys are caught when the config is resolved, whose message lists
    what is allowed."""
    words = list(extra or [])
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or word == "--":
            raise UsageError(f"unexpected argument {word!r}; overrides look like --section.field=value "
                             "(sections: model, data, optim, train)")
        key = word[2:]
        if "=" in key:
            out.append(key)
            i += 1
            continue
        if "." not in key:
            raise UsageError(f"unknown option {word!r}; allowed: the options in --help, or config overrides "
                             "--section.field=value (sections: model, data, optim, train)")
        if i + 1 >= len(words) or words[i + 1].startswith("--"):
            raise UsageError(f"override {word!r} has no value; write {word}=VALUE")
        out.append(f"{key}={words[i + 1]}")
        i += 2
    return out


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model (presets, YAML configs, --section.field=value overrides)",
        description="Train a decoder-only LM. The config is the defaults, then --preset, then --config, then "
                    "any --section.field=value overrides (sections: model, data, optim, train), e.g. "
                    "--model.placement=span --optim.lr=3e-3. See docs/training.md.",
        epilog=f"presets: {', '.join(preset_names())}")
    p.add_argument("--preset", help="a named preset: " + ", ".join(preset_names()))
    p.add_argument("--config", type=Path, help="a YAML file with model/data/optim/train sections")
    p.add_argument("--out", type=Path, required=True, help="the run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (its config.yaml is the base "
                        "config unless --preset/--config are given)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--use-intact", action="store_true",
                   help="with --resume: when the latest checkpoint is damaged, continue from the newest intact one "
                        "(without it, a damaged checkpoint is refused and the intact one named)")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from these weights (train.init_from): a spannorm model/checkpoint/run folder or a "
                        "Hugging Face Llama/Mistral/Qwen2 folder; see docs/interop.md")
    p.set_defaults(run=run, accepts_overrides=True)
    return p


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other; allowed: one of them")
    if args.use_intact and not args.resume:
        raise UsageError("--use-intact applies to --resume only; allowed: --resume --use-intact")
    if args.resume and not (args.out.is_dir() and any(p.name != LOCK_NAME for p in args.out.iterdir())):
        raise UsageError(f"--resume: {str(args.out)!r} holds no run to continue; allowed: drop --resume to start "
                         "a new run there, or name the run folder")
    overrides = collect_overrides(getattr(args, "overrides", None))
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    config_file = args.config
    if args.resume and not args.preset and not config_file and RunFolder(args.out).config.is_file():
        config_file = args.out  # the run folder: its config.yaml, read as a saved config
    cfg = resolve_config(args.preset, config_file, overrides, init_from_layer=run_config_layer)
    lock = hold_run_folder(args.out) if is_main_process() else contextlib.nullcontext()
    with lock:  # one process per run folder; a refused start leaves the folder as it was
        summary = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, use_intact=args.use_intact)
    if is_main_process():  # under torchrun, rank 0 speaks for every process
        print(json.dumps(summary.to_dict()))
    if summary.diverged:
        if is_main_process():
            print(f"spannorm: training diverged: {summary.message}", file=sys.stderr)
        return EXIT_DIVERGED
    if summary.status == "interrupted":
        print(f"spannorm: {summary.message}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
