"""Export a DecoderLM to a Hugging Face directory: as ``LlamaForCausalLM`` when Llama computes the same function,
otherwise with its own modeling code (``hf_modeling/``, loaded with ``trust_remote_code=True``), which covers every
placement, dense or MoE.

A ``pre`` model (and ``lns``, whose norm-output scale is a constant) is a Llama model after three exact
rewrites that Llama has no field for: the embedding multiplier is folded into the embedding (and, with a tied
head, divided out of the final-norm gain), Δt is folded into the output projections, and LNS's 1/sqrt(l+1) is
folded into the input-norm gains.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from spannorm.config import PLACEMENT_NAMES, ModelConfig
from spannorm.interop import hf_names
from spannorm.interop.errors import InteropError
from spannorm.interop.hf_import import (
    HF_CONFIG,
    REMOTE_CODE_ARCHITECTURE,
    REMOTE_CODE_MODEL_TYPE,
    SOURCE_HF_CONFIG,
    TOKENIZER_FILE,
    copy_tokenizer_files,
)
from spannorm.interop.hf_tokenizer import BYTE_SPECIAL_ID, write_byte_tokenizer
from spannorm.interop.output_dir import write_directory
from spannorm.interop.safetensors_files import write_shards
from spannorm.model.placements import BLOCKS, LNSBlock, span_post_constants, span_scales
from spannorm.model.transformer import DecoderLM

LLAMA_LAYER_PLACEMENTS = tuple(p for p, cls in BLOCKS.items() if cls.why_not_llama is None)
"""Block placements a LlamaDecoderLayer computes exactly (after folding constants into weights): those whose
block class declares no ``why_not_llama``."""

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_spannorm.py", "modeling_spannorm.py")
"""The modeling code copied into a remote-code export; it imports torch and transformers only."""
AUTO_MAP = {"AutoConfig": "configuration_spannorm.SpanNormConfig",
            "AutoModelForCausalLM": "modeling_spannorm.SpanNormForCausalLM"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def llama_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Why HF's LlamaForCausalLM cannot compute this model; empty when it can."""
    reasons = []
    placements = cfg.layer_placements()
    for placement in dict.fromkeys(placements):
        if placement not in LLAMA_LAYER_PLACEMENTS:
            layers = [i for i, p in enumerate(placements) if p == placement]
            where = "every layer" if len(layers) == len(placements) else f"layers {layers}"
            reasons.append(f"{BLOCKS[placement].why_not_llama} ({where})")
    if cfg.norm != "rms":
        reasons.append("norm=layer: Llama uses RMSNorm, which neither subtracts the mean nor has a bias")
    if cfg.moe is not None:
        reasons.append("moe: Llama's MLP is one dense SwiGLU, not a mixture of experts")
    if cfg.embed_norm:
        reasons.append("embed_norm: Llama does not normalize the embedding output")
    if cfg.final_norm is False:
        reasons.append("final_norm=false: Llama always applies a final RMSNorm")
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "yarn":
        reasons.append("rope_scaling yarn: transformers 4 takes yarn's original context from "
                       "max_position_embeddings, so a Llama config cannot state it for every version")
    if cfg.sliding_window is not None and cfg.bias:
        reasons.append("sliding_window with bias: Mistral, the Llama model with a sliding window, has no biases")
    return reasons


