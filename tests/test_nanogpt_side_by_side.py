"""benchmarks/nanogpt_side_by_side.py without nanoGPT: the byte data it writes for nanoGPT is spannorm's split
of the same bytes, and its log parsing reads nanoGPT's step times and validation losses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from spannorm.data.dataset import split_point

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("nanogpt_side_by_side",
                                                  ROOT / "benchmarks" / "nanogpt_side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_byte_dataset_is_spannorms_split_of_the_same_bytes(script, tmp_path):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(200)).encode()
    (tmp_path / "in.txt").write_bytes(text)
    info = script.write_byte_dataset(tmp_path / "in.txt", tmp_path / "data")
    cut = split_point(text, 0.1)
    train = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "data" / "val.bin", dtype=np.uint16)
    assert info == {"train_tokens": cut, "val_tokens": len(text) - cut}
    assert bytes(train.astype(np.uint8)) == text[:cut] and bytes(val.astype(np.uint8)) == text[cut:]


def test_logs_of_both_runs_are_parsed(script, tmp_path):
    log = "\n".join(["step 0: train loss 5.5000, val loss 5.6000", "iter 0: loss 5.5, time 900.00ms, mfu -100.00%",
                     "iter 1: loss 5.0, time 100.00ms, mfu 0.00%", "iter 2: loss 4.0, time 300.00ms, mfu 0.00%",
                     "iter 3: loss 3.0, time 200.00ms, mfu 0.00%", "step 4: train loss 3.0000, val loss 3.2500"])
    nano = script.parse_nanogpt(log)
    assert nano["median_step_s"] == pytest.approx(0.2) and nano["steps_timed"] == 3  # iteration 0 excluded
    assert nano["tokens_per_s"] == pytest.approx(768 / 0.2)
    assert nano["val_losses"] == [(0, 5.6), (4, 3.25)] and nano["final_val_loss"] == 3.25
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 1, "tokens_per_s": 1.0}, {"step": 2, "tokens_per_s": 768 / 0.1},
               {"step": 3, "tokens_per_s": 768 / 0.3}, {"step": 4, "tokens_per_s": 768 / 0.2, "val_loss": 3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ours = script.parse_spannorm(run)  # unfinished: no summary.json yet
    assert ours["median_step_s"] == pytest.approx(0.2) and ours["steps_timed"] == 3  # the first step excluded
    assert ours["val_losses"] == [(4, 3.0)] and ours["final_val_loss"] is None and ours["last_step"] == 4
