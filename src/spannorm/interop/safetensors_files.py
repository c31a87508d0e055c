"""Reading and writing Hugging Face weight files: ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Only safetensors are read; nothing is ever unpickled."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from spannorm.interop.errors import InteropError
from spannorm.model.io import save_tensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory: the shards named by the index, or the single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InteropError(f"{index} is not a safetensors index (expected a 'weight_map' object): {err}") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name:
                raise InteropError(f"{index} names the shard {name!r}; shards must be plain file names "
                                   "in the checkpoint directory")
        files = [directory / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: the shard {missing[0]} listed in {INDEX_FILE} does not exist "
                                    f"({len(missing)} of {len(files)} shards missing)")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    pickles = [name for name in PICKLE_FILES if (directory / name).exists()]
    if pickles:
        raise InteropError(f"{directory} holds {pickles[0]}, a pickle; only safetensors are read "
                           f"({SINGLE_FILE} or {INDEX_FILE} with shards), because unpickling can run code. "
                           "Re-save the checkpoint with safetensors in an environment you trust")
    raise FileNotFoundError(f"{directory} has no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def tensor_names(files: list[Path]) -> list[str]:
    """Every tensor name in the files, read from the headers only."""
    names: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, so that at most one tensor of the checkpoint is held besides
    the model being filled."""
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def write_shards(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``state`` as ``model.safetensors`` when it fits in ``max_shard_bytes``, else as HF-named shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Returns the file names written.
    A single tensor larger than the limit gets a shard of its own."""
    metadata = {"format": "pt", **(metadata or {})}
    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        save_tensors(state, directory / SINGLE_FILE, metadata)
        return [SINGLE_FILE]
    shards: list[list[str]] = [[]]
    used = 0
    for name in state:
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    n = len(shards)
    width = max(5, int(math.log10(n)) + 1)
    weight_map: dict[str, str] = {}
    written = []
    for i, names in enumerate(shards, start=1):
        file_name = f"model-{i:0{width}d}-of-{n:0{width}d}.safetensors"
        save_tensors({k: state[k] for k in names}, directory / file_name, metadata)
        weight_map.update({k: file_name for k in names})
        written.append(file_name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written + [INDEX_FILE]