def llama_config_dict(cfg: ModelConfig, dtype: str = "float32",
                      source_hf_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of the Llama model equal to ``cfg`` (token ids from the imported source, if any).
    RoPE θ is written both ways: ``rope_parameters`` (transformers 5) and ``rope_theta`` (transformers 4)."""
    source = source_hf_config or {}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        **({"rope_scaling": rope} if cfg.rope_scaling else {}),
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std if cfg.init == "fixed" else 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": source.get("bos_token_id"),
        "eos_token_id": source.get("eos_token_id"),
        "pad_token_id": source.get("pad_token_id"),
        "torch_dtype": dtype,
        **({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": cfg.sliding_window}
           if cfg.sliding_window is not None else {}),
    }


@torch.no_grad()
def llama_state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our weights under HF Llama names, with the embedding multiplier, Δt and LNS scales folded in (fp32)."""
    cfg = model.cfg
    reasons = llama_incompatibilities(cfg)
    if reasons:
        raise InteropError("HF cannot load this model as LlamaForCausalLM: " + "; ".join(reasons))
    state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    scale = cfg.embedding_multiplier
    state["embed.weight"] *= scale
    if cfg.tie_embeddings:
        state["final_norm.weight"] /= scale  # the head is the scaled embedding: undo the scale on the logits
        state.pop("lm_head.weight", None)
    for layer, block in enumerate(model.blocks):
        prefix = f"blocks.{layer}."
        norm_scale = block.norm_scale if isinstance(block, LNSBlock) else 1.0
        state[prefix + "attn_in_norm.weight"] *= norm_scale
        state[prefix + "ffn_in_norm.weight"] *= norm_scale
        for out_proj in ("attn.o_proj", "ffn.down_proj"):
            for kind in ("weight", "bias"):
                if prefix + f"{out_proj}.{kind}" in state:
                    state[prefix + f"{out_proj}.{kind}"] *= block.delta_t
    return {hf_names.to_hf(name): tensor for name, tensor in state.items()}


def _source_hf_config(source_dir: Path | None) -> dict[str, Any] | None:
    if source_dir is not None and (source_dir / SOURCE_HF_CONFIG).is_file():
        return json.loads((source_dir / SOURCE_HF_CONFIG).read_text())
    return None


def check_tokenizer_fits(cfg: ModelConfig, source_dir: Path | None) -> None:
    """Raise :class:`InteropError` when the ``tokenizer.json`` that would travel with the model has ids the model
    has no embedding row for."""
    if source_dir is None or not (source_dir / TOKENIZER_FILE).is_file():
        return
    try:
        size = HFTokenizer.from_file(str(source_dir / TOKENIZER_FILE)).get_vocab_size()
    except Exception as err:  # tokenizers raises its own exception type
        raise InteropError(f"{source_dir / TOKENIZER_FILE} is not a tokenizers JSON file "
                           f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if size > cfg.vocab_size:
        raise InteropError(f"{source_dir / TOKENIZER_FILE} has {size} tokens but the model embeds only "
                           f"{cfg.vocab_size}; allowed: a tokenizer whose ids all have an embedding row")


def _write_tokenizer(cfg: ModelConfig, source_dir: Path | None, target: Path) -> tuple[list[str], dict[str, Any]]:
    """Copy the tokenizer files of ``source_dir``; a model without a ``tokenizer.json`` and a vocabulary of 256
    was trained on bytes and gets the byte tokenizer (bos = eos = pad = 0). Returns the files and the token ids
    that the model config should name."""
    files = copy_tokenizer_files(source_dir, target) if source_dir is not None else []
    if TOKENIZER_FILE in files or cfg.vocab_size != 256:
        return files, {}
    files += write_byte_tokenizer(target, cfg.context_length)
    return files, {k: BYTE_SPECIAL_ID for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def export_hf(model: DecoderLM, out_dir: str | os.PathLike, *, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, source_dir: str | os.PathLike | None = None,
              overwrite: bool = False) -> list[str]:
    """Write ``model`` as a directory that ``transformers.LlamaForCausalLM.from_pretrained`` loads:
    ``config.json`` and safetensors (sharded above ``max_shard_bytes``), in ``dtype`` (float32, bfloat16 or
    float16). ``source_dir``: a spannorm model directory whose tokenizer files are copied and whose
    ``source_hf_config.json`` (written by import) gives the token ids; without a ``tokenizer.json`` there, a
    model with 256 tokens gets the byte tokenizer. Raises :class:`InteropError`, writing nothing, when Llama
    cannot compute this model (see :func:`llama_incompatibilities`; :func:`export_hf_remote_code` writes any
    model). Returns the file names written."""
    if dtype not in DTYPES:
        raise InteropError(f"dtype={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in llama_state_dict(model).items()}
    source_dir = Path(source_dir) if source_dir is not None else None
    check_tokenizer_fits(model.cfg, source_dir)
    config = llama_config_dict(model.cfg, dtype, _source_hf_config(source_dir))
    return _write_export(out_dir, model.cfg, state, config, source_dir, max_shard_bytes, overwrite)


def _write_export(out_dir: str | os.PathLike, cfg: ModelConfig, state: dict[str, Any], config: dict[str, Any],
                  source_dir: Path | None, max_shard_bytes: int, overwrite: bool,
                  modeling_files: tuple[str, ...] = ()) -> list[str]:
    """Write one export folder (atomically, see :func:`write_directory`): the weight shards, the
    ``modeling_files`` of ``hf_modeling/``, the tokenizer, and ``config.json`` completed with the tokenizer's
    special ids. Returns the file names written."""
    written: list[str] = []

    def fill(tmp: Path) -> None:
        written.extend(write_shards(state, tmp, max_shard_bytes))
        for name in modeling_files:
            shutil.copyfile(MODELING_DIR / name, tmp / name)
        written.extend(modeling_files)
        files, token_ids = _write_tokenizer(cfg, source_dir, tmp)
        config.update({k: v for k, v in token_ids.items() if config.get(k) is None})
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        written.append(HF_CONFIG)
        written.extend(files)

    write_directory(out_dir, fill, overwrite)
    return written


def remote_code_config_dict(model: DecoderLM, dtype: str = "float32",
                            source_hf_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a remote-code export: the fields ``hf_modeling/configuration_spannorm.py`` reads,
    every derived constant resolved (per-layer placements, SpanNorm's α, the embedding multiplier, the final
    norm, the expert width), plus spannorm's own config as ``spannorm_config`` for re-import."""
    cfg, source = model.cfg, source_hf_config or {}
    moe = None if cfg.moe is None else {"n_experts": cfg.moe.n_experts, "top_k": cfg.moe.top_k,
                                        "expert_hidden": cfg.expert_hidden, "shared_expert": cfg.moe.shared_expert}
    return {
        "architectures": [REMOTE_CODE_ARCHITECTURE],
        "model_type": REMOTE_CODE_MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "intermediate_size": cfg.ffn_hidden,
        "max_position_embeddings": cfg.context_length,
        "layer_placements": cfg.layer_placements(),
        "norm": cfg.norm,
        "norm_eps": cfg.norm_eps,
        "delta_t": cfg.delta_t,
        "placement_names": PLACEMENT_NAMES,
        "span_beta": span_scales(cfg)[0],
        "span_post_alpha": span_post_constants(cfg)[0],
        "span_post_beta": cfg.span_post_beta,
        "embedding_multiplier": cfg.embedding_multiplier,
        "embed_norm": cfg.embed_norm,
        "final_norm": model.final_norm is not None,
        "rotary_theta": cfg.rope_theta,
        "rotary_scaling": cfg.rope_scaling,
        "attention_window": cfg.sliding_window,
        "bias": cfg.bias,
        "tie_embeddings": cfg.tie_embeddings,
        "tie_word_embeddings": False,
        "moe": moe,
        "spannorm_config": cfg.to_dict(),
        "use_cache": True,
        "bos_token_id": source.get("bos_token_id"),
        "eos_token_id": source.get("eos_token_id"),
        "pad_token_id": source.get("pad_token_id"),
        "torch_dtype": dtype,
    }


def export_hf_remote_code(model: DecoderLM, out_dir: str | os.PathLike, *, dtype: str = "float32",
                          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                          source_dir: str | os.PathLike | None = None, overwrite: bool = False) -> list[str]:
    """Write any model (every placement, dense or MoE) as a directory that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` loads: ``config.json``
    with an ``auto_map``, the modeling code of ``hf_modeling/`` (torch and transformers only), safetensors under
    spannorm's own tensor names, and the tokenizer (as :func:`export_hf`). Returns the file names written."""
    if dtype not in DTYPES:
        raise InteropError(f"dtype={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    source_dir = Path(source_dir) if source_dir is not None else None
    check_tokenizer_fits(model.cfg, source_dir)
    config = remote_code_config_dict(model, dtype, _source_hf_config(source_dir))
    return _write_export(out_dir, model.cfg, state, config, source_dir, max_shard_bytes, overwrite,
                         MODELING_FILES)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    out_dir: Path
    hf_llama: bool
    """True: an HF LlamaForCausalLM directory. False: an HF directory with spannorm's own modeling code
    (``trust_remote_code=True``)."""
    reasons: list[str] = field(default_factory=list)
    """Why HF cannot load the model as Llama (empty when ``hf_llama``)."""
    files: list[str] = field(default_factory=list)

    def message(self) -> str:
        if self.hf_llama:
            return f"wrote a Hugging Face LlamaForCausalLM checkpoint to {self.out_dir}"
        return (f"wrote a Hugging Face checkpoint with its own modeling code (SpanNormForCausalLM) to "
                f"{self.out_dir}; HF cannot load it as LlamaForCausalLM because " + "; ".join(self.reasons) +
                f". Load it with AutoModelForCausalLM.from_pretrained('{self.out_dir}', trust_remote_code=True)")


def export_model(model: DecoderLM, out_dir: str | os.PathLike, *, dtype: str = "float32",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, source_dir: str | os.PathLike | None = None,
                 overwrite: bool = False) -> ExportResult:
    """Export as HF Llama when Llama computes this model, else with spannorm's own modeling code
    (:func:`export_hf_remote_code`), and say why in :attr:`ExportResult.reasons`."""
    reasons = llama_incompatibilities(model.cfg)
    write = export_hf_remote_code if reasons else export_hf
    files = write(model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, source_dir=source_dir,
                  overwrite=overwrite)
    return ExportResult(Path(out_dir), not reasons, reasons, files)
