"""Corpora: the embedded default (the Python standard library's own source), and text files from disk."""

from __future__ import annotations

import sysconfig
from pathlib import Path

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
