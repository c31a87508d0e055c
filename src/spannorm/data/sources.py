"""Text sources for ``spannorm prepare``: files and folders streamed as documents.

A source is a ``.txt`` file (or any text file), ``.jsonl`` (one JSON object per line), ``.json`` (a list of
objects or strings, read whole), or ``.parquet`` (read by ``pyarrow`` when it is installed), each possibly
compressed as ``.gz`` (standard library) or ``.zst`` (when ``zstandard`` is installed). A folder is every
such file under it, sorted by relative path, hidden entries skipped.

A Hugging Face ``datasets`` source (:class:`HFSource`, an optional extra) is a folder written by
``save_to_disk``, parquet or arrow files (a file or a folder of them), or a dataset name for a streaming
``load_dataset``; its records are read one at a time.

Documents come out in pieces of at most about :data:`PIECE_BYTES` (a long text file is never held whole);
each piece says whether it starts a document.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, cast

from spannorm.config import ConfigError

PIECE_BYTES = 1 << 20
SNIFF_BYTES = 8192
TOKEN_SUFFIXES = (".bin", ".npy", ".npz", ".pt", ".pth", ".safetensors", ".arrow")
DOCUMENT_SPLITS = ("file", "paragraph", "line")
BAD_RECORD_POLICIES = ("stop", "skip")
ALLOWED = ("allowed: text files (.txt), .jsonl/.json with a text field, .parquet with a text column, "
           "optionally compressed as .gz or .zst, or a folder of them")


@dataclass(frozen=True)
class Piece:
    """Part of a document: its UTF-8 bytes, and whether a new document starts here."""

    text: bytes
    starts_document: bool


@dataclass
class ReadStats:
    """What a pass over the sources met: records skipped for a missing text field, binary files skipped."""

    bad_records: int = 0
    skipped_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face ``datasets`` source: a local ``save_to_disk`` folder, parquet/arrow files, or a name."""

    name: str
    split: str = "train"
    config: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {"hf": self.name, "split": self.split, "config": self.config}

    def local_bytes(self) -> int | None:
        """The size on disk of a local source (None for a name read by streaming)."""
        path = Path(self.name).expanduser()
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return None


def _suffixes(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix) of a file name: ``a.jsonl.gz`` -> (``.jsonl``, ``.gz``)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in (".gz", ".zst") else ""
    rest = suffixes[:-1] if compression else suffixes
    return (rest[-1] if rest else ""), compression


def source_kind(path: Path) -> str:
    """``txt``, ``jsonl``, ``json`` or ``parquet`` for a source file (any other suffix reads as text)."""
    suffix, _ = _suffixes(path)
    return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(suffix, "txt")


def open_binary(path: Path) -> IO[bytes]:
    """The decompressed bytes of a source file, as a stream."""
    _, compression = _suffixes(path)
    if compression == ".gz":
        return cast(IO[bytes], gzip.open(path, "rb"))  # a GzipFile, which typeshed does not call IO[bytes]
    if compression == ".zst":
        try:
            import zstandard  # optional dependency: .zst sources only
        except ImportError:
            raise ConfigError(f"source {str(path)!r} is zstd-compressed but the zstandard package is not "
                              "installed; allowed: pip install zstandard, or a .gz or uncompressed file") from None
        return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
    return path.open("rb")


def is_token_file(path: Path) -> bool:
    return _suffixes(path)[0] in TOKEN_SUFFIXES


def binary_reason(path: Path) -> str | None:
    """Why a file is not text (a token-file suffix, a NUL byte in its first 8 KiB), or None."""
    if is_token_file(path):
        return f"{_suffixes(path)[0]} holds token ids or arrays, not text"
    if source_kind(path) == "parquet":
        return None
    try:
        with open_binary(path) as handle:
            head = handle.read(SNIFF_BYTES)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        return f"it cannot be read ({type(err).__name__}: {err})"
    if b"\0" in head:
        return "it is binary (a NUL byte in its first 8 KiB)"
    return None


