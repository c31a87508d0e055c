"""``spannorm import-hf`` and ``spannorm export-hf``: Hugging Face Llama-style checkpoints in and out."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from spannorm.cli.main import UsageError
from spannorm.interop.errors import InteropError, require_transformers
from spannorm.interop.hf_export import export_model, llama_incompatibilities
from spannorm.interop.hf_import import (
    HF_CONFIG,
    SOURCE_HF_CONFIG,
    copy_tokenizer_files,
    import_hf,
    is_remote_code_export,
    read_hf_config,
)
from spannorm.interop.init_from import resolve_checkpoint_dir
from spannorm.interop.output_dir import check_writable, write_directory
from spannorm.interop.parity import max_logit_difference
from spannorm.model.io import load_model, save_model

PARITY_TOLERANCE = 1e-4
"""max |logit difference| in fp32 that ``--check`` accepts."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``20KiB`` or a plain integer."""
    match = _SIZE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5GB, 200MB or 1048576, got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def register(subparsers) -> argparse.ArgumentParser:
    imp = subparsers.add_parser(
        "import-hf", help="convert a local Hugging Face Llama/Mistral/Qwen2 checkpoint into a spannorm model",
        description="Read config.json and safetensors (sharded or not) from HF_DIR and write a spannorm model "
                    "directory (model.safetensors + model_config.json, placement pre) with the tokenizer files "
                    "and the original config as source_hf_config.json. Needs no transformers, except --check.")
    imp.add_argument("hf_dir", metavar="HF_DIR", type=Path)
    imp.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="directory to write")
    imp.add_argument("--context-length", type=int, default=None,
                     help="rotary table length (default: max_position_embeddings, capped at a sliding window)")
    imp.add_argument("--check", action="store_true",
                     help="before writing, compare logits with transformers on random tokens "
                          f"(fails above {PARITY_TOLERANCE:g})")
    imp.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if it exists")
    imp.set_defaults(run=run_import)

    exp = subparsers.add_parser(
        "export-hf", help="write a spannorm model as a Hugging Face checkpoint (any placement, dense or MoE)",
        description="Write the spannorm model in MODEL_DIR to HF_DIR. Placements that Llama computes (pre, lns) "
                    "become a LlamaForCausalLM directory; any other model gets its own modeling code, loaded with "
                    "AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True), and a note saying why "
                    "it is not Llama (--require-llama makes that an error). The tokenizer travels along; a byte "
                    "model gets a byte-level tokenizer.json.")
    exp.add_argument("model_dir", metavar="MODEL_DIR", type=Path,
                     help="a spannorm model folder, checkpoint folder, or run folder (its latest checkpoint)")
    exp.add_argument("--out", required=True, type=Path, metavar="HF_DIR", help="directory to write")
    exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    exp.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                     help="split the weights into shards of at most this size (default 5GB)")
    exp.add_argument("--require-llama", action="store_true",
                     help="fail, writing nothing, when HF cannot load the model as LlamaForCausalLM")
    exp.add_argument("--check", action="store_true",
                     help="after writing, load HF_DIR with transformers and compare logits on random tokens")
    exp.add_argument("--overwrite", action="store_true", help="replace HF_DIR if it exists")
    exp.set_defaults(run=run_export)
    return imp


def _user_errors(fn):
    """Turn conversion errors and missing files into one-line usage errors (exit 2)."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (InteropError, FileNotFoundError) as err:
            raise UsageError(str(err)) from None
    return wrapped


@_user_errors
def run_import(args: argparse.Namespace) -> int:
    check_writable(args.out, args.overwrite)
    if args.context_length is not None and args.context_length < 1:
        raise UsageError(f"--context-length={args.context_length} is invalid: must be a positive integer")
    model = import_hf(args.hf_dir, context_length=args.context_length)
    if args.check:
        remote = is_remote_code_export(read_hf_config(args.hf_dir))
        diff = max_logit_difference(model, args.hf_dir, trust_remote_code=remote)
        print(f"max |logit difference| vs transformers (fp32, random tokens): {diff:.3g}")
        if not diff <= PARITY_TOLERANCE:
            print(f"spannorm: error: logits differ by {diff:.3g} > {PARITY_TOLERANCE:g}; nothing written",
                  file=sys.stderr)
            return 1

    def fill(tmp: Path) -> None:
        save_model(model, tmp)
        shutil.copyfile(args.hf_dir / HF_CONFIG, tmp / SOURCE_HF_CONFIG)
        copy_tokenizer_files(args.hf_dir, tmp)

    write_directory(args.out, fill, args.overwrite)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"imported {args.hf_dir} -> {args.out}: placement {cfg.placement}, {cfg.n_layers} layers, "
          f"d_model {cfg.d_model}, {cfg.n_heads} heads ({cfg.kv_heads} kv), vocab {cfg.vocab_size}, "
          f"{n_params:,} parameters")
    return 0


@_user_errors
def run_export(args: argparse.Namespace) -> int:
    check_writable(args.out, args.overwrite)
    if args.check:  # before anything is written: --check without the 'hf' extra is refused up front
        require_transformers()
    model_dir = resolve_checkpoint_dir(args.model_dir)
    model = load_model(model_dir)
    reasons = llama_incompatibilities(model.cfg)
    if reasons and args.require_llama:
        raise UsageError("HF cannot load this model as LlamaForCausalLM: " + "; ".join(reasons))
    options = dict(dtype=args.dtype, max_shard_bytes=args.max_shard_size, source_dir=model_dir,
                   overwrite=args.overwrite)
    result = export_model(model, args.out, **options)
    if reasons:
        print(f"spannorm: note: {result.message()}", file=sys.stderr)
    files = result.files
    shards = sum(name.endswith(".safetensors") for name in files)
    kind = "LlamaForCausalLM" if result.hf_llama else "SpanNormForCausalLM (trust_remote_code=True)"
    print(f"wrote a Hugging Face {kind} checkpoint to {args.out} ({args.dtype}, {shards} safetensors "
          f"file{'s' if shards > 1 else ''}, {len(files)} files in all)")
    if args.check:
        diff = max_logit_difference(model, args.out, trust_remote_code=not result.hf_llama)
        print(f"max |logit difference| vs transformers ({args.dtype} weights, random tokens): {diff:.3g}")
        if args.dtype == "float32" and not diff <= PARITY_TOLERANCE:
            print(f"spannorm: error: logits differ by {diff:.3g} > {PARITY_TOLERANCE:g}", file=sys.stderr)
            return 1
    return 0
