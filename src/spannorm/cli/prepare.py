"""``spannorm prepare``: text sources to a folder of token shards that ``train`` and ``eval`` read."""

from __future__ import annotations

import argparse
from pathlib import Path

from spannorm.cli.main import UsageError
from spannorm.data import prepare as prep
from spannorm.data.shards import verify_dataset
from spannorm.data.sources import BAD_RECORD_POLICIES, DOCUMENT_SPLITS, HFSource


def register(subparsers) -> argparse.ArgumentParser:
    defaults = prep.PrepareOptions()
    p = subparsers.add_parser(
        "prepare", help="tokenize text sources once into a folder of token shards",
        description="Tokenize text sources (.txt files, folders of them, .jsonl/.json with a text field, "
                    ".parquet with a text column; .gz or .zst compressed) into OUT: uint16/uint32 token shards "
                    "and index.json. Train on it with --data.path=OUT. Documents are kept apart by an EOS "
                    "token and go wholly to training or validation. Streams at bounded memory; a killed run "
                    "resumes when started again with the same arguments.")
    p.add_argument("sources", nargs="*", type=Path, help="files or folders of text")
    p.add_argument("--out", type=Path, help="the dataset folder to write")
    p.add_argument("--hf", metavar="DATASET",
                   help="also read a Hugging Face datasets source (needs the datasets package): a save_to_disk "
                        "folder, parquet/arrow files or a folder of them, or a dataset name (streamed)")
    p.add_argument("--hf-split", default="train", help="the split of --hf (default train)")
    p.add_argument("--hf-config", default=None, help="the configuration name of --hf")
    p.add_argument("--tokenizer", default=defaults.tokenizer,
                   help="byte (default), bpe (trained here on the sources), or the path of a tokenizer.json")
    p.add_argument("--bpe-vocab-size", type=int, default=defaults.bpe_vocab_size)
    p.add_argument("--bpe-sample-mb", type=float, default=defaults.bpe_sample_mb,
                   help="train BPE on a sample of about this many MB of documents (default 0: all of them)")
    p.add_argument("--eos-token", default=None,
                   help="the document separator of a tokenizer.json (default: <|endoftext|>, </s>, ... if present)")
    p.add_argument("--documents", dest="document_split", choices=DOCUMENT_SPLITS, default=defaults.document_split,
                   help="what one document of a text file is (default: the whole file)")
    p.add_argument("--text-field", default=defaults.text_field, help="the text field of .jsonl/.json/.parquet")
    p.add_argument("--on-bad-record", choices=BAD_RECORD_POLICIES, default=defaults.on_bad_record,
                   help="a record without the text field: stop with an error (default) or skip it (counted)")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help="the share of documents held out for validation (default 0.1)")
    p.add_argument("--shard-mb", type=float, default=defaults.shard_mb,
                   help="MB of text per shard and per unit of work (default 32)")
    p.add_argument("--dtype", choices=("uint16", "uint32"), default=None)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--tokens", type=Path, metavar="FOLDER",
                   help="instead of preparing text: describe existing token files FOLDER/train.bin and val.bin "
                        "(nanoGPT's format; --dtype, default uint16) made with --tokenizer, by writing an "
                        "index.json into --out (default FOLDER); the files are not copied")
    p.add_argument("--verify", type=Path, metavar="DATASET",
                   help="instead of preparing: check every shard of DATASET against its index's SHA-256")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.verify is not None:
        checked = verify_dataset(args.verify)
        print(f"{args.verify}: {checked} shards match their checksums")
        return 0
    if args.tokens is not None:
        prep.describe_token_files(args.tokens, args.tokenizer, out=args.out, dtype=args.dtype or "uint16",
                                  eos_token=args.eos_token)
        return 0
    sources: list = list(args.sources)
    if args.hf is not None:
        sources.append(HFSource(args.hf, split=args.hf_split, config=args.hf_config))
    if not sources or args.out is None:
        raise UsageError("prepare needs SOURCES (or --hf) and --out=FOLDER; allowed: spannorm prepare corpus/ "
                         "--out data/x, or spannorm prepare --verify=FOLDER")
    opts = prep.PrepareOptions(
        tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab_size, bpe_sample_mb=args.bpe_sample_mb,
        eos_token=args.eos_token, document_split=args.document_split, text_field=args.text_field,
        on_bad_record=args.on_bad_record, val_fraction=args.val_fraction, shard_mb=args.shard_mb, dtype=args.dtype)
    prep.prepare(sources, args.out, opts, workers=args.workers)
    return 0
