"""Stability measurements during training, as a trainer callback (:class:`spannorm.train.callbacks.Callback`).

Every ``every`` optimizer steps, :class:`DiagnosticsCallback` measures the model (:func:`~spannorm.diagnostics.
measure.measure`) on one fixed validation batch, drawn when training starts, and adds scalar summaries to the
step's record under ``diag/`` (so they land in ``metrics.jsonl``), and to TensorBoard with the per-layer
profiles under ``diag_layers/``. Measuring differentiates the loss with ``torch.autograd.grad``: the
optimizer's gradients and the training data stream are not touched. Enable it with
``train.diagnostics_every=N`` (``spannorm train --set train.diagnostics_every=50``; :func:`spannorm.launch.train`
builds the callback) or pass it to ``train()``::

    from spannorm.diagnostics.callback import DiagnosticsCallback
    train(cfg, out_dir, callbacks=[DiagnosticsCallback(every=50)])

It keeps no state across a resume: the fixed batch is drawn again, the same, when training restarts.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from spannorm.diagnostics.measure import Measurement, measure
from spannorm.train.callbacks import Callback

PREFIX = "diag/"


class DiagnosticsCallback(Callback):
    """Measure every ``every`` steps (and at the last step) on a fixed batch of ``split``."""

    def __init__(self, every: int, split: str = "val", per_layer_tensorboard: bool = True):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.every, self.split, self.per_layer_tensorboard = every, split, per_layer_tensorboard
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: Measurement | None = None

    def on_train_start(self, trainer: Any) -> None:
        self.batch = trainer.sample_batch(self.split)

    def needs_step_end_at_once(self, step: int) -> bool:
        """It measures the model as it is right after the step (the last step reads anyway)."""
        return step % self.every == 0

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        final = step == trainer.cfg.train.steps
        if step % self.every and not final:
            return
        if self.batch is None:
            self.batch = trainer.sample_batch(self.split)
        was_training = trainer.model.training
        self.last = m = measure(trainer.model, *self.batch)
        trainer.model.train(was_training)
        summary = {PREFIX + key: value for key, value in m.summary().items()}
        record.update(summary)
        tb = getattr(trainer, "tb", None)
        if tb is None:
            return
        for key, value in summary.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                tb.add_scalar(key, value, step)
        if self.per_layer_tensorboard:
            profiles = {"variance": m.stream_variance, "rms": m.at_stream(m.rms),
                        "max_abs": m.at_stream(m.max_abs)}
            if m.block_input_grad_norm is not None:
                profiles["grad_norm"] = m.block_input_grad_norm
            for name, values in profiles.items():
                for layer, value in enumerate(values):
                    if math.isfinite(value):
                        tb.add_scalar(f"diag_layers/{name}/x{layer}", value, step)
