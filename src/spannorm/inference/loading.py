"""Loading a model for inference: from a run folder (its latest checkpoint), a checkpoint folder or a model
folder, with its run config and its tokenizer, on the run's device unless told otherwise."""

from __future__ import annotations

import os

import torch

from spannorm.config import ConfigError
from spannorm.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer_json
from spannorm.model.checksums import CorruptCheckpoint
from spannorm.model.io import load_model
from spannorm.train.checkpoint import RUN_CONFIG_NAME, TOKENIZER_NAME, read_json, resolve_checkpoint
from spannorm.train.config import RunConfig


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu", *, use_intact: bool = False):
    """The model, its run config (None for a bare model folder), its tokenizer and the checkpoint folder,
    from a run folder (its latest checkpoint), a checkpoint folder, or a model folder written by
    ``save_model``.

    Raises :class:`spannorm.config.ConfigError` when ``path`` holds none of these, or when the tokenizer
    has more tokens than the model's vocabulary, and :class:`CorruptCheckpoint` (a ConfigError) naming the file
    when one of them is damaged (``use_intact``: fall back to the run's newest intact checkpoint)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} is invalid: no CUDA device is available; allowed: cpu")
    ckpt = resolve_checkpoint(path, use_intact=use_intact)
    if ckpt is None:
        raise ConfigError(f"checkpoint {str(path)!r} is invalid: no checkpoint found there; allowed: a run "
                          "folder, one of its checkpoints/step_* folders, or a folder with model.safetensors "
                          "and model_config.json")
    model = load_model(ckpt, map_location=device).to(device)
    run_cfg = None
    if (ckpt / RUN_CONFIG_NAME).is_file():
        try:
            run_cfg = RunConfig.from_saved(read_json(ckpt / RUN_CONFIG_NAME))
        except CorruptCheckpoint:
            raise
        except (ConfigError, TypeError, ValueError, KeyError) as err:
            raise CorruptCheckpoint(ckpt / RUN_CONFIG_NAME, str(err).splitlines()[0]) from None
    tokenizer: Tokenizer
    if (ckpt / TOKENIZER_NAME).is_file():
        try:
            tokenizer = load_tokenizer_json(ckpt / TOKENIZER_NAME)
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises a plain Exception for a bad file
            raise CorruptCheckpoint(ckpt / TOKENIZER_NAME, str(err).splitlines()[0] if str(err) else
                                    type(err).__name__) from None
    elif model.cfg.vocab_size == 256 and (run_cfg is None or run_cfg.data.tokenizer == "byte"):
        tokenizer = ByteTokenizer()
    else:
        raise ConfigError(f"checkpoint {str(ckpt)!r} has no tokenizer.json for its vocabulary of "
                          f"{model.cfg.vocab_size}; allowed: a checkpoint written by spannorm train")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"checkpoint {str(ckpt)!r} is invalid: its tokenizer has {tokenizer.vocab_size} tokens, "
                          f"its model a vocabulary of {model.cfg.vocab_size}; allowed: a tokenizer no larger "
                          "than the model's vocabulary")
    return model, run_cfg, tokenizer, ckpt


def run_device(path: str | os.PathLike, requested: str | None = None) -> tuple[str, str | None]:
    """The device to run a checkpoint on, and a one-line note when it differs from what was asked.

    ``requested`` None means the run's own ``train.device`` (``auto`` for a bare model folder): ``auto`` is
    CUDA when available, else the CPU. CUDA asked for (by the run or by ``requested``) on a machine without
    it falls back to the CPU, with the note saying so."""
    wanted = requested
    if wanted is None:
        ckpt = resolve_checkpoint(path)
        wanted = "auto"
        if ckpt is not None and (ckpt / RUN_CONFIG_NAME).is_file():
            wanted = read_json(ckpt / RUN_CONFIG_NAME).get("train", {}).get("device", "auto")
    if wanted == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    if wanted == "cuda" and not torch.cuda.is_available():
        origin = "the run's device" if requested is None else "--device"
        return "cpu", f"note: {origin} is cuda, which is not available here; running on the CPU"
    return wanted, None
