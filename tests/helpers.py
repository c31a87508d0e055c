"""Constants and small builders shared by several test modules (fixtures live in conftest.py). Import as
``from helpers import ...``: pytest puts this folder on ``sys.path``."""

import inspect
import json
import subprocess
import sys
import textwrap

import yaml

from spannorm.train.config import RunConfig, resolve_config

TEXT = (inspect.getsource(json.decoder) + inspect.getsource(textwrap)).encode()
"""A small training corpus: real Python source from the standard library, the same bytes on every machine with
the same Python."""


def tiny_run_config(tmp_path, *overrides: str) -> RunConfig:
    """A 2-layer, width-32 run on :data:`TEXT` written into ``tmp_path``, fp32 on the CPU; ``overrides`` on top."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_bytes(TEXT)
    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context_length=32",
            f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=4",
            "train.eval_batches=2", "train.precision=fp32", "train.progress=none", "train.tensorboard=false",
            "optim.lr=3e-3", "optim.warmup_steps=2", "train.device=cpu"]
    return resolve_config(None, None, base + list(overrides))


def tiny_sweep_base(cache_dir) -> dict:
    """A plan's ``base`` for sweeps that train in seconds: width 16, 3 steps, the embedded corpus, fp32."""
    return {"config": {
        "model": {"d_model": 16, "n_heads": 2, "context_length": 16},
        "data": {"embedded_max_bytes": 60000, "cache_dir": str(cache_dir)},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 3, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "tensorboard": False,
                  "progress": "none", "checkpoint_every": 0, "keep_checkpoints": 1, "device": "cpu",
                  "precision": "fp32"}}}


def refused_sweep_line(tmp_path, plan: dict) -> str:
    """Run ``spannorm sweep`` on ``plan`` (written to ``tmp_path``), assert that it is refused the house way (exit
    2, nothing written, one line on stderr) and return that line."""
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spannorm", "sweep", str(plan_file), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
