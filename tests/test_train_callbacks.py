"""The callback contract of the trainer (spannorm.train.callbacks): hooks arrive in order with what they
promise, every callback's state resumes exactly across a checkpoint, a checkpoint without a callback's state
leaves it fresh, and bad callbacks are refused with one line. Also the layering the trainer's redesign
promised: the trainer does not import the diagnostics or the launch module, and the parallel contexts do not
import the trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spannorm.launch import train
from spannorm.train import checkpoint as ckpt_io
from spannorm.train.callbacks import HOOKS, Callback
from spannorm.train.config import RunConfig, resolve_config
from spannorm.train.layout import RunFolder

TEXT = (Path(json.__file__).read_text() + Path(__file__).read_text()) * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny_cfg(tmp_path, *overrides: str) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context_length=32",
            f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=4",
            "train.steps=6", "train.eval_every=2", "train.eval_batches=2", "train.checkpoint_every=2",
            "train.progress=none", "train.tensorboard=false", "optim.lr=3e-3", "optim.warmup_steps=2",
            "train.device=cpu"]
    return resolve_config(None, None, base + list(overrides))


class Recorder(Callback):
    """Records every hook call as (hook, step) with what the hook was given."""

    def __init__(self):
        self.calls: list[tuple[str, int | None]] = []
        self.step_end_keys: list[set[str]] = []
        self.evaluation_keys: list[set[str]] = []
        self.checkpoints_complete: list[bool] = []
        self.summary = None

    def on_train_start(self, trainer):
        self.calls.append(("on_train_start", trainer.step))

    def on_after_backward(self, trainer, step):
        self.calls.append(("on_after_backward", step))

    def on_evaluation(self, trainer, step, record):
        self.calls.append(("on_evaluation", step))
        self.evaluation_keys.append(set(record))

    def on_step_end(self, trainer, step, record):
        self.calls.append(("on_step_end", step))
        self.step_end_keys.append(set(record))
        record["recorded"] = step  # a key added here reaches metrics.jsonl

    def on_checkpoint(self, trainer, step, path):
        self.calls.append(("on_checkpoint", step))
        self.checkpoints_complete.append(ckpt_io.is_complete(path) and path.name == f"step_{step:08d}")

    def on_train_end(self, trainer, summary):
        self.calls.append(("on_train_end", summary.steps))
        self.summary = summary


def test_a_callback_receives_every_hook_in_order(tmp_path):
    recorder = Recorder()
    run = tmp_path / "run"
    summary = train(tiny_cfg(tmp_path, "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2"), run,
                    callbacks=[recorder])
    expected = [("on_train_start", 0)]
    for step in range(1, 5):
        expected.append(("on_after_backward", step))
        if step % 2 == 0:
            expected.append(("on_evaluation", step))
        expected.append(("on_step_end", step))
        if step % 2 == 0:
            expected.append(("on_checkpoint", step))
    expected.append(("on_train_end", 4))
    assert recorder.calls == expected
    assert {hook for hook, _ in recorder.calls} == set(HOOKS)
    # The built-in callbacks run before the caller's: spike scores are in every step's record, and an
    # evaluation's record holds the validation results with val_above_best.
    assert all({"train_loss", "grad_norm", "loss_z", "grad_norm_spike", "tokens_per_s"} <= keys
               for keys in recorder.step_end_keys)
    assert all({"val_loss", "val_ppl", "val_bpb", "val_above_best"} <= keys for keys in recorder.evaluation_keys)
    assert recorder.checkpoints_complete == [True, True]  # on_checkpoint comes once the folder is complete
    assert recorder.summary is summary
    records = [json.loads(line) for line in RunFolder(run).metrics.read_text().splitlines()]
    assert [r["recorded"] for r in records] == [1, 2, 3, 4]  # the metrics writer runs after the caller's


class RunningStats(Callback):
    """Stateful: counts steps, keeps every train loss it saw and the evaluations' losses."""

    state_key = "running_stats"

    def __init__(self):
        self.steps_seen = 0
        self.losses: list[float] = []
        self.val_losses: list[float] = []
        self.loaded: dict | None = None

    def on_step_end(self, trainer, step, record):
        self.steps_seen += 1
        self.losses.append(record["train_loss"])

    def on_evaluation(self, trainer, step, record):
        self.val_losses.append(record["val_loss"])

    def state_dict(self):
        return {"steps_seen": self.steps_seen, "losses": list(self.losses), "val_losses": list(self.val_losses)}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.steps_seen = state["steps_seen"]
        self.losses = list(state["losses"])
        self.val_losses = list(state["val_losses"])


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, record):
        if step == self.step:
            trainer.request_stop("test stop")


