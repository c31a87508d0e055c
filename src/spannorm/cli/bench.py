"""``spannorm bench``: time training steps of placements, dense and MoE, eager and compiled, fp32 and bf16,
beside a Hugging Face Llama of the same size, and print (and optionally write) the measurements as a table
and JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from spannorm.bench.harness import DTYPES, FFNS, BenchSettings, format_report, model_config, plan_cases, run_bench
from spannorm.bench.reference import transformers_available
from spannorm.cli.main import UsageError, seed_arg
from spannorm.config import PLACEMENT_NAMES, PLACEMENTS, tool_model_settings
from spannorm.configuration import ConfigError, as_flags, build

MODES = ("eager", "compiled")

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, vocab_size=256, seq_len=32, batch_size=4),
    "cpu": dict(d_model=256, n_layers=4, n_heads=4, vocab_size=256, seq_len=128, batch_size=8),
    "gpt2-124m": dict(d_model=768, n_layers=12, n_heads=12, vocab_size=50304, seq_len=1024, batch_size=16),
}
"""Model and batch sizes by name. ``gpt2-124m``: GPT-2 small's width, depth, heads, (padded) vocabulary and
context, with a SwiGLU FFN of the same parameter count as GPT-2's 4x MLP: 124M parameters, tied head."""


def parse_list(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """Comma-separated values of ``flag``, each one of ``allowed``, duplicates dropped; else UsageError."""
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise UsageError(f"{flag}={(bad[0] if bad else text)!r} is invalid: allowed: {', '.join(allowed)}")
    return values


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="time training steps (step time, tokens/s, peak memory, MFU) against a HF Llama",
        description="Time forward+backward+AdamW steps of each placement, dense and MoE, eager and compiled, "
                    "fp32 and bf16 autocast, beside a Hugging Face LlamaForCausalLM of the same size (when "
                    "transformers is installed). Cases are timed in interleaved rounds in one process, so "
                    "that load from other processes falls on all of them alike. MFU divides by the device's "
                    "dense peak from a built-in table (CUDA), or by --peak-tflops; on a CPU, against "
                    "a peak measured by a calibration matmul per dtype and thread count (labelled measured).")
    p.add_argument("--placements", default="pre,span", help="comma-separated placements (default: pre,span)")
    p.add_argument("--ffn", default="dense", help="comma-separated FFN kinds: dense, moe (default: dense)")
    p.add_argument("--modes", default="eager",
                   help="comma-separated execution modes: eager, compiled (torch.compile) (default: eager)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: fp32, bf16 (autocast) (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--reference", choices=("auto", "on", "off"), default="auto",
                   help="time a Hugging Face LlamaForCausalLM of the same size: auto (when transformers is "
                        "installed), on (error if it is not), off")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu",
                   help="model and batch size preset; the options below override single fields "
                        + "; ".join(f"{k}: {v}" for k, v in SIZES.items()))
    for name in ("d_model", "n_layers", "n_heads", "vocab_size", "seq_len", "batch_size"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--n-kv-heads", type=int, default=None, help="key/value heads (default: n_heads)")
    p.add_argument("--d-ff", type=int, default=None, help="SwiGLU width (default: 8/3 d_model rounded to 16)")
    p.add_argument("--untied", action="store_true", help="untie the LM head from the embedding")
    p.add_argument("--n-experts", type=int, default=8, help="experts per MoE layer (default: 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case, compilation included")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the timed steps are split into")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU, overriding the device table (CUDA) or the measured peak (CPU)")
    p.add_argument("--tf32", action="store_true", help="CUDA: let fp32 matmuls use TF32 (MFU vs the TF32 peak)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ModelConfig field of the spannorm cases, e.g. --set norm=layer (parsed as "
                        "spannorm train's --model.KEY=VALUE; not applied to the Hugging Face reference)")
    p.add_argument("--out", type=Path, default=None, help="write the full report as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)
    return p


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device={text!r} is invalid: allowed: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device={text!r} is invalid: allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={text!r} is invalid: this torch ({torch.__version__}) sees no CUDA device")
    return device


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Validated settings; raises :class:`UsageError` or :class:`~spannorm.config.ConfigError` naming the
    first bad option."""
    size = dict(SIZES[args.size])
    for name in size:
        if getattr(args, name) is not None:
            size[name] = getattr(args, name)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads={args.threads} is invalid: must be >= 1")
    device = _device(args.device)
    model_overrides = tool_model_settings(args.overrides)
    settings = dict(
        **size, n_kv_heads=args.n_kv_heads, d_ff=args.d_ff, tie_embeddings=not args.untied,
        n_experts=args.n_experts, top_k=args.top_k, warmup=args.warmup, steps=args.steps, rounds=args.rounds,
        device=str(device), seed=args.seed, peak_tflops=args.peak_tflops, allow_tf32=args.tf32,
        model_overrides=model_overrides)
    flags = {name: "--" + name.replace("_", "-") for name in settings if name not in ("model_overrides",
                                                                                         "tie_embeddings")}
    try:
        return build(BenchSettings, settings)
    except ConfigError as err:
        raise as_flags(err, flags | {"allow_tf32": "--tf32"}) from None


def run(args: argparse.Namespace) -> int:
    args.placements = parse_list("--placements", args.placements, PLACEMENTS)
    args.ffn = parse_list("--ffn", args.ffn, FFNS)
    args.modes = parse_list("--modes", args.modes, MODES)
    if args.dtypes is not None:
        args.dtypes = parse_list("--dtypes", args.dtypes, DTYPES)
    settings = settings_from_args(args)
    if args.reference == "on" and not transformers_available():
        raise UsageError("--reference=on needs the transformers package: pip install 'spannorm[hf]'")
    reference = args.reference == "on" or (args.reference == "auto" and transformers_available())
    dtypes = args.dtypes or (["bf16"] if settings.device.startswith("cuda") else ["fp32"])
    for placement in args.placements:  # every case's config is validated before anything runs
        for ffn in args.ffn:
            model_config(settings, placement, ffn)
    if args.out is not None:  # every way the report could not be written is found before the run
        if args.out.is_dir():
            raise UsageError(f"--out={args.out} is a folder; allowed: the path of a JSON file, e.g. "
                             f"{args.out / 'bench.json'}")
        if args.out.exists() and not args.overwrite:
            raise UsageError(f"--out={args.out} exists; pass --overwrite to replace it")
        if not args.out.parent.is_dir():
            raise UsageError(f"--out={args.out} is invalid: directory {args.out.parent} does not exist")
        if not os.access(args.out.parent, os.W_OK | os.X_OK):
            raise UsageError(f"--out={args.out} is not writable ({args.out.parent} is read-only); allowed: a "
                             "file in a writable folder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = plan_cases(args.placements, args.ffn, [m == "compiled" for m in args.modes], dtypes, reference)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr))
    report = run_bench(settings, cases, log=log)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report.meta = {"command": command_line(args, dtypes), "created_utc": created,
                   "placement_names": PLACEMENT_NAMES}
    print(format_report(report))
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


def command_line(args: argparse.Namespace, dtypes: list[str]) -> str:
    """A ``spannorm bench`` command that repeats this run (every option that is not at its default)."""
    parts = ["spannorm", "bench", "--placements", ",".join(args.placements), "--ffn", ",".join(args.ffn),
             "--modes", ",".join(args.modes), "--dtypes", ",".join(dtypes), "--size", args.size]
    defaults = {"reference": "auto", "n_experts": 8, "top_k": 2, "warmup": 3, "steps": 10, "rounds": 5,
                "device": "auto", "seed": 0}
    for name in ("reference", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "seq_len",
                 "batch_size", "n_experts", "top_k", "warmup", "steps", "rounds", "device", "threads",
                 "peak_tflops", "seed"):
        value = getattr(args, name)
        if value is not None and value != defaults.get(name):
            parts += [f"--{name.replace('_', '-')}", str(value)]
    for text in args.overrides:
        parts += ["--set", text]
    if args.untied:
        parts.append("--untied")
    if args.tf32:
        parts.append("--tf32")
    if args.out is not None:
        parts += ["--out", str(args.out)]
    return shlex.join(parts)
