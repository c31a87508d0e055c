"""Atomic file writes: a file is written beside its target under a temporary name, flushed to disk, and renamed
over the target, so a reader (or a run killed mid-write) sees the old file or the new one, never a part. Every
layer that writes files it must not leave half-written uses these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it over ``path``. The temporary file
    is removed if anything fails. ``write`` flushes what it writes itself (see :func:`atomic_write_bytes`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically, synced to disk before the rename."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, synced to disk before the rename."""
    atomic_write_bytes(path, text.encode())


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]
