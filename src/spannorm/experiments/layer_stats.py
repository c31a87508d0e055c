"""Per-layer moments and gradients of a trained model on a fixed validation batch (SPEC §6, the study's view).

One forward and backward of the next-token loss, recorded at the residual stream's hook points with
:class:`~spannorm.diagnostics.recorder.ResidualRecorder`. For every stream point x_0 … x_L (the embedding
output, then each block's output) it records the RMS, the mean absolute value, the entry-wise variance and
max |x|, and the norm of the activation gradient ∂loss/∂x_l; for every block, the norm of its parameter
gradient. ResiDual (``residual``) has a second stream, d_0 … d_L (d_0 = x_0, then ``block{l}.dual``), which
only accumulates the branch outputs and is never normalized, while its x_l is a Post-LN stream: the same
moments of d_l are recorded under ``dual_*`` keys, so that a plot never passes x_l off as the stream that
grows. The richer stability toolkit lives in :mod:`spannorm.diagnostics`; this is the small summary the
study report plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spannorm.data.dataset import eval_batches, load_splits
from spannorm.diagnostics.recorder import ResidualRecorder
from spannorm.model import DecoderLM
from spannorm.model.io import load_model

STREAM_STATS = ("rms", "mean_abs", "variance", "max_abs", "grad_norm")
DUAL_STATS = tuple(f"dual_{name}" for name in STREAM_STATS)
"""ResiDual's dual stream d_0 … d_L, recorded beside x_0 … x_L (absent for single-stream placements)."""


def _moments(stream: list[torch.Tensor], grads: list[torch.Tensor], prefix: str = "") -> dict[str, list[float]]:
    return {
        f"{prefix}rms": [h.pow(2).mean().sqrt().item() for h in stream],
        f"{prefix}mean_abs": [h.abs().mean().item() for h in stream],
        f"{prefix}variance": [h.var(dim=-1, unbiased=False).mean().item() for h in stream],
        f"{prefix}max_abs": [h.abs().max().item() for h in stream],
        f"{prefix}grad_norm": [g.norm().item() for g in grads],
    }


def fixed_val_batch(data_cfg: Any, context_length: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch_size`` of the evenly spaced validation windows: the same batch for every run that
    shares the data config and context length."""
    _, splits = load_splits(data_cfg)
    batch = next(iter(eval_batches(splits.split("val"), context_length, batch_size, max_batches=1)), None)
    if batch is None:
        raise ValueError(f"the validation split holds no window of {context_length + 1} tokens")
    return batch


def measure_layer_stats(model: DecoderLM, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Moments of x_0 … x_L and gradient norms after one forward/backward on (inputs, targets), in fp32.

    Returns a JSON-ready dict: ``loss``, ``n_layers``, one list of L+1 values per name of
    :data:`STREAM_STATS`, ``param_grad_norm`` (one value per block) and, for ResiDual, one list per name of
    :data:`DUAL_STATS` (d_0 … d_L, d_0 being x_0)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with ResidualRecorder(model, grads=True) as rec:
            out = model(inputs, targets)
            out.loss.backward()
        stream = [h.float() for h in rec.stream()]
        grads = [g.float() for g in rec.stream_grads()]
        param_grads = []
        for block in model.blocks:
            squares = [p.grad.float().pow(2).sum() for p in block.parameters() if p.grad is not None]
            param_grads.append(torch.stack(squares).sum().sqrt().item() if squares else 0.0)
        stats: dict[str, Any] = {"loss": out.loss.item(), "n_layers": len(model.blocks),
                                 **_moments(stream, grads), "param_grad_norm": param_grads}
        dual = ["embed"] + [name for name in rec.activations if name.endswith(".dual")]
        if len(dual) > 1:
            stats.update(_moments([rec.activations[n].float() for n in dual],
                                  [rec.gradients[n].float() for n in dual], prefix="dual_"))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return stats


def measure_model_dir(model_dir: str | Path, data_cfg: Any, batch_size: int) -> dict[str, Any]:
    """Load a saved model (``model.safetensors`` + ``model_config.json``) and measure it on the fixed
    validation batch of ``data_cfg``."""
    model = load_model(model_dir)
    inputs, targets = fixed_val_batch(data_cfg, model.cfg.context_length, batch_size)
    stats = measure_layer_stats(model, inputs, targets)
    stats["batch_size"] = int(inputs.shape[0])
    stats["context_length"] = int(inputs.shape[1])
    return stats
