"""Start a model from a checkpoint: an HF Llama-style directory or a spannorm model directory, optionally
converted to another placement (for continued pretraining under a different normalization).

Conversion copies every tensor whose name and shape match, starts norms the source does not have at identity
(gain 1, bias 0) and drops source tensors the target has no place for. Identity norms do not make the new
model compute the old function: a norm at identity still normalizes. Every such change is listed in
:class:`ConversionReport` and logged as a warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spannorm.config import ConfigError, ModelConfig
from spannorm.interop.errors import InteropError
from spannorm.interop.hf_import import (
    HF_CONFIG,
    TOKENIZER_FILE,
    checkpoint_has_bias,
    import_hf,
    model_config_from_hf,
    read_hf_config,
)
from spannorm.interop.safetensors_files import tensor_names, weight_files
from spannorm.model.io import CONFIG_NAME, load_model, load_model_config
from spannorm.model.layers import LayerNorm, RMSNorm
from spannorm.model.transformer import DecoderLM
from spannorm.train.checkpoint import resolve_checkpoint
from spannorm.train.layout import CHECKPOINTS_DIR

log = logging.getLogger(__name__)

SHAPE_FIELDS = (("vocab_size", "vocab_size"), ("d_model", "d_model"), ("n_layers", "n_layers"),
                ("n_heads", "n_heads"), ("n_kv_heads", "kv_heads"), ("d_ff", "ffn_hidden"), ("bias", "bias"))
"""(config field named in errors, attribute compared): what must match for every weight to be reused."""


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The folder holding the weights: ``path`` itself, or for a ``spannorm train`` run folder its latest
    checkpoint."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir() and not (path / CONFIG_NAME).is_file():
        found = resolve_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path / CHECKPOINTS_DIR} holds no complete checkpoint")
        return found
    return path


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``spannorm`` (``model_config.json``) or ``hf`` (``config.json``); FileNotFoundError otherwise."""
    path = resolve_checkpoint_dir(path)
    if (path / CONFIG_NAME).is_file():
        return "spannorm"
    if (path / HF_CONFIG).is_file():
        return "hf"
    raise FileNotFoundError(f"{path} is neither a spannorm model directory ({CONFIG_NAME}), nor a spannorm run "
                            f"folder, nor a Hugging Face checkpoint directory ({HF_CONFIG})")


def checkpoint_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, read without loading its weights. Start a conversion from it:
    ``dataclasses.replace(checkpoint_model_config(path), placement="span")``."""
    if checkpoint_kind(path) == "spannorm":
        return load_model_config(resolve_checkpoint_dir(path))
    hf_config = read_hf_config(path)
    names = tensor_names(weight_files(Path(path)))
    return model_config_from_hf(hf_config, bias=checkpoint_has_bias(names), where=str(Path(path) / HF_CONFIG))


def load_checkpoint(path: str | os.PathLike) -> DecoderLM:
    """The model stored in a spannorm model directory (or run folder) or an HF Llama/Mistral/Qwen2 directory
    (as ``pre``)."""
    return load_model(resolve_checkpoint_dir(path)) if checkpoint_kind(path) == "spannorm" else import_hf(path)


def _as_config_error(path: str | os.PathLike, fn, *args):
    try:
        return fn(*args)
    except (FileNotFoundError, InteropError) as err:
        raise ConfigError(f"train.init_from={str(path)!r} is invalid: {err}") from None


def run_config_layer(path: str | os.PathLike) -> dict[str, Any]:
    """The config layer ``train.init_from`` puts over the preset and under the config file and overrides: the
    checkpoint's model section, and its ``tokenizer.json`` as ``data.tokenizer`` when it has one."""
    model_cfg = _as_config_error(path, checkpoint_model_config, path)
    layer: dict[str, Any] = {"model": model_cfg.to_dict()}
    tokenizer = _as_config_error(path, resolve_checkpoint_dir, path) / TOKENIZER_FILE
    if tokenizer.is_file():
        layer["data"] = {"tokenizer": str(tokenizer)}
    return layer


def check_init_target(path: str | os.PathLike, target_cfg: ModelConfig,
                      tokenizer_vocab_size: int | None = None) -> None:
    """Raise :class:`ConfigError` (reading configs only, no weights) unless :func:`init_model_from` can build
    ``target_cfg`` from the checkpoint and every token id of the tokenizer has an embedding row."""
    source = _as_config_error(path, checkpoint_model_config, path)
    _check_shapes(source, target_cfg)
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > source.vocab_size:
        raise ConfigError(f"data.tokenizer is invalid for train.init_from={str(path)!r}: it has "
                          f"{tokenizer_vocab_size} tokens but the checkpoint embeds only {source.vocab_size}; "
                          "allowed: the checkpoint's own tokenizer")