def list_sources(path: str | Path, stats: ReadStats | None = None) -> list[Path]:
    """The source files of ``path``: the file itself, or the readable files under a folder (binary ones are
    skipped and listed in ``stats``). Raises a one-line :class:`ConfigError` for a missing path, a binary
    file, or a folder without sources."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"source {str(path)!r} does not exist; {ALLOWED}")
    if path.is_file():
        reason = binary_reason(path)
        if reason:
            raise ConfigError(f"source {str(path)!r} is not text: {reason}; {ALLOWED} (token files .bin/.npy "
                              "are read by training directly with data.format=nanogpt)")
        return [path]
    files = []
    for candidate in sorted(path.rglob("*")):
        rel = candidate.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not candidate.is_file():
            continue
        if binary_reason(candidate):
            if stats is not None:
                stats.skipped_files.append(str(rel))
            continue
        files.append(candidate)
    if not files:
        raise ConfigError(f"source {str(path)!r} holds no text files; {ALLOWED}")
    return files


def _text_pieces(handle: IO[bytes], document_split: str) -> Iterator[Piece]:
    """Pieces of a text stream: the whole stream is one document (``file``), or each blank-line-separated
    paragraph is one (``paragraph``), or each non-empty line (``line``)."""
    separator = {"paragraph": b"\n\n", "line": b"\n"}.get(document_split)
    carry = b""
    starts = True
    while True:
        block = handle.read(PIECE_BYTES)
        data = carry + block
        if not block:
            if data.strip():
                yield Piece(data, starts)
            return
        if separator is None:  # one document: cut at the last newline so a piece ends on a line
            cut = data.rfind(b"\n") + 1 or len(data)
            yield Piece(data[:cut], starts)
            carry, starts = data[cut:], False
            continue
        parts = data.split(separator)
        carry = parts.pop()
        for part in parts:  # each separator ends a document
            if part.strip():
                yield Piece(part + separator[:1], starts)
            starts = True
        if len(carry) > PIECE_BYTES:  # a very long paragraph or line: emit it in pieces
            yield Piece(carry, starts)
            carry, starts = b"", False


def _record_text(record, text_field: str) -> str | None:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        value = record.get(text_field)
        return value if isinstance(value, str) else None
    return None


def _bad_record(path: Path, where: str, text_field: str, on_bad_record: str, stats: ReadStats,
                not_json: bool = False) -> None:
    stats.bad_records += 1
    if on_bad_record == "stop":
        problem, fix = (("is not JSON", "one JSON object per line") if not_json else
                        (f"has no string field {text_field!r}", "--text-field=NAME naming the text field"))
        raise ConfigError(f"source {str(path)!r} {where} {problem}; allowed: {fix}, or --on-bad-record=skip to "
                          "skip such records (they are counted)")


def _chunked(text: str) -> Iterator[Piece]:
    data = text.encode("utf-8", errors="replace")
    for start in range(0, max(1, len(data)), PIECE_BYTES):
        yield Piece(data[start:start + PIECE_BYTES], start == 0)


def iter_pieces(path: Path, *, document_split: str = "file", text_field: str = "text",
                on_bad_record: str = "stop", stats: ReadStats | None = None) -> Iterator[Piece]:
    """The document pieces of one source file."""
    stats = stats if stats is not None else ReadStats()
    kind = source_kind(path)
    if kind == "txt":
        with open_binary(path) as handle:
            yield from _text_pieces(handle, document_split)
    elif kind == "jsonl":
        with open_binary(path) as raw:
            for number, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), start=1):
                if not line.strip():
                    continue
                try:
                    text, not_json = _record_text(json.loads(line), text_field), False
                except json.JSONDecodeError:
                    text, not_json = None, True
                if text is None:
                    _bad_record(path, f"line {number}", text_field, on_bad_record, stats, not_json)
                elif text:
                    yield from _chunked(text)
    elif kind == "json":
        with open_binary(path) as raw:  # a .json file is one value and is read whole; use .jsonl when large
            try:
                value = json.load(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"))
            except json.JSONDecodeError as err:
                raise ConfigError(f"source {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}); "
                                  f"{ALLOWED}") from None
        records = value if isinstance(value, list) else [value]
        for number, record in enumerate(records):
            text = _record_text(record, text_field)
            if text is None:
                _bad_record(path, f"record {number}", text_field, on_bad_record, stats)
            elif text:
                yield from _chunked(text)
    else:
        yield from _parquet_pieces(path, text_field, on_bad_record, stats)


def _hf_records(source: HFSource):
    """The records of a ``datasets`` source, streamed where ``datasets`` can stream them."""
    try:
        import datasets  # optional dependency (the hf extra): Hugging Face datasets sources only
    except ImportError:
        raise ConfigError(f"--hf={source.name!r} needs the datasets package, which is not installed; allowed: pip "
                          "install datasets, or .jsonl/.parquet files as sources") from None
    path = Path(source.name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise ConfigError(f"--hf={source.name!r} has no split {source.split!r}; allowed: --hf-split="
                                      f"{' or '.join(loaded)}")
                loaded = loaded[source.split]
            return loaded
        if path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".parquet",
                                                                                                     ".arrow"))
            if not files:
                raise ConfigError(f"--hf={source.name!r} holds no parquet or arrow files and no saved dataset; "
                                  "allowed: a save_to_disk folder, parquet/arrow files, or a dataset name")
            builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
        return datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many types (missing hub access, bad names, bad files)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"--hf={source.name!r} cannot be loaded ({type(err).__name__}: {first}); allowed: a "
                          "local save_to_disk folder, parquet/arrow files, or a name the datasets library can "
                          "stream") from None


def iter_hf_pieces(source: HFSource, *, text_field: str = "text", on_bad_record: str = "stop",
                   stats: ReadStats | None = None) -> Iterator[Piece]:
    """The document pieces of a ``datasets`` source: one document per record."""
    stats = stats if stats is not None else ReadStats()
    records = _hf_records(source)
    for number, record in enumerate(records):
        text = _record_text(record, text_field)
        if text is None:
            _bad_record(Path(source.name), f"record {number}", text_field, on_bad_record, stats)
        elif text:
            yield from _chunked(text)


def _parquet_pieces(path: Path, text_field: str, on_bad_record: str, stats: ReadStats) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq  # optional dependency: .parquet sources only
    except ImportError:
        raise ConfigError(f"source {str(path)!r} is parquet but pyarrow is not installed; allowed: pip install "
                          "pyarrow, or .jsonl/.txt sources") from None
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ConfigError(f"source {str(path)!r} has no column {text_field!r} (it has "
                          f"{', '.join(parquet.schema_arrow.names)}); allowed: --text-field=NAME")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                _bad_record(path, f"row {row}", text_field, on_bad_record, stats)
            elif text:
                yield from _chunked(text)
            row += 1
