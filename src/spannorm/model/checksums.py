"""Integrity of a saved model or checkpoint folder: a ``checksums.json`` manifest written last, and the checks
that turn a damaged folder into one :class:`CorruptCheckpoint` line naming the file, never a traceback.

``checksums.json`` maps each file of the folder to its size and SHA-256::

    {"format": 1, "files": {"model.safetensors": {"bytes": 123, "sha256": "..."}, ...}}

:func:`verify_folder` checks, in order: the manifest (when there is one; folders written before it existed
still load), every JSON file parses, and ``model.safetensors`` holds exactly the tensors, with exactly the
shapes, that ``model_config.json`` describes (read from the safetensors header and a model built on the
``meta`` device, so no weight is read). Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from spannorm.config import ConfigError, ModelConfig
from spannorm.files import atomic_write_text
from spannorm.model.transformer import DecoderLM

MANIFEST_NAME = "checksums.json"
MANIFEST_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
_CHUNK = 1 << 20


class CorruptCheckpoint(ConfigError):
    """A model or checkpoint folder whose files are damaged, incomplete or do not fit each other."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint file {str(self.path)!r} is corrupt: {reason}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, names: Iterable[str]) -> Path:
    """Write ``checksums.json`` for ``names`` (files of ``directory``) through a temporary file and a rename;
    call it after every listed file is complete."""
    directory = Path(directory)
    files = {}
    for name in sorted(names):
        path = directory / name
        files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    target = directory / MANIFEST_NAME
    atomic_write_text(target, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2) + "\n")
    return target


def read_json_file(path: Path) -> dict:
    """A JSON object from ``path``; :class:`CorruptCheckpoint` naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise CorruptCheckpoint(path, "not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise CorruptCheckpoint(path, f"not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise CorruptCheckpoint(path, f"cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def verify_manifest(directory: Path) -> bool:
    """Check every file ``checksums.json`` lists; False when the folder has no manifest (an older folder)."""
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return False
    data = read_json_file(manifest)
    files = data.get("files")
    if data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CorruptCheckpoint(manifest, f"not a format-{MANIFEST_FORMAT} manifest with a 'files' mapping")
    for name, entry in sorted(files.items()):
        path = directory / name
        if not isinstance(entry, dict) or not {"bytes", "sha256"} <= set(entry):
            raise CorruptCheckpoint(manifest, f"its entry for {name!r} lacks bytes/sha256")
        if not path.is_file():
            raise CorruptCheckpoint(path, f"missing (listed in {MANIFEST_NAME})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptCheckpoint(path, f"{size} bytes, {MANIFEST_NAME} records {entry['bytes']} (truncated or "
                                          "replaced)")
        if sha256_file(path) != entry["sha256"]:
            raise CorruptCheckpoint(path, f"its SHA-256 differs from the one in {MANIFEST_NAME}")
    return True


def model_config_of(directory: Path) -> ModelConfig:
    """The folder's ``model_config.json`` as a :class:`ModelConfig`, any error naming the file."""
    path = directory / MODEL_CONFIG_FILE
    data = read_json_file(path)
    try:
        return ModelConfig.from_saved(data)
    except (ConfigError, TypeError, ValueError) as err:
        raise CorruptCheckpoint(path, str(err).splitlines()[0] if str(err) else type(err).__name__) from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no data read)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptCheckpoint(path, f"not a readable safetensors file ({str(err).splitlines()[0]})") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of a model of ``cfg`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = DecoderLM(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_weights_fit(directory: Path, cfg: ModelConfig) -> None:
    """:class:`CorruptCheckpoint` unless ``model.safetensors`` holds exactly the tensors of ``cfg``."""
    path = directory / WEIGHTS_FILE
    found = tensor_shapes(path)
    wanted = expected_shapes(cfg)
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    if missing:
        raise CorruptCheckpoint(path, f"tensor {missing[0]!r} is missing ({len(missing)} missing in all) for the "
                                      f"model of {MODEL_CONFIG_FILE}")
    if extra:
        raise CorruptCheckpoint(path, f"tensor {extra[0]!r} is not part of the model of {MODEL_CONFIG_FILE} "
                                      f"({len(extra)} extra in all)")
    for name in sorted(wanted):
        if found[name] != wanted[name]:
            raise CorruptCheckpoint(path, f"tensor {name!r} has shape {list(found[name])}, the model of "
                                          f"{MODEL_CONFIG_FILE} needs {list(wanted[name])}")


def verify_folder(directory: str | os.PathLike, json_files: Iterable[str] = ()) -> ModelConfig:
    """Check a model or checkpoint folder (see the module docstring) and return its model config. Raises
    :class:`CorruptCheckpoint` naming the first damaged file."""
    directory = Path(directory)
    verify_manifest(directory)
    for name in json_files:
        if (directory / name).is_file():
            read_json_file(directory / name)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CorruptCheckpoint(weights, "missing")
    cfg = model_config_of(directory)
    check_weights_fit(directory, cfg)
    return cfg


__all__ = ["MANIFEST_NAME", "CorruptCheckpoint", "check_weights_fit", "read_json_file", "sha256_file",
           "verify_folder", "verify_manifest", "write_manifest"]
