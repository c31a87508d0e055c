"""``spannorm eval``: a checkpoint's loss, perplexity and bits per byte on a corpus, in one process or split
across the processes of a torchrun launch."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from spannorm.cli.eval_tasks import add_task_arguments, run_tasks
from spannorm.cli.main import UsageError
from spannorm.cli.train import collect_overrides
from spannorm.data.dataset import load_splits
from spannorm.data.shards import ShardedTokens, TokenStream
from spannorm.inference import load_for_inference
from spannorm.train.config import DataConfig, RunConfig, apply_overrides
from spannorm.train.distributed import DataParallel, SingleProcess, backend_for, launch_env
from spannorm.train.evaluation import evaluate


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="loss, perplexity and bits per byte of a checkpoint on a corpus",
        description="Evaluate a checkpoint (a run folder, a checkpoint folder or a model folder) on every "
                    "window of the validation split of its training data, or of other data given with "
                    "--data.path=FILE_OR_FOLDER (a text file or folder, or a dataset folder written by "
                    "`spannorm prepare`; any data.* field can be overridden). --split=all scores a whole "
                    "held-out file or dataset. The checkpoint's own tokenizer is always used, and a prepared "
                    "dataset must have been made with it. Under torchrun (`torchrun --nproc_per_node=N -m "
                    "spannorm eval ...`) each process scores its share of the windows and rank 0 prints the "
                    "result, the same as one process's.")
    p.add_argument("checkpoint", type=Path, help="run folder, checkpoint folder or model folder")
    p.add_argument("--split", choices=("val", "train", "all"), default="val",
                   help="val (default), train, or all: the two together, for a held-out file or dataset")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=0,
                   help="evaluate this many batches of evenly spaced, non-overlapping windows; 0 (default): "
                        "every window of the split")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="default: the run's train.device (auto: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_task_arguments(p)
    p.set_defaults(run=run, accepts_overrides=True)
    return p


def run(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return run_tasks(args)
    if args.batch_size < 1 or args.max_batches < 0:
        raise UsageError(f"--batch-size={args.batch_size} --max-batches={args.max_batches} are invalid: "
                         "allowed: a batch size >= 1 and max-batches >= 0 (0: the whole split)")
    overrides = collect_overrides(getattr(args, "overrides", None))
    for text in overrides:
        if not text.startswith("data."):
            raise UsageError(f"override {text!r} is not allowed here; allowed: data.* fields (the model comes "
                             "from the checkpoint)")
    model, run_cfg, tokenizer, ckpt = load_for_inference(args.checkpoint, device="cpu")
    device = args.device or (run_cfg.train.device if run_cfg is not None else "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda is invalid: no CUDA device is available; allowed: --device=cpu")
    with eval_processes(torch.device(device)) as (parallel, placed):
        model.to(placed)
        base = run_cfg.data if run_cfg is not None else DataConfig()
        data = apply_overrides({"data": dataclasses.asdict(base)}, overrides)
        data_cfg = RunConfig.from_dict(data).data
        with parallel.rank_zero_first():  # rank 0 may fill the token cache that the others then read
            _, splits = load_splits(data_cfg, tokenizer=tokenizer)
        tokens: TokenStream
        if args.split == "all":
            tokens = ShardedTokens([part for part in (splits.train, splits.val) if len(part)])
            n_bytes = splits.train_bytes + splits.val_bytes
        else:
            tokens = splits.split(args.split)
            n_bytes = splits.val_bytes if args.split == "val" else splits.train_bytes
        context = model.cfg.context_length
        if len(tokens) < context + 1:
            raise UsageError(f"the {args.split} split of {splits.source!r} has {len(tokens)} tokens, fewer than "
                             f"one window of {context + 1}; allowed: a longer corpus")
        result = evaluate(model, tokens, context, args.batch_size, max_batches=args.max_batches or None,
                          bytes_per_token=n_bytes / len(tokens), device=placed, precision=args.precision,
                          parallel=parallel)
    if not parallel.is_main:
        return 0
    report = {"checkpoint": str(ckpt), "corpus": splits.source, "corpus_sha256": splits.corpus_hash,
              "split": args.split, "device": device,
              "processes": parallel.world_size, "loss": result.loss,
              "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte, "tokens": result.tokens}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{ckpt}: {args.split} split of {splits.source}: loss {result.loss:.4f}  perplexity "
              f"{result.perplexity:.3f}  bits/byte {result.bits_per_byte:.4f}  ({result.tokens} tokens)")
    return 0


@contextlib.contextmanager
def eval_processes(device: torch.device) -> Iterator[tuple[SingleProcess, torch.device]]:
    """The parallel context and device of this process: one process outside torchrun; under torchrun with
    several processes, this process's place in a process group (made here unless one exists, NCCL on CUDA
    with ``cuda:LOCAL_RANK``, gloo on CPU, and destroyed on the way out). The model is not wrapped:
    evaluation only sums losses across the processes."""
    env = launch_env()
    if env is None or env.world_size == 1:
        yield SingleProcess(), device
        return
    parallel = DataParallel("ddp", env.rank, env.world_size, env.local_rank)
    placed = parallel.place(device)
    made_group = not dist.is_initialized()
    if made_group:
        dist.init_process_group(backend_for(placed), device_id=placed if placed.type == "cuda" else None)
    try:
        yield parallel, placed
    finally:
        if made_group:
            dist.destroy_process_group()
