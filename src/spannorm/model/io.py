"""Model weights on disk: ``model.safetensors`` plus ``model_config.json``. Nothing is ever unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spannorm.config import ModelConfig
from spannorm.model.transformer import DecoderLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model_config.json"


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_model(model: DecoderLM, directory: str | os.PathLike) -> None:
    """Write the weights and the model config into ``directory``, each through a temporary file and a rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write_bytes(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    text = json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True)
    _atomic_write_bytes(directory / CONFIG_NAME, lambda p: p.write_text(text))


def load_model_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a spannorm model directory")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> DecoderLM:
    """Rebuild the model from ``model_config.json`` and load ``model.safetensors`` strictly."""
    cfg = load_model_config(directory)
    model = DecoderLM(cfg)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: not a spannorm model directory")
    model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)
    return model
