"""Corpora: the embedded default (the Python standard library's own source), and text files from disk."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from spannorm.config import ConfigError

EMBEDDED_NAME = "stdlib"
EMBEDDED_MAX_BYTES = 4_000_000


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_corpus(max_bytes: int = EMBEDDED_MAX_BYTES) -> bytes:
    """The default corpus, available offline with any CPython install: the top-level ``*.py`` modules of the
    running interpreter's standard library (PSF licence), in sorted order, concatenated up to ``max_bytes``.

    The text depends on the Python version (3.11.7 gives about 4.0 MB from 168 modules); its content hash keys
    the token cache, so a different interpreter simply gets its own cache."""
    files = sorted(stdlib_dir().glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no standard-library sources found under {stdlib_dir()}; "
                                "name a corpus with --data.path instead")
    chunks, size = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"\n".join(chunks)[:max_bytes]


# ---------------------------------------------------------------------- text from disk
BINARY_SNIFF_BYTES = 8192
TOKEN_FILE_SUFFIXES = (".bin", ".npy", ".npz", ".pt", ".pth", ".safetensors")


def _is_text_file(path: Path) -> bool:
    """A file counts as text when its first bytes hold no NUL byte."""
    with path.open("rb") as handle:
        return b"\0" not in handle.read(BINARY_SNIFF_BYTES)


def folder_text_files(folder: Path) -> list[Path]:
    """The text files under ``folder`` (recursively, hidden entries skipped), sorted by relative path."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if _is_text_file(path):
            files.append(path)
    return files


def read_corpus(path: str | Path, field_name: str = "data.path") -> bytes:
    """The bytes of a text file, or of every text file of a folder joined by newlines in sorted order.

    Raises :class:`spannorm.config.ConfigError` (a one-line message) for a missing path, an empty file, or a
    folder without text files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{field_name}={str(path)!r} is invalid: no such file or folder; "
                          "allowed: a text file, a folder of text files, or null for the embedded corpus")
    if path.is_file():
        if path.suffix.lower() in TOKEN_FILE_SUFFIXES or not _is_text_file(path):
            raise ConfigError(f"{field_name}={str(path)!r} is invalid: it is binary ({path.suffix or 'no suffix'}, "
                              "token ids or arrays, not text); allowed: a text file, a folder of text files, or a "
                              "folder written by `spannorm prepare` (token files such as nanoGPT's train.bin/"
                              "val.bin: describe them once with `spannorm prepare --tokens FOLDER --tokenizer=...`)")
        data = path.read_bytes()
        if not data:
            raise ConfigError(f"{field_name}={str(path)!r} is invalid: the file is empty; "
                              "allowed: a non-empty text file")
        return data
    if path.is_dir():
        files = folder_text_files(path)
        if not files:
            raise ConfigError(f"{field_name}={str(path)!r} is invalid: the folder holds no text files; "
                              "allowed: a folder that contains text files")
        data = b"\n".join(f.read_bytes() for f in files)
        if not data.strip():
            raise ConfigError(f"{field_name}={str(path)!r} is invalid: its text files are empty; "
                              "allowed: a folder with non-empty text files")
        return data
    raise ConfigError(f"{field_name}={str(path)!r} is invalid: not a regular file or folder; "
                      "allowed: a text file or a folder of text files")
