"""``spannorm eval RUN --tasks ...``: downstream tasks through lm-evaluation-harness (the ``eval`` extra).

Kept apart from ``cli/eval.py`` (corpus loss and perplexity): ``eval`` adds these options and hands over to
:func:`run_tasks` when ``--tasks`` is given."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from spannorm.cli.main import UsageError, seed_arg
from spannorm.inference import load_for_inference, run_device

EXTRA_HINT = "pip install 'spannorm[eval]' (lm-eval)"


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("downstream tasks (lm-evaluation-harness, the optional extra 'eval')")
    group.add_argument("--tasks", default=None,
                       help="comma-separated lm-eval task, group or tag names, or task YAML files (for example "
                            "hellaswag,arc_easy,piqa,lambada_openai); replaces the corpus evaluation")
    group.add_argument("--include-path", type=Path, default=None,
                       help="a folder of extra task YAML files, for example local tasks; when every task "
                            "named is found there, lm-eval's built-in tasks are not indexed")
    group.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    group.add_argument("--limit", type=float, default=None,
                       help="evaluate only this many documents per task (a fraction if < 1), for quick checks")
    group.add_argument("--seed", type=seed_arg, default=0, help="seeds lm-eval's sampling of few-shot examples")


def run_tasks(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError(f"--tasks={args.tasks!r} is invalid: allowed a comma-separated list of task names")
    if getattr(args, "overrides", None):
        raise UsageError(f"{' '.join(args.overrides)}: config overrides are not allowed with --tasks")
    if args.include_path is not None and not args.include_path.is_dir():
        raise UsageError(f"--include-path={str(args.include_path)!r} is invalid: no such folder")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot={args.num_fewshot} is invalid: must be >= 0")
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise UsageError(f"--limit={args.limit} is invalid: allowed a finite number > 0")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size} is invalid: must be >= 1")
    device, note = run_device(args.checkpoint, args.device)
    if note:
        print(note, file=sys.stderr)
    model, _, tokenizer, ckpt = load_for_inference(args.checkpoint, device=device)
    try:
        # optional dependency: the 'eval' extra (lm_eval_adapter imports lm_eval at its top)
        from spannorm.inference import lm_eval_adapter
    except ImportError as err:
        raise UsageError(f"--tasks needs lm-evaluation-harness, which is not installed ({err.name or err}); "
                         f"install it with {EXTRA_HINT}") from None
    manager = lm_eval_adapter.task_manager(tasks, args.include_path)
    unknown = lm_eval_adapter.unknown_tasks(tasks, manager)
    if unknown:
        raise UsageError(f"--tasks: unknown task {', '.join(map(repr, unknown))}; allowed: an lm-eval task, group "
                         "or tag name (lm-eval ls tasks), a task YAML file, or a task under --include-path")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = lm_eval_adapter.evaluate_tasks(model, tokenizer, tasks, manager, batch_size=args.batch_size,
                                             num_fewshot=args.num_fewshot, limit=limit, seed=args.seed)
    # lm-eval names each score "metric,filter" (for example "acc,none"), beside counts and an alias.
    table = {task: {k: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
             for task, metrics in results["results"].items()}
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "tasks": table, "n_samples": results.get("n-samples", {})}))
        return 0
    for task, metrics in table.items():
        sys.stdout.write(f"{ckpt}: {task}: {format_scores(metrics)}\n")
    return 0


def format_scores(metrics: dict[str, float]) -> str:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1}`` as ``acc 0.5000 ± 0.1000``; a filter other than
    ``none`` is named in brackets."""
    shown = []
    for key, value in metrics.items():
        name, _, filter_name = key.partition(",")
        if name.endswith("_stderr"):
            continue
        label = name if filter_name == "none" else f"{name} ({filter_name})"
        stderr = metrics.get(f"{name}_stderr,{filter_name}")
        shown.append(f"{label} {value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) else ""))
    return "  ".join(shown)
