"""Export a DecoderLM: as a Hugging Face ``LlamaForCausalLM`` directory when Llama computes the same function,
otherwise as a spannorm model directory with the reasons HF cannot load it as Llama.

A ``pre`` model (and ``lns``, whose norm-output scale is a constant) is a Llama model after three exact
rewrites that Llama has no field for: the embedding multiplier is folded into the embedding (and, with a tied
head, divided out of the final-norm gain), Δt is folded into the output projections, and LNS's 1/sqrt(l+1) is
folded into the input-norm gains.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spannorm.config import ModelConfig
from spannorm.interop import hf_names
from spannorm.interop.errors import InteropError
from spannorm.interop.hf_import import HF_CONFIG, SOURCE_HF_CONFIG, copy_tokenizer_files
from spannorm.interop.output_dir import write_directory
from spannorm.interop.safetensors_files import write_shards
from spannorm.model.io import save_model
from spannorm.model.placements import BLOCKS, LNSBlock
from spannorm.model.transformer import DecoderLM

LLAMA_LAYER_PLACEMENTS = tuple(p for p, cls in BLOCKS.items() if cls.why_not_llama is None)
"""Block placements a LlamaDecoderLayer computes exactly (after folding constants into weights): those whose
block class declares no ``why_not_llama``."""

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
    return reasons


def llama_config_dict(cfg: ModelConfig, dtype: str = "float32",
                      source_hf_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of the Llama model equal to ``cfg`` (token ids from the imported source, if any).
    RoPE θ is written both ways: ``rope_parameters`` (transformers 5) and ``rope_theta`` (transformers 4)."""
    source = source_hf_config or {}
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
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
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


def export_hf(model: DecoderLM, out_dir: str | os.PathLike, *, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, source_dir: str | os.PathLike | None = None,
              overwrite: bool = False) -> list[str]:
    """Write ``model`` as a directory that ``transformers.LlamaForCausalLM.from_pretrained`` loads:
    ``config.json`` and safetensors (sharded above ``max_shard_bytes``), in ``dtype`` (float32, bfloat16 or
    float16). ``source_dir``: a spannorm model directory whose tokenizer files are copied and whose
    ``source_hf_config.json`` (written by import) gives the token ids. Raises :class:`InteropError`, writing
    nothing, when Llama cannot compute this model (see :func:`llama_incompatibilities`). Returns the file names
    written."""
    if dtype not in DTYPES:
        raise InteropError(f"dtype={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in llama_state_dict(model).items()}
    source_dir = Path(source_dir) if source_dir is not None else None
    config = llama_config_dict(model.cfg, dtype, _source_hf_config(source_dir))
    written: list[str] = []

    def fill(tmp: Path) -> None:
        written.extend(write_shards(state, tmp, max_shard_bytes))
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        written.append(HF_CONFIG)
        if source_dir is not None:
            written.extend(copy_tokenizer_files(source_dir, tmp))

    write_directory(out_dir, fill, overwrite)
    return written


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    out_dir: Path
    hf_llama: bool
    """True: an HF LlamaForCausalLM directory. False: a spannorm model directory (``spannorm.model.io``)."""
    reasons: list[str] = field(default_factory=list)
    """Why HF cannot load the model as Llama (empty when ``hf_llama``)."""
    files: list[str] = field(default_factory=list)

    def message(self) -> str:
        if self.hf_llama:
            return f"wrote a Hugging Face LlamaForCausalLM checkpoint to {self.out_dir}"
        return (f"wrote a spannorm checkpoint (model.safetensors + model_config.json) to {self.out_dir}; "
                f"Hugging Face cannot load it as LlamaForCausalLM because " + "; ".join(self.reasons) +
                ". Load it with spannorm.model.io.load_model")


def export_model(model: DecoderLM, out_dir: str | os.PathLike, *, dtype: str = "float32",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, source_dir: str | os.PathLike | None = None,
                 overwrite: bool = False) -> ExportResult:
    """Export as HF Llama when Llama computes this model, else as a spannorm model directory (fp32 weights,
    ``model_config.json``, tokenizer files) and say why in :attr:`ExportResult.reasons`."""
    out_dir = Path(out_dir)
    reasons = llama_incompatibilities(model.cfg)
    if not reasons:
        files = export_hf(model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, source_dir=source_dir,
                          overwrite=overwrite)
        return ExportResult(out_dir, True, [], files)
    files: list[str] = []

    def fill(tmp: Path) -> None:
        save_model(model, tmp)
        if source_dir is not None:
            copy_tokenizer_files(Path(source_dir), tmp)
        files.extend(sorted(p.name for p in tmp.iterdir()))

    write_directory(out_dir, fill, overwrite)
    return ExportResult(out_dir, False, reasons, files)
