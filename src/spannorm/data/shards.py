"""The on-disk token format every data path reads: a folder of raw token shards and one ``index.json``.

A shard is a flat little-endian array of token ids (``uint16``, or ``uint32`` for vocabularies over 65536)
with no header, so ``numpy.memmap`` opens it in place (the layout of nanoGPT's ``train.bin``). The index
names the tokenizer, the dtype, and for each split (``train``, ``val``) its shards in order, with their token
counts, sizes and SHA-256 checksums, and the token, document and text-byte counts. ``spannorm prepare``
writes such folders from text sources; the token cache of a text corpus is one too.

Every file is written under a temporary name and renamed into place, so a reader never sees half a shard.
Opening a dataset checks that every shard exists, is non-empty and has the size the index records (a
cheap check); :func:`verify_dataset` also compares the checksums.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spannorm.config import ConfigError
from spannorm.files import atomic_write_bytes

INDEX_NAME = "index.json"
FORMAT_NAME = "spannorm-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
TOKEN_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_shard(path: Path, tokens: np.ndarray, dtype: np.dtype) -> dict[str, Any]:
    """Write one shard atomically; return its index entry (file name, tokens, bytes, sha256)."""
    array = np.ascontiguousarray(tokens, dtype=np.dtype(dtype).newbyteorder("<"))
    data = array.data.cast("B")  # array.data: a memoryview of the array
    atomic_write_bytes(path, data)
    return {"file": path.name, "tokens": int(array.size), "bytes": int(array.nbytes),
            "sha256": hashlib.sha256(data).hexdigest()}


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class ShardedTokens:
    """Several memory-mapped shards read as one token stream: ``len`` and contiguous slices, which is all
    :class:`~spannorm.data.dataset.WindowSampler` and ``eval_batches`` use. A slice may span shards."""

    def __init__(self, shards: Sequence[TokenStream]):
        if not shards:
            raise ValueError("a token stream needs at least one shard")
        self.shards = shards
        self.dtype: np.dtype = shards[0].dtype
        self.offsets = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("a sharded token stream is read by contiguous slices")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("a sharded token stream is read by contiguous slices (step 1)")
        pieces = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        position = start
        while position < stop:
            local = position - int(self.offsets[shard])
            take = min(stop, int(self.offsets[shard + 1])) - position
            pieces.append(self.shards[shard][local:local + take])
            position += take
            shard += 1
        if not pieces:
            return np.zeros(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.shards)
        return whole if dtype is None else whole.astype(dtype)


TokenStream = np.ndarray | ShardedTokens
"""The tokens of a split: one array (a memmap) or several shards read as one."""


def token_stream(shards: Sequence[np.ndarray]) -> TokenStream:
    """One shard is returned as it is (a memmap); several become a :class:`ShardedTokens`."""
    if len(shards) == 1:
        return shards[0]
    if not shards:
        return np.zeros(0, dtype=np.uint16)
    return ShardedTokens(shards)


@dataclass
class PreparedDataset:
    """An opened token folder: its index and, per split, the memory-mapped token stream."""

    folder: Path
    index: dict[str, Any]
    splits: dict[str, np.ndarray | ShardedTokens]

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.index["tokenizer"]

    def text_bytes(self, split: str) -> int:
        return int(self.index["splits"][split]["bytes"])


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and (path / INDEX_NAME).is_file()


def _bad(folder: Path, what: str, allowed: str) -> ConfigError:
    return ConfigError(f"data.path={str(folder)!r} is invalid: {what}; allowed: {allowed}")


def read_index(folder: Path) -> dict[str, Any]:
    """The index of a token folder, checked for the fields readers rely on."""
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(folder, f"its {INDEX_NAME} cannot be read ({type(err).__name__})",
                   "a folder written by `spannorm prepare`; prepare it again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise _bad(folder, f"its {INDEX_NAME} is not a {FORMAT_NAME} index",
                   "a folder written by `spannorm prepare`")
    if index.get("version") != FORMAT_VERSION:
        raise _bad(folder, f"its {INDEX_NAME} has format version {index.get('version')!r}",
                   f"version {FORMAT_VERSION}; prepare it again with this spannorm")
    if index.get("dtype") not in TOKEN_DTYPES or not isinstance(index.get("splits"), dict):
        raise _bad(folder, f"its {INDEX_NAME} lacks a dtype or splits", "a folder written by `spannorm prepare`")
    return index


def open_dataset(folder: str | Path) -> PreparedDataset:
    """Open a token folder: every listed shard memory-mapped, after checking it exists, is non-empty and has
    the recorded size. A bad shard is named in a one-line :class:`ConfigError`."""
    folder = Path(folder).expanduser()
    index = read_index(folder)
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    splits: dict[str, np.ndarray | ShardedTokens] = {}
    for name in SPLITS:
        entry = index["splits"].get(name, {"shards": []})
        arrays = []
        for shard in entry["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                raise _bad(folder, f"shard {shard['file']} is missing",
                           "a complete dataset; run the same `spannorm prepare` again to finish it")
            size = path.stat().st_size
            if size == 0 or size != shard["bytes"]:
                raise _bad(folder, f"shard {shard['file']} is {'empty' if size == 0 else 'corrupt'} "
                           f"({size} bytes, the index records {shard['bytes']})",
                           "delete the folder and run `spannorm prepare` again")
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        splits[name] = token_stream(arrays) if arrays else np.zeros(0, dtype=dtype)
    return PreparedDataset(folder=folder, index=index, splits=splits)


def verify_dataset(folder: str | Path) -> int:
    """Open a token folder and compare every shard's SHA-256 with its index; return the shards checked."""
    dataset = open_dataset(folder)
    checked = 0
    for name in SPLITS:
        for shard in dataset.index["splits"].get(name, {"shards": []})["shards"]:
            if file_sha256(dataset.folder / shard["file"]) != shard["sha256"]:
                raise _bad(dataset.folder, f"shard {shard['file']} is corrupt (its SHA-256 differs from the index)",
                           "delete the folder and run `spannorm prepare` again")
            checked += 1
    return checked


def split_entry(shards: list[dict[str, Any]], documents: int, text_bytes: int) -> dict[str, Any]:
    return {"tokens": sum(s["tokens"] for s in shards), "documents": documents, "bytes": text_bytes,
            "shards": shards}


def new_index(tokenizer: dict[str, Any], dtype: np.dtype, splits: dict[str, dict[str, Any]],
              **extra: Any) -> dict[str, Any]:
    """An index dict: format, version, tokenizer description, dtype, splits, then any ``extra`` fields."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": tokenizer,
            "dtype": np.dtype(dtype).name, "splits": splits, **extra}
