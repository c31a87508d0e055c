"""Write a whole output directory or nothing: fill a hidden temporary sibling, then rename it into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from spannorm.interop.errors import InteropError


def check_writable(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output directory that exists and is not empty, unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InteropError(f"{out_dir} exists and is not a directory; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InteropError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")


def write_directory(out_dir: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``fill(tmp)`` on an empty temporary directory beside ``out_dir`` and rename it to ``out_dir``
    once ``fill`` has returned. A failure leaves ``out_dir`` as it was."""
    out_dir = Path(out_dir)
    check_writable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir
