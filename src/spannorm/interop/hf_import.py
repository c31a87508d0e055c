"""Import a local Hugging Face Llama, Mistral or Qwen2 checkpoint into a ``pre`` DecoderLM, or a folder that
spannorm's remote-code export wrote back into the model it came from.

A Llama decoder layer is exactly our ``pre`` block with RMSNorm, SwiGLU, rotate-half RoPE and no embedding
scale, so the import is a renaming of tensors plus a config translation (RoPE scaling of type linear, llama3
or yarn included). Things a Llama-style config can ask for that our model cannot compute (dynamic or longrope
RoPE, a head_dim other than hidden_size/heads, another activation) raise :class:`InteropError` instead of
loading a model that would compute something else. Only safetensors are read, and ``transformers`` is not
needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from spannorm.config import ROPE_SCALINGS, ConfigError, ModelConfig, upgrade_placement_name
from spannorm.interop import hf_names
from spannorm.interop.errors import InteropError
from spannorm.interop.safetensors_files import iter_tensors, tensor_names, weight_files
from spannorm.model.transformer import DecoderLM

HF_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
"""Files that travel with the weights on import and export (copied byte for byte, never executed)."""
SOURCE_HF_CONFIG = "source_hf_config.json"
"""The original ``config.json``, kept beside an imported spannorm model so that export can restore its
token ids."""

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}
"""HF ``architectures`` entry -> ``model_type``. All three share Llama's tensor names and decoder layer."""
REMOTE_CODE_ARCHITECTURE = "SpanNormForCausalLM"
REMOTE_CODE_MODEL_TYPE = "spannorm"
"""A folder written by ``export_hf_remote_code``: spannorm's tensor names, its config under ``spannorm_config``."""


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of an HF checkpoint directory, checked to be a supported causal-LM architecture."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: expected a Hugging Face checkpoint directory")
    path = directory / HF_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a Hugging Face checkpoint directory needs config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise InteropError(f"{path} must hold a JSON object")
    if not is_remote_code_export(config):
        hf_model_type(config, str(path))
    return config


def is_remote_code_export(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` is that of a spannorm remote-code export (any placement)."""
    return config.get("model_type") == REMOTE_CODE_MODEL_TYPE


def remote_code_model_config(config: dict[str, Any], context_length: int | None = None,
                             where: str = HF_CONFIG) -> ModelConfig:
    """The ModelConfig stored in a remote-code export, checked against the resolved fields its modeling code
    reads (a hand-edited config.json whose two halves disagree is refused)."""
    data = config.get("spannorm_config")
    if not isinstance(data, dict):
        raise InteropError(f"{where}: model_type {REMOTE_CODE_MODEL_TYPE!r} without a 'spannorm_config' object; "
                           "allowed: a folder written by spannorm export-hf")
    try:
        cfg = ModelConfig.from_saved(data)
    except ConfigError as err:
        raise InteropError(f"{where}: spannorm_config is invalid: {err}") from None
    resolved = {"layer_placements": cfg.layer_placements(), "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "norm": cfg.norm,
                "embedding_multiplier": cfg.embedding_multiplier, "rotary_theta": cfg.rope_theta,
                "rotary_scaling": cfg.rope_scaling, "tie_embeddings": cfg.tie_embeddings}
    if "placement_names" not in config and isinstance(config.get("layer_placements"), list):
        # exported before placement names 2: its layer list uses version 1's names, as its spannorm_config does
        config = {**config, "layer_placements": [upgrade_placement_name(p) for p in config["layer_placements"]]}
    for key, value in resolved.items():
        if config.get(key) != value:
            raise InteropError(f"{where}: {key}={config.get(key)!r} disagrees with spannorm_config, which implies "
                               f"{value!r}; allowed: a folder written by spannorm export-hf, unedited")
    if context_length is not None:
        try:
            cfg = ModelConfig.from_saved({**data, "context_length": context_length})
        except ConfigError as err:
            raise InteropError(f"context_length={context_length} is invalid: {err}") from None
    return cfg


def hf_model_type(config: dict[str, Any], where: str = HF_CONFIG) -> str:
    """The ``model_type`` (llama, mistral or qwen2) of a supported config; InteropError otherwise."""
    allowed = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = config.get("architectures") or []
    known = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if architectures and not known:
        raise InteropError(f"{where}: architecture {architectures[0]!r} is not supported; allowed: {allowed}")
    if known:
        return SUPPORTED_ARCHITECTURES[known[0]]
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES.values():
        raise InteropError(f"{where}: model_type {model_type!r} is not supported; allowed architectures: {allowed}")
    return str(model_type)  # one of SUPPORTED_ARCHITECTURES' values


ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                      "mscale", "mscale_all_dim", "truncate")}
"""The scaled RoPE types import computes exactly (``spannorm.model.layers.rope_frequencies``) and the keys of
each that it reads. Any other key in the section is refused rather than ignored."""


def rope_of(config: dict[str, Any], where: str = HF_CONFIG) -> tuple[float, dict[str, Any] | None]:
    """θ and the RoPE scaling, from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``
    (transformers 4). Plain RoPE gives scaling None; linear, llama3 and yarn give ``{"rope_type": ..., ...}``
    with ``original_max_position_embeddings`` defaulting to ``max_position_embeddings`` as transformers does.
    dynamic, longrope and anything else raise, as do per-layer-type RoPE and keys a type does not read."""
    theta = config.get("rope_theta")
    scaling: dict[str, Any] | None = None
    for key in ("rope_parameters", "rope_scaling"):
        section = config.get(key)
        if section is None:
            continue
        if not isinstance(section, dict) or any(isinstance(v, dict) for v in section.values()):
            raise InteropError(f"{where}: {key}={section!r} is not supported; only one RoPE for all layers")
        kind = section.get("rope_type", section.get("type", "default"))
        theta = section.get("rope_theta", theta)
        if kind == "default":
            continue
        if kind not in ROPE_KEYS:
            raise InteropError(f"{where}: {key} type {kind!r} is not supported; allowed: default, "
                               f"{', '.join(ROPE_KEYS)} (other scalings would compute other logits)")
        extra = sorted(set(section) - set(ROPE_KEYS[kind]) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise InteropError(f"{where}: {key} key {extra[0]!r} is not supported for rope_type {kind!r}; "
                               f"allowed: {', '.join(ROPE_KEYS[kind])}")
        scaling = {"rope_type": kind, **{k: section[k] for k in ROPE_KEYS[kind] if section.get(k) is not None}}
        if kind != "linear":
            original = config.get("original_max_position_embeddings", config.get("max_position_embeddings"))
            scaling.setdefault("original_max_position_embeddings", original)
        missing = [k for k in ROPE_SCALINGS[kind] if scaling.get(k) is None]
        if missing:
            raise InteropError(f"{where}: {key} of rope_type {kind!r} lacks {missing[0]!r}; it needs "
                               f"{', '.join(ROPE_SCALINGS[kind])}")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise InteropError(f"{where}: partial_rotary_factor={config['partial_rotary_factor']} is not supported; "
                           "RoPE rotates the whole head here")
    return (10000.0 if theta is None else float(theta)), scaling


def attention_window_of(config: dict[str, Any], model_type: str) -> int | None:
    """The sliding-attention window some layers use, or None when every layer attends to the full prefix."""
    window = config.get("sliding_window")
    if window is None:
        return None
    if model_type == "qwen2":
        # Qwen2 slides only with use_sliding_window, and only in layers >= max_window_layers.
        n_layers = config["num_hidden_layers"]
        if not config.get("use_sliding_window", False) or config.get("max_window_layers", n_layers) >= n_layers:
            return None
    layer_types = config.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def model_config_from_hf(config: dict[str, Any], *, bias: bool = False, context_length: int | None = None,
                         where: str = HF_CONFIG) -> ModelConfig:
    """The ``pre`` ModelConfig that computes what the HF config describes.

    ``bias``: whether the checkpoint has any projection bias (Llama's ``attention_bias``/``mlp_bias``, Qwen2's
    q/k/v biases); biases the checkpoint lacks are loaded as zeros. ``context_length``: the rotary table
    length; default ``max_position_embeddings``, capped at the sliding window when there is one, since only up
    to the window does full causal attention equal sliding attention.
    """
    if is_remote_code_export(config):
        return remote_code_model_config(config, context_length, where)
    model_type = hf_model_type(config, where)
    try:
        d_model = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        n_layers = int(config["num_hidden_layers"])
        vocab_size = int(config["vocab_size"])
        d_ff = int(config["intermediate_size"])
    except KeyError as err:
        raise InteropError(f"{where} lacks {err.args[0]!r}, which every Llama-style config has") from None
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise InteropError(f"{where}: hidden_act={act!r} is not supported; allowed: silu (SwiGLU)")
    head_dim = config.get("head_dim")
    if head_dim is not None and (d_model % n_heads or head_dim != d_model // n_heads):
        raise InteropError(f"{where}: head_dim={head_dim} is not supported; spannorm's head_dim is "
                           f"hidden_size/num_attention_heads = {d_model}/{n_heads}")
    window = attention_window_of(config, model_type)
    limit = int(config.get("max_position_embeddings", 2048))
    if window is not None:
        limit = min(limit, window)
    if context_length is None:
        context_length = limit
    elif window is not None and context_length > window:
        raise InteropError(f"context_length={context_length} is invalid: the checkpoint uses sliding-window "
                           f"attention (window {window}), which spannorm does not implement; allowed: <= {window}")
    rope_theta, rope_scaling = rope_of(config, where)
    init_std = float(config.get("initializer_range") or 0.02)
    try:
        return ModelConfig(
            vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads"), d_ff=d_ff, context_length=context_length,
            placement="pre", norm="rms", norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta, rope_scaling=rope_scaling, sliding_window=window,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            bias=bias, embed_scale=1.0, final_norm=True, delta_t=1.0, init="fixed", init_std=init_std)
    except ConfigError as err:
        raise InteropError(f"{where} maps to an invalid spannorm config: {err}") from None


def checkpoint_has_bias(names: list[str]) -> bool:
    """Whether any attention or MLP projection of the checkpoint has a bias."""
    return any(name.endswith(".bias") and (hf_names.from_hf(name) or "").startswith("blocks.") for name in names)


def import_hf(directory: str | os.PathLike, *, context_length: int | None = None) -> DecoderLM:
    """Load a local HF Llama/Mistral/Qwen2 checkpoint (``config.json`` + safetensors, sharded or not) into a
    ``pre`` DecoderLM in fp32 whose logits equal the HF model's.

    Every tensor of the checkpoint must find its place and every weight of the model must be filled: a tensor
    Llama does not have (or a shape that disagrees with ``config.json``) raises :class:`InteropError`.
    Missing projection biases (Qwen2 has none on o_proj and the MLP) are zeros.
    """
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    files = weight_files(directory)
    names = tensor_names(files)
    cfg = model_config_from_hf(hf_config, bias=checkpoint_has_bias(names), context_length=context_length,
                               where=str(directory / HF_CONFIG))
    ours_named = is_remote_code_export(hf_config)  # our own export stores our tensor names
    model = DecoderLM(cfg)
    params = model.state_dict()
    filled: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in iter_tensors(files):
            if hf_names.IGNORED_HF.search(name):
                continue
            ours = name if ours_named else hf_names.from_hf(name)
            if ours == "lm_head.weight" and cfg.tie_embeddings:
                continue  # a tied checkpoint that also stores the head: the embedding is the head
            if ours is None or ours not in params:
                unexpected.append(name)
                continue
            target = params[ours]
            if tuple(tensor.shape) != tuple(target.shape):
                raise InteropError(f"{directory}: tensor {name} has shape {tuple(tensor.shape)}, but config.json "
                                   f"implies {tuple(target.shape)}")
            target.copy_(tensor)
            filled.add(ours)
        if unexpected:
            raise InteropError(f"{directory}: {len(unexpected)} tensors have no place in a Llama-style model "
                               f"(first: {unexpected[0]}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        missing = []
        for name, tensor in params.items():
            if name in filled:
                continue
            if name.endswith(".bias") and not ours_named:
                tensor.zero_()  # a bias the checkpoint does not have computes nothing
            else:
                missing.append(name)
        if missing:
            first = missing[0] if ours_named else hf_names.to_hf(missing[0])
            raise InteropError(f"{directory}: the checkpoint lacks {len(missing)} weights (first: {first})")
    return model


def load_tokenizer(directory: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` stored as ``tokenizer.json`` in an HF checkpoint or spannorm model directory."""

    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: only the fast-tokenizer file tokenizer.json is read "
                                "(a SentencePiece tokenizer.model alone is not)")
    return Tokenizer.from_file(str(path))


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer and generation files that exist in ``source`` into ``target``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied
