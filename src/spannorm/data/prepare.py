"""``spannorm prepare``: text sources to a folder of token shards (see :mod:`spannorm.data.shards`).

The sources are read once, in order, as a stream of document pieces (:mod:`spannorm.data.sources`). Pieces
are grouped into *units* of about ``shard_mb`` MB of text; unit ``i`` becomes the shards ``train-{i}.bin``
and ``val-{i}.bin``. Units are tokenized in worker processes, at most two per worker in flight, so peak
memory depends on ``shard_mb`` and ``workers``, not on the corpus size.

Each document goes wholly to one split: to validation when a hash of its first piece (up to 1 MiB of its
text) falls below ``val_fraction``. Identical documents therefore always land in the same split, and
validation never shares a document with training. A separator token (the tokenizer's EOS; byte 0 for the
byte tokenizer) precedes every document.

Shards are written under temporary names and renamed; a unit counts as done once its marker is written
under ``.prepare/``. A killed prepare, run again with the same arguments, keeps the finished units and
tokenizes only the rest; ``index.json`` is written last, so a folder without it is never read as a dataset.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tokenizers import Tokenizer as _HF

from spannorm.config import ConfigError
from spannorm.data import shards
from spannorm.data.sources import (
    BAD_RECORD_POLICIES,
    DOCUMENT_SPLITS,
    HFSource,
    Piece,
    ReadStats,
    iter_hf_pieces,
    iter_pieces,
    list_sources,
    source_kind,
)
from spannorm.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, eos_id, fingerprint, train_bpe_from_iterator

STATE_DIR = ".prepare"
TOKENIZER_FILE = "tokenizer.json"
BPE_EOS_TOKEN = "<|endoftext|>"
SPLIT_CODES = {0: "train", 1: "val"}
ENCODE_BATCH_BYTES = 1 << 20


@dataclass
class PrepareOptions:
    """Everything that decides the shards' content (and so must match when a prepare resumes)."""

    tokenizer: str = "byte"
    """``byte``, ``bpe`` (trained here from the sources) or the path of a ``tokenizer.json``."""
    bpe_vocab_size: int = 4096
    bpe_sample_mb: float = 0.0
    """Train BPE on a sample of documents of about this many MB; 0: on every document."""
    eos_token: str | None = None
    """The document separator of a ``tokenizer.json`` (default: the first known EOS token it has)."""
    document_split: str = "file"
    """What one document of a text file is: the whole ``file``, each blank-line ``paragraph``, or each ``line``."""
    text_field: str = "text"
    on_bad_record: str = "stop"
    val_fraction: float = 0.1
    shard_mb: float = 32.0
    dtype: str | None = None
    """``uint16`` or ``uint32``; None: uint16 when the vocabulary fits."""

    def validate(self) -> None:
        def fail(flag: str, value: Any, allowed: str) -> None:
            raise ConfigError(f"--{flag}={value!r} is invalid; allowed: {allowed}")

        if self.tokenizer not in ("byte", "bpe") and not str(self.tokenizer).endswith(".json"):
            fail("tokenizer", self.tokenizer, "byte, bpe, or the path of a tokenizer.json file")
        if not isinstance(self.bpe_vocab_size, int) or not 257 <= self.bpe_vocab_size <= 1 << 20:
            fail("bpe-vocab-size", self.bpe_vocab_size, "an integer from 257 to 1048576")
        if not self.bpe_sample_mb >= 0:
            fail("bpe-sample-mb", self.bpe_sample_mb, "a size in MB >= 0 (0: every document)")
        if self.document_split not in DOCUMENT_SPLITS:
            fail("documents", self.document_split, ", ".join(DOCUMENT_SPLITS))
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            fail("on-bad-record", self.on_bad_record, ", ".join(BAD_RECORD_POLICIES))
        if not 0.0 <= self.val_fraction < 1.0:
            fail("val-fraction", self.val_fraction, "a fraction in [0, 1)")
        if not self.shard_mb > 0:
            fail("shard-mb", self.shard_mb, "a size in MB > 0")
        if self.dtype not in (None, *shards.TOKEN_DTYPES):
            fail("dtype", self.dtype, ", ".join(shards.TOKEN_DTYPES))


# ---------------------------------------------------------------------- tokenizer
def _document_in_val(first_piece: bytes, val_fraction: float) -> bool:
    """The split rule: a stable hash of the document's first piece, compared with ``val_fraction``."""
    digest = hashlib.blake2b(first_piece, digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0 ** 64


Source = Path | HFSource


def _iter_all_pieces(files: list[Source], opts: PrepareOptions, stats: ReadStats) -> Iterator[Piece]:
    for source in files:
        if isinstance(source, HFSource):
            yield from iter_hf_pieces(source, text_field=opts.text_field, on_bad_record=opts.on_bad_record,
                                      stats=stats)
        else:
            yield from iter_pieces(source, document_split=opts.document_split, text_field=opts.text_field,
                                   on_bad_record=opts.on_bad_record, stats=stats)


def _source_bytes(source: Source) -> int | None:
    return source.local_bytes() if isinstance(source, HFSource) else source.stat().st_size


def _sample_texts(files: list[Source], opts: PrepareOptions) -> Iterator[str]:
    """The texts BPE trains on: every document, or about ``bpe_sample_mb`` MB of them (chosen by a hash
    spread over the corpus when its size is known, else the first ones)."""
    sizes = [_source_bytes(f) for f in files]
    budget = opts.bpe_sample_mb * 1e6
    known = None if None in sizes else sum(size for size in sizes if size is not None)
    rate = 1.0 if opts.bpe_sample_mb <= 0 or known is None else min(1.0, budget / max(1, known))
    keep, taken = True, 0
    for piece in _iter_all_pieces(files, opts, ReadStats()):
        if piece.starts_document:
            if budget and known is None and taken >= budget:
                return
            keep = rate >= 1.0 or _document_in_val(b"sample:" + piece.text, rate)
        if keep:
            taken += len(piece.text)
            yield piece.text.decode("utf-8", errors="replace")


def build_tokenizer(opts: PrepareOptions, files: list[Source], out: Path,
                    log: Callable[[str], None]) -> ByteTokenizer | HFTokenizer:
    """The byte tokenizer, a ``tokenizer.json`` from disk, or BPE trained from the sources (reused from
    ``out/tokenizer.json`` when a resumed prepare already trained it)."""
    if opts.tokenizer == "byte":
        return ByteTokenizer()
    saved = out / TOKENIZER_FILE
    if opts.tokenizer == "bpe":
        if saved.is_file() and (out / STATE_DIR / "plan.json").is_file():
            return HFTokenizer.from_file(saved)
        started = time.perf_counter()
        tok = train_bpe_from_iterator(_sample_texts(files, opts), opts.bpe_vocab_size,
                                      special_tokens=(BPE_EOS_TOKEN,))
        log(f"trained BPE ({tok.vocab_size} tokens) in {time.perf_counter() - started:.1f}s")
        return tok
    return HFTokenizer.from_file(opts.tokenizer)


def _tokenizer_entry(tok: Tokenizer, opts: PrepareOptions, separator: int) -> dict[str, Any]:
    name = {"byte": "byte", "bpe": f"bpe{opts.bpe_vocab_size}"}.get(opts.tokenizer, str(opts.tokenizer))
    return {"name": name, "fingerprint": fingerprint(tok), "vocab_size": int(tok.vocab_size),
            "eos_id": int(separator), "file": None if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE}


# ---------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str | None, separator: int, dtype: str, out: str) -> None:
    if tokenizer_json is None:
        tok: Tokenizer = ByteTokenizer()
    else:
        tok = HFTokenizer(_HF.from_str(tokenizer_json), "")
    _WORKER.update(tokenizer=tok, separator=separator, dtype=np.dtype(dtype), out=Path(out))


def _encode(pieces: list[bytes]) -> list[np.ndarray]:
    tok = _WORKER["tokenizer"]
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(p, dtype=np.uint8) for p in pieces]
    # Encodings carry strings and offsets for every token (about 100 bytes each): encode about 1 MB of text at a
    # time and keep only the ids, so a unit's memory is its text and ids, not its Encoding objects.
    ids: list[np.ndarray] = []
    start = 0
    while start < len(pieces):
        end, size = start, 0
        while end < len(pieces) and (end == start or size + len(pieces[end]) <= ENCODE_BATCH_BYTES):
            size += len(pieces[end])
            end += 1
        texts = [p.decode("utf-8", errors="replace") for p in pieces[start:end]]
        ids += [np.asarray(e.ids, dtype=np.int64) for e in tok.tokenizer.encode_batch(texts, add_special_tokens=False)]
        start = end
    return ids


def _tokenize_unit(unit: int, pieces: list[tuple[int, bool, bytes]]) -> dict[str, Any]:
    """Tokenize one unit and write its shards; return the unit's marker (per split: shard, counts)."""
    dtype, separator = _WORKER["dtype"], np.array([_WORKER["separator"]], dtype=_WORKER["dtype"])
    encoded = _encode([text for _, _, text in pieces])
    marker: dict[str, Any] = {"unit": unit}
    for code, split in SPLIT_CODES.items():
        arrays, documents, text_bytes = [], 0, 0
        for (piece_split, starts, text), ids in zip(pieces, encoded):
            if piece_split != code:
                continue
            if starts:
                arrays.append(separator)
                documents += 1
            arrays.append(ids.astype(dtype, copy=False))
            text_bytes += len(text)
        shard = None
        if arrays:
            shard = shards.write_shard(_WORKER["out"] / f"{split}-{unit:05d}.bin", np.concatenate(arrays), dtype)
        marker[split] = {"shard": shard, "documents": documents, "bytes": text_bytes}
    return marker


# ---------------------------------------------------------------------- the run
def _units(files: list[Source], opts: PrepareOptions, stats: ReadStats) -> Iterator[list[tuple[int, bool, bytes]]]:
    """Pieces tagged with their split, grouped into units of about ``shard_mb`` MB of text."""
    limit = int(opts.shard_mb * 1e6)
    unit: list[tuple[int, bool, bytes]] = []
    size, split = 0, 0
    for piece in _iter_all_pieces(files, opts, stats):
        if piece.starts_document:
            split = 1 if _document_in_val(piece.text, opts.val_fraction) else 0
        unit.append((split, piece.starts_document, piece.text))
        size += len(piece.text)
        if size >= limit:
            yield unit
            unit, size = [], 0
    if unit:
        yield unit


def _plan(files: list[Source], opts: PrepareOptions) -> dict[str, Any]:
    """What must match for a resumed prepare to keep earlier units: the options and each source's
    path, size and modification time (a ``datasets`` source: its name, split, config and local size)."""
    return {"options": asdict(opts),
            "sources": [[*f.describe().values(), f.local_bytes()] if isinstance(f, HFSource)
                        else [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _source_entry(source: Source) -> dict[str, Any]:
    if isinstance(source, HFSource):
        return {**source.describe(), "bytes": source.local_bytes()}
    return {"path": str(source.resolve()), "bytes": source.stat().st_size, "sha256": shards.file_sha256(source)}


def _tokenize_all(files: list[Source], opts: PrepareOptions, stats: ReadStats, workers: int, initargs: tuple,
                  markers: dict[int, dict[str, Any]], record: Callable[[dict[str, Any]], None]) -> None:
    """Tokenize every unit that has no marker yet, in this process or in ``workers`` worker processes."""
    if workers == 1:
        _init_worker(*initargs)
        for unit, pieces in enumerate(_units(files, opts, stats)):
            if unit not in markers:
                record(_tokenize_unit(unit, pieces))
    else:
        # fork: workers inherit the imported modules (spawn would import torch again in each, seconds and
        # hundreds of MB); each worker tokenizes with one thread, so the tokenizers library's own thread pool
        # is turned off before forking (it warns and turns itself off in forked children otherwise).
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=initargs) as pool:
                pending: deque[Future] = deque()
                for unit, pieces in enumerate(_units(files, opts, stats)):
                    if unit in markers:
                        continue
                    pending.append(pool.submit(_tokenize_unit, unit, pieces))
                    while len(pending) >= 2 * workers:  # bound the text in flight
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            pending.remove(future)
                            record(future.result())
                for future in pending:
                    record(future.result())
        finally:  # workers are forked as units are submitted; afterwards this process gets its setting back
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before


def prepare(sources: list[str | Path | HFSource], out: str | Path, opts: PrepareOptions | None = None, workers: int = 1,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare ``sources`` into the token folder ``out``; return its index. See the module docstring."""
    opts = opts or PrepareOptions()
    opts.validate()
    if workers < 1:
        raise ConfigError(f"--workers={workers} is invalid; allowed: an integer >= 1")
    out = Path(out).expanduser()
    stats = ReadStats()
    files: list[Source] = [f for source in sources for f in
                           ([source] if isinstance(source, HFSource) else list_sources(source, stats))]
    if not files:
        raise ConfigError("prepare needs at least one source; allowed: text files or folders, or --hf=DATASET")
    if (opts.val_fraction > 0 and opts.document_split == "file" and len(files) == 1
            and isinstance(files[0], Path) and source_kind(files[0]) == "txt"):
        raise ConfigError(f"source {str(files[0])!r} is one document, which cannot be split into training and "
                          "validation; allowed: --documents=paragraph or --documents=line, more files, or "
                          "--val-fraction=0")
    plan = _plan(files, opts)
    state = out / STATE_DIR
    if (out / shards.INDEX_NAME).is_file():
        index = shards.read_index(out)
        if index.get("plan") == plan:
            log(f"{out} is already prepared from these sources with these options")
            return index
        raise ConfigError(f"--out={str(out)!r} already holds a dataset of other sources or options; allowed: "
                          "a new or empty --out folder")
    if out.exists() and not (state / "plan.json").is_file() and any(out.iterdir()):
        raise ConfigError(f"--out={str(out)!r} is a folder that holds other files; allowed: a new or empty "
                          "folder, or the folder of an unfinished prepare of the same sources")
    if (state / "plan.json").is_file() and json.loads((state / "plan.json").read_text()) != plan:
        raise ConfigError(f"--out={str(out)!r} holds an unfinished prepare of other sources or options; allowed: "
                          "the same command as before (it resumes), or a new --out folder")
    tok = build_tokenizer(opts, files, out, log)
    separator = eos_id(tok, opts.eos_token)
    if separator is None:
        raise ConfigError(f"--tokenizer={opts.tokenizer!r} has no end-of-document token "
                          f"({opts.eos_token or 'none of <|endoftext|>, </s>, <eos>, ...'} is in its vocabulary); "
                          "allowed: --eos-token=TOKEN naming one of its tokens")
    dtype = np.dtype(opts.dtype) if opts.dtype else shards.token_dtype(tok.vocab_size)
    if tok.vocab_size > np.iinfo(dtype).max + 1:
        raise ConfigError(f"--dtype={dtype.name} is invalid for a vocabulary of {tok.vocab_size}; allowed: uint32")
    created = not out.exists()
    state.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".*.tmp-*"):  # half-written files of a killed run
        leftover.unlink()
    tokenizer_json = None if isinstance(tok, ByteTokenizer) else tok.to_json()
    if tokenizer_json is not None:
        shards.atomic_write_bytes(out / TOKENIZER_FILE, tokenizer_json.encode())
    shards.atomic_write_json(state / "plan.json", plan)

    markers: dict[int, dict[str, Any]] = {}
    for path in state.glob("unit-*.json"):
        marker = json.loads(path.read_text())
        markers[marker["unit"]] = marker
    kept = len(markers)
    started = time.perf_counter()
    initargs = (tokenizer_json, separator, dtype.name, str(out))

    def record(marker: dict[str, Any]) -> None:
        markers[marker["unit"]] = marker
        shards.atomic_write_json(state / f"unit-{marker['unit']:05d}.json", marker)

    try:
        _tokenize_all(files, opts, stats, workers, initargs, markers, record)
    except BaseException:
        if not markers and created:  # failed before any unit was done (a bad first source): leave nothing
            shutil.rmtree(out, ignore_errors=True)
        raise

    splits = {}
    for split in shards.SPLITS:
        entries = [markers[u][split] for u in sorted(markers)]
        splits[split] = shards.split_entry([e["shard"] for e in entries if e["shard"]],
                                           sum(e["documents"] for e in entries), sum(e["bytes"] for e in entries))
    index = shards.new_index(
        _tokenizer_entry(tok, opts, separator), dtype, splits,
        sources=[_source_entry(f) for f in files],
        bad_records=stats.bad_records, skipped_files=stats.skipped_files, plan=plan)
    shards.atomic_write_json(out / shards.INDEX_NAME, index)
    shutil.rmtree(state, ignore_errors=True)
    seconds = time.perf_counter() - started
    text_mb = (splits["train"]["bytes"] + splits["val"]["bytes"]) / 1e6
    log(f"prepared {out}: {splits['train']['tokens']} train tokens ({splits['train']['documents']} documents), "
        f"{splits['val']['tokens']} val tokens ({splits['val']['documents']} documents), {dtype.name}; "
        f"{len(markers) - kept} units tokenized, {kept} kept from an earlier run; {text_mb:.1f} MB of text "
        f"in {seconds:.1f}s" + (f"; {stats.bad_records} records skipped" if stats.bad_records else "")
        + (f"; {len(stats.skipped_files)} binary files skipped" if stats.skipped_files else ""))
    return index


# ---------------------------------------------------------------------- existing token files
def describe_token_files(folder: str | Path, tokenizer: str, out: str | Path | None = None, dtype: str = "uint16",
                         eos_token: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make token files written elsewhere (nanoGPT's ``train.bin`` and ``val.bin``: flat arrays of token ids)
    readable as a dataset, without copying them: write an ``index.json`` (into ``out``, default ``folder``)
    that lists them, with the tokenizer they were made with. Every id must fit that tokenizer's vocabulary.
    The text bytes (for bits per byte) are estimated by decoding up to a million validation tokens."""
    folder = Path(folder).expanduser()
    out = Path(out).expanduser() if out is not None else folder
    if tokenizer not in ("byte",) and not str(tokenizer).endswith(".json"):
        raise ConfigError(f"--tokenizer={tokenizer!r} is invalid for existing token files; allowed: byte or the "
                          "path of the tokenizer.json the ids were made with")
    if dtype not in shards.TOKEN_DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is invalid; allowed: {', '.join(shards.TOKEN_DTYPES)}")
    files = {split: folder / f"{split}.bin" for split in shards.SPLITS}
    for path in files.values():
        if not path.is_file():
            raise ConfigError(f"--tokens={str(folder)!r} has no {path.name}; allowed: a folder with train.bin and "
                              "val.bin (flat token-id arrays, as nanoGPT's prepare.py writes)")
    if (out / shards.INDEX_NAME).is_file():
        raise ConfigError(f"--out={str(out)!r} already holds {shards.INDEX_NAME}; allowed: a folder without one")
    tok = ByteTokenizer() if tokenizer == "byte" else HFTokenizer.from_file(tokenizer)
    np_dtype = np.dtype(dtype).newbyteorder("<")
    separator = eos_id(tok, eos_token)
    splits = {}
    for split, path in files.items():
        size = path.stat().st_size
        if size == 0 or size % np_dtype.itemsize:
            raise ConfigError(f"token file {str(path)!r} is {'empty' if size == 0 else 'corrupt'} ({size} bytes, "
                              f"not a whole number of {dtype} ids); allowed: a non-empty file of {dtype} ids, or "
                              "--dtype=uint32")
        ids = np.memmap(path, dtype=np_dtype, mode="r")
        top = int(ids.max())
        if top >= tok.vocab_size:
            raise ConfigError(f"token file {str(path)!r} holds id {top}, beyond the vocabulary of --tokenizer="
                              f"{tokenizer} ({tok.vocab_size}); allowed: the tokenizer these ids were made with")
        sample = np.asarray(ids[:1_000_000])
        bytes_per_token = len(tok.decode(sample).encode("utf-8")) / max(1, len(sample))
        documents = int(np.count_nonzero(ids == separator)) if separator is not None else 0
        shard = {"file": os.path.relpath(path, out), "tokens": int(len(ids)), "bytes": size,
                 "sha256": shards.file_sha256(path)}
        splits[split] = shards.split_entry([shard], documents, round(bytes_per_token * len(ids)))
    entry = {"name": str(tokenizer), "fingerprint": fingerprint(tok), "vocab_size": int(tok.vocab_size),
             "eos_id": separator, "file": None if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE}
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(tok, ByteTokenizer):
        shards.atomic_write_bytes(out / TOKENIZER_FILE, tok.to_json().encode())
    index = shards.new_index(entry, np_dtype, splits, bytes_estimated=True,
                             sources=[{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files.values()])
    shards.atomic_write_json(out / shards.INDEX_NAME, index)
    log(f"described {folder}: {splits['train']['tokens']} train and {splits['val']['tokens']} val tokens "
        f"({dtype}, tokenizer {tokenizer}); train with --data.path={out}")
    return index
