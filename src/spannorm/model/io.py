"""Model weights on disk: ``model.safetensors`` plus ``model_config.json`` (and ``checksums.json``, written last).
Nothing is ever unpickled; a damaged folder is refused with one :class:`~spannorm.model.checksums.CorruptCheckpoint`
line naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spannorm.config import ModelConfig
from spannorm.files import atomic_write
from spannorm.model.checksums import CorruptCheckpoint, model_config_of, verify_folder, write_manifest
from spannorm.model.transformer import DecoderLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model_config.json"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()
"""The mode of a file written with ``open``: safetensors creates its files 0600, which other users of a shared
model folder could not read."""


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the file mode an ordinary ``open`` would give (not 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, FILE_MODE)


def save_model(model: DecoderLM, directory: str | os.PathLike) -> None:
    """Write the weights and the model config into ``directory``, each through a temporary file and a rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_tensors(state, p, {"format": "pt"}))
    text = json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text))
    write_manifest(directory, (WEIGHTS_NAME, CONFIG_NAME))


def load_model_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a spannorm model directory")
    return model_config_of(Path(directory))


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> DecoderLM:
    """Rebuild the model from ``model_config.json`` and load ``model.safetensors`` strictly, after checking the
    folder (checksums, JSON, tensor names and shapes: :func:`~spannorm.model.checksums.verify_folder`)."""
    load_model_config(directory)  # FileNotFoundError for a folder that is no model folder at all
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: not a spannorm model directory")
    cfg = verify_folder(directory)
    model = DecoderLM(cfg)
    model.load_state_dict(load_weights(weights, map_location), strict=True)
    return model


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``load_file`` with a damaged file turned into :class:`CorruptCheckpoint` naming it."""
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptCheckpoint(path, f"not a readable safetensors file ({str(err).splitlines()[0]})") from None