def test_callback_state_resumes_exactly_across_a_checkpoint(tmp_path):
    straight = RunningStats()
    train(tiny_cfg(tmp_path, "train.checkpoint_every=100"), tmp_path / "straight", callbacks=[straight])
    first = RunningStats()
    run = tmp_path / "split"
    interrupted = train(tiny_cfg(tmp_path, "train.checkpoint_every=100"), run, callbacks=[first, StopAt(3)])
    assert interrupted.status == "interrupted" and interrupted.steps == 3
    saved = ckpt_io.read_json(ckpt_io.latest_checkpoint(run) / ckpt_io.STATE_NAME)
    assert saved["running_stats"] == first.state_dict()  # in the checkpoint's JSON, under its state_key
    assert saved["spike_history"]["loss"] == first.losses  # the spike scores' state beside it
    second = RunningStats()
    resumed = train(tiny_cfg(tmp_path, "train.checkpoint_every=100"), run, resume=True, callbacks=[second])
    assert resumed.status == "completed" and resumed.steps == 6
    assert second.loaded == first.state_dict()
    assert second.state_dict() == straight.state_dict()  # bit-identical losses, as if never interrupted
    assert second.steps_seen == 6 and len(second.val_losses) == 3


def test_a_checkpoint_without_a_callbacks_state_leaves_it_fresh(tmp_path):
    """A checkpoint written before a callback existed (or before callbacks had state) has no entry for it."""
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path, "train.checkpoint_every=100"), run, callbacks=[StopAt(3)])
    state_file = ckpt_io.latest_checkpoint(run) / ckpt_io.STATE_NAME
    state = json.loads(state_file.read_text())
    assert "running_stats" not in state
    fresh = RunningStats()
    summary = train(tiny_cfg(tmp_path, "train.checkpoint_every=100"), run, resume=True, callbacks=[fresh])
    assert summary.steps == 6 and fresh.loaded is None and fresh.steps_seen == 3  # only the steps it saw


def test_an_object_with_hook_methods_is_a_callback_too(tmp_path):
    class Plain:
        def __init__(self):
            self.steps = []

        def on_step_end(self, trainer, step, record):
            self.steps.append(step)

    plain = Plain()
    # Stateless callbacks of one class share no state key, so two of them are fine.
    summary = train(tiny_cfg(tmp_path, "train.steps=3"), tmp_path / "run", callbacks=[plain, StopAt(9), StopAt(8)])
    assert plain.steps == [1, 2, 3] and summary.status == "completed"


def test_bad_callbacks_are_refused_with_one_line_before_anything_is_written(tmp_path):
    class OldName:
        def on_eval(self, trainer, step, record):
            pass

    class Twin(RunningStats):
        pass

    class TakesTheSampler(RunningStats):
        state_key = "sampler"

    with pytest.raises(TypeError, match=r"^callback OldName has a method on_eval, which is not a hook; allowed: "
                                        r"on_train_start, .*on_evaluation") as err:
        train(tiny_cfg(tmp_path), tmp_path / "run", callbacks=[OldName()])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="saves its state under 'running_stats', which callback RunningStats uses"):
        train(tiny_cfg(tmp_path), tmp_path / "run", callbacks=[RunningStats(), Twin()])
    with pytest.raises(ValueError, match="under 'sampler', which the trainer uses"):
        train(tiny_cfg(tmp_path), tmp_path / "run", callbacks=[TakesTheSampler()])
    assert not (tmp_path / "run").exists()


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_trainer_imports_no_layer_above_it():
    trainer = _modules_after_import("spannorm.train.trainer")
    assert not any(name.startswith("spannorm.diagnostics") for name in trainer)
    assert "spannorm.launch" not in trainer
    assert "spannorm.train.trainer" not in _modules_after_import("spannorm.train.distributed")