@dataclass
class ConversionReport:
    """What :func:`convert_model` did with each tensor, and how the new model's function differs."""

    copied: list[str] = field(default_factory=list)
    identity_norms: list[str] = field(default_factory=list)
    """Norm parameters the source has no counterpart for, started at gain 1 / bias 0."""
    dropped: list[str] = field(default_factory=list)
    """Source tensors the target has no place for (their trained values are lost)."""
    head_from_embedding: bool = False
    """The source ties its head; the untied target's head starts as a copy of the embedding."""
    function_changes: list[str] = field(default_factory=list)
    """Why the target will not compute exactly what the source computed (empty: it does)."""


def _norm_parameter_names(model: DecoderLM) -> set[str]:
    return {f"{module_name}.{param_name}"
            for module_name, module in model.named_modules() if isinstance(module, (RMSNorm, LayerNorm))
            for param_name, _ in module.named_parameters(recurse=False)}


def _check_shapes(source: ModelConfig, target: ModelConfig) -> None:
    for field_name, attribute in SHAPE_FIELDS:
        have, want = getattr(source, attribute), getattr(target, attribute)
        if have != want:
            raise ConfigError(f"model.{field_name}={getattr(target, field_name)!r} is invalid: the checkpoint has "
                              f"{field_name}={have!r}, and initializing from it needs every weight shape to match")
    source_moe = None if source.moe is None else source.moe.__dict__
    target_moe = None if target.moe is None else target.moe.__dict__
    if (source_moe is None) != (target_moe is None) or (
            source_moe and target_moe
            and any(source_moe[k] != target_moe[k] for k in ("n_experts", "d_expert", "shared_expert"))):
        raise ConfigError(f"model.moe={target_moe!r} is invalid: the checkpoint has moe={source_moe!r}, and "
                          "initializing from it needs the same experts")
    if source.sliding_window is not None and target.sliding_window != source.sliding_window:
        raise ConfigError(f"model.sliding_window={target.sliding_window!r} is invalid: the checkpoint was trained "
                          f"with sliding-window attention (window {source.sliding_window}), which spannorm does not "
                          f"implement; allowed: {source.sliding_window}, with context_length <= it")
    if not source.tie_embeddings and target.tie_embeddings:
        raise ConfigError("model.tie_embeddings=True is invalid: the checkpoint has a separate output head that "
                          "tying would discard; allowed: false")


def _function_changes(source: ModelConfig, target: ModelConfig, dropped: list[str]) -> list[str]:
    changes = []
    before, after = source.layer_placements(), target.layer_placements()
    if before != after:
        changed = sorted({f"{a}->{b}" for a, b in zip(before, after) if a != b})
        changes.append(f"placement {', '.join(changed)}: the new norms start at identity, but a norm at identity "
                       "still normalizes, so the network computes a different function from step 0")
    if source.embedding_multiplier != target.embedding_multiplier:
        changes.append(f"embedding multiplier {source.embedding_multiplier:g} -> {target.embedding_multiplier:g}; "
                       f"set model.embed_scale={source.embedding_multiplier:g} to keep it")
    for name in ("norm", "norm_eps", "rope_theta", "rope_scaling", "delta_t", "embed_norm"):
        if getattr(source, name) != getattr(target, name):
            changes.append(f"{name} {getattr(source, name)!r} -> {getattr(target, name)!r}")
    if dropped:
        changes.append(f"{len(dropped)} trained tensors have no place in the target and are dropped "
                       f"(e.g. {dropped[0]})")
    return changes


@torch.no_grad()
def convert_model(source: DecoderLM, target_cfg: ModelConfig) -> tuple[DecoderLM, ConversionReport]:
    """A new ``DecoderLM(target_cfg)`` holding ``source``'s weights where names and shapes match, with the
    norms the source lacks at identity. Raises :class:`ConfigError` when a weight shape would differ."""
    _check_shapes(source.cfg, target_cfg)
    target = DecoderLM(target_cfg)
    source_state, target_state = source.state_dict(), target.state_dict()
    norm_names = _norm_parameter_names(target)
    report = ConversionReport()
    for name, tensor in target_state.items():
        if name in source_state:
            tensor.copy_(source_state[name])
            report.copied.append(name)
        elif name == "lm_head.weight":
            tensor.copy_(source_state["embed.weight"])
            report.head_from_embedding = True
        elif name in norm_names:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
            report.identity_norms.append(name)
        else:
            raise ConfigError(f"the target model's {name} has no counterpart in the checkpoint")
    report.dropped = [name for name in source_state if name not in target_state]
    report.function_changes = _function_changes(source.cfg, target_cfg, report.dropped)
    return target, report


def init_model_from(path: str | os.PathLike, target_cfg: ModelConfig | None = None) -> DecoderLM:
    """The model to continue training from the checkpoint at ``path`` (an HF Llama/Mistral/Qwen2 directory or a
    spannorm model directory). With ``target_cfg``, convert it (see :func:`convert_model`) and log each way the
    converted model's function differs from the checkpoint's."""
    source = load_checkpoint(path)
    if target_cfg is None:
        return source
    model, report = convert_model(source, target_cfg)
    for change in report.function_changes:
        log.warning("init from %s: %s", path, change)
    return model
