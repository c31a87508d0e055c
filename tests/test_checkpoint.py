"""Checkpoints: optimizer state round trip, the latest pointer, and kill -9 in the middle of a write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import TEXT
from spannorm.config import ModelConfig
from spannorm.launch import train
from spannorm.model.io import load_model
from spannorm.model.transformer import SpanNormLM
from spannorm.train import checkpoint as ckpt_io
from spannorm.train.config import resolve_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_overrides(tmp_path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TEXT)
    return ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context_length=32",
            f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=4",
            "train.steps=6", "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=2",
            "train.keep_checkpoints=3", "train.precision=fp32", "train.progress=none",
            "train.tensorboard=false", "train.device=cpu"]


def test_optimizer_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    model = SpanNormLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, context_length=8))
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    idx = torch.randint(0, 256, (2, 8))
    for _ in range(2):
        model(idx, idx).loss.backward()
        opt.step()
    tensors, meta = ckpt_io.optimizer_to_files(opt)
    json.dumps(meta)
    fresh = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                               {"params": [p for p in model.parameters() if p.dim() < 2]}], lr=5.0)
    fresh.load_state_dict(ckpt_io.optimizer_from_files(tensors, json.loads(json.dumps(meta))))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, entries in a["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, b["state"][index][name]), (index, name)


def test_checkpoint_folder_is_a_model_folder_and_latest_falls_back(tmp_path):
    run = tmp_path / "run"
    train(resolve_config(None, None, tiny_overrides(tmp_path)), run)
    names = [p.name for p in ckpt_io.list_checkpoints(run)]
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    model = load_model(run / "checkpoints" / "step_00000006")
    assert model.cfg.d_model == 32
    (run / "checkpoints" / "latest").unlink()
    assert ckpt_io.latest_checkpoint(run).name == "step_00000006"
    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    assert ckpt_io.latest_checkpoint(run).name == "step_00000006"
    (run / "checkpoints" / "step_00000006" / "trainer_state.json").unlink()  # incomplete: skipped
    assert ckpt_io.latest_checkpoint(run).name == "step_00000004"
    assert not list((run / "checkpoints").glob(".*tmp*"))  # no temporary files left behind


WRITER = """
import sys, time, pathlib
import torch
from spannorm.launch import train
from spannorm.train import checkpoint
from spannorm.train.config import resolve_config

run, marker, phase, overrides = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4:]

def pause_in_write(current, path):
    if current == phase and "step_00000004" in path.name:
        marker.write_text(str(path))
        time.sleep(120)

checkpoint.write_hook = pause_in_write
torch.set_num_threads(1)
train(resolve_config(None, None, overrides), run)
"""


@pytest.mark.parametrize("phase", ["files_written", "before_latest"])
@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path, phase):
    run, marker = tmp_path / "run", tmp_path / "writing"
    overrides = tiny_overrides(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(marker), phase, *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer never reached checkpoint 4"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = ckpt_io.latest_checkpoint(run)
    # Killed with the step-4 files in a temporary folder: step 2 is the latest. Killed after the folder rename
    # but before the pointer moved: the pointer still names step 2, which is complete.
    assert latest.name == "step_00000002"
    model = load_model(latest)
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 2 and model.cfg.n_layers == 2
    # The run resumes from it and finishes; leftovers of the killed writer are cleaned up.
    summary = train(resolve_config(None, None, overrides), run, resume=True)
    assert summary.status == "completed" and summary.steps == 6
    assert ckpt_io.latest_checkpoint(run).name == "step_00000006"
    assert not list((run / "checkpoints").glob(".step_*"))
