"""``spannorm generate``: sample text from a checkpoint, with a KV cache, for one or many prompts."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from spannorm.cli.main import UsageError, seed_arg
from spannorm.inference import Sampling, generate_batch, load_for_inference, run_device


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="sample text from a checkpoint (prompts, temperature, top-k, top-p, stops)",
        description="Continue prompts with a checkpoint (a run folder, a checkpoint folder or a model folder) "
                    "and print each prompt followed by its sampled text. Generation uses a KV cache and runs "
                    "on the run's device unless --device says otherwise; the speed goes to stderr.")
    p.add_argument("checkpoint", type=Path, help="run folder, checkpoint folder or model folder")
    p.add_argument("--prompt", action="append", default=None,
                   help="a text to continue; repeat for several prompts (default: a newline)")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="a UTF-8 text file, one prompt per line (empty lines skipped); adds to --prompt")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0: all")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the most likely tokens whose probability reaches p (0 < p <= 1; 1: all)")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a sample when this text appears in it (cut before it); repeatable")
    p.add_argument("--stop-token", action="append", type=int, default=[], metavar="ID",
                   help="stop a sample after this token id; repeatable")
    p.add_argument("--batch-size", type=int, default=16, help="samples generated together")
    p.add_argument("--no-cache", action="store_true", help="re-run the window for every token (slow)")
    p.add_argument("--seed", type=seed_arg, default=0, help="sample r (prompt by prompt) draws with seed + r")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="default: the run's device (CPU with a note when CUDA is not available)")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample")
    p.set_defaults(run=run)
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        path = args.prompts_file
        if not path.is_file():
            raise UsageError(f"--prompts-file={str(path)!r} is invalid: no such file; allowed: a UTF-8 text file")
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"--prompts-file={str(path)!r} is invalid: line {number} is not UTF-8; "
                                 "allowed: a UTF-8 text file, one prompt per line") from None
            if text.strip():
                prompts.append(text)
        if not prompts:
            raise UsageError(f"--prompts-file={str(path)!r} is invalid: it holds no prompt; allowed: one "
                             "prompt per line")
    return prompts or ["\n"]


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} is invalid: must be >= 0")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature={args.temperature} is invalid: allowed a finite number >= 0")
    if args.top_k < 0:
        raise UsageError(f"--top-k={args.top_k} is invalid: must be >= 0 (0: no top-k)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p={args.top_p} is invalid: allowed 0 < p <= 1")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UsageError(f"--num-samples={args.num_samples} --batch-size={args.batch_size} are invalid: "
                         "allowed: integers >= 1")
    if any(not s for s in args.stop):
        raise UsageError("--stop is empty; allowed: any non-empty text")


def encode_prompts(prompts: list[str], tokenizer) -> list[list[int]]:
    encoded = []
    for index, text in enumerate(prompts, start=1):
        if not text:
            raise UsageError("--prompt is empty; allowed: any non-empty text")
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line arrive as surrogates
            raise UsageError(f"prompt {index} is invalid: not UTF-8; allowed: UTF-8 text") from None
        ids = [int(i) for i in tokenizer.encode(raw)]
        if not ids:
            raise UsageError(f"prompt {index} encodes to no tokens; allowed: any non-empty text")
        encoded.append(ids)
    return encoded


def run(args: argparse.Namespace) -> int:
    check_args(args)
    prompts = read_prompts(args)
    device, note = run_device(args.checkpoint, args.device)
    if note:
        print(note, file=sys.stderr)
    model, _, tokenizer, _ = load_for_inference(args.checkpoint, device=device)
    vocab = model.cfg.vocab_size
    if any(not 0 <= t < vocab for t in args.stop_token):
        raise UsageError(f"--stop-token={args.stop_token} is invalid: allowed token ids 0 to {vocab - 1}")
    prompt_ids = encode_prompts(prompts, tokenizer)
    sampling = Sampling(args.temperature, args.top_k or None, args.top_p)
    result = generate_batch(model, prompt_ids, args.max_new_tokens, sampling, n=args.num_samples,
                            seed=args.seed, stop_tokens=args.stop_token, stop_strings=args.stop,
                            decode=tokenizer.decode, use_cache=not args.no_cache, batch_size=args.batch_size)
    several = len(result.completions) > 1
    for completion in result.completions:
        text = tokenizer.decode(completion.tokens)
        for stop in args.stop:
            text = text.split(stop, 1)[0]
        ids = prompt_ids[completion.prompt_index]
        if args.json:
            print(json.dumps({"prompt": completion.prompt_index, "sample": completion.sample_index,
                              "text": text, "tokens": completion.tokens, "stop": completion.stop}))
            continue
        if several:
            print(f"=== prompt {completion.prompt_index + 1}, sample {completion.sample_index + 1} "
                  f"(stop: {completion.stop})")
        shown = tokenizer.decode(ids) + text if args.stop else tokenizer.decode(ids + completion.tokens)
        sys.stdout.write(shown + "\n")
    print(f"{result.new_tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
          f"({len(result.completions)} samples, {'no cache' if args.no_cache else 'KV cache'}, {device})",
          file=sys.stderr)
    return 0
