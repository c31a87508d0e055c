"""``spannorm generate``: sample text from a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spannorm.cli.main import UsageError


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="sample text from a checkpoint (prompt, temperature, top-k)",
        description="Continue a prompt with a checkpoint (a run folder, a checkpoint folder or a model folder) "
                    "and print the prompt followed by the sampled text.")
    p.add_argument("checkpoint", type=Path, help="run folder, checkpoint folder or model folder")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from spannorm.train.checkpoint import load_for_inference
    from spannorm.train.generation import generate

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} is invalid: must be >= 0")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature={args.temperature} is invalid: must be >= 0")
    if args.top_k < 0:
        raise UsageError(f"--top-k={args.top_k} is invalid: must be >= 0 (0: no top-k)")
    if not args.prompt:
        raise UsageError("--prompt is empty; allowed: any non-empty text")
    model, _, tokenizer, _ = load_for_inference(args.checkpoint, device=args.device)
    prompt_ids = [int(i) for i in tokenizer.encode(args.prompt.encode("utf-8"))]
    if not prompt_ids:
        raise UsageError("--prompt encodes to no tokens; allowed: any non-empty text")
    generator = torch.Generator().manual_seed(args.seed)
    new_ids = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, generator=generator)
    sys.stdout.write(tokenizer.decode(prompt_ids + new_ids) + "\n")
    return 0
