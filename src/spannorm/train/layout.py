"""The run folder: every name a training run writes, defined once.

A run folder ``RUN/`` written by ``spannorm train`` holds

- ``config.yaml``: the resolved run config (:data:`CONFIG_NAME`);
- ``metrics.jsonl``: one JSON object per optimizer step (:data:`METRICS_NAME`);
- ``summary.json``: the run's outcome (:data:`SUMMARY_NAME`);
- ``tensorboard/``: TensorBoard event files (:data:`TENSORBOARD_DIR`);
- ``tokenizer.json``: the tokenizer, when it is not the byte tokenizer (:data:`TOKENIZER_NAME`);
- ``checkpoints/step_00000100/``: one folder per checkpoint (:data:`CHECKPOINTS_DIR`, :func:`step_dir_name`),
  and ``checkpoints/latest``, the name of the newest complete one (:data:`LATEST_NAME`).

A checkpoint folder holds a model folder (``model.safetensors`` and ``model_config.json``, whose names
:mod:`spannorm.model.io` defines), the optimizer state (:data:`OPTIMIZER_TENSORS_NAME`, :data:`OPTIMIZER_META_NAME`),
the trainer state (:data:`STATE_NAME`), the run config (:data:`RUN_CONFIG_NAME`) and, when there is one, the
tokenizer (:data:`TOKENIZER_NAME`). Everything else reads these names from here; this module imports
nothing from the package, so that any layer may read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------- the run folder
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
TENSORBOARD_DIR = "tensorboard"
TOKENIZER_NAME = "tokenizer.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
"""In ``checkpoints/``: a text file with the name of the newest complete checkpoint folder."""

RUN_OUTPUTS = (CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, TENSORBOARD_DIR, CHECKPOINTS_DIR, TOKENIZER_NAME)
"""Everything ``train`` writes into a run folder (and ``overwrite=True`` removes)."""

# ---------------------------------------------------------------------- one checkpoint folder
STATE_NAME = "trainer_state.json"
RUN_CONFIG_NAME = "run_config.json"
OPTIMIZER_TENSORS_NAME = "optimizer.safetensors"
OPTIMIZER_META_NAME = "optimizer.json"

STEP_DIR_PATTERN = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """The checkpoint folder name of optimizer step ``step``: ``step_00000100``."""
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_NAME

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_NAME

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_NAME

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        """The folder checkpoint ``step`` is (or would be) written to."""
        return self.checkpoints / step_dir_name(step)

    def outputs(self) -> list[Path]:
        """Every path ``train`` writes here (:data:`RUN_OUTPUTS`)."""
        return [self.root / name for name in RUN_OUTPUTS]


__all__ = ["CHECKPOINTS_DIR", "CONFIG_NAME", "LATEST_NAME", "METRICS_NAME", "OPTIMIZER_META_NAME",
           "OPTIMIZER_TENSORS_NAME", "RUN_CONFIG_NAME", "RUN_OUTPUTS", "RunFolder", "STATE_NAME", "STEP_DIR_PATTERN",
           "SUMMARY_NAME", "TENSORBOARD_DIR", "TOKENIZER_NAME", "step_dir_name"]
