"""No host sync in a training step that does not read (issue 15, item 3).

A test double wraps every call that reads a tensor's value to the host (each one a device sync on a GPU) and
counts them per training step, on the CPU. With the fused AdamW (the CUDA path, and ``optim.fused=true`` on a
CPU: it skips a non-finite step on the device) a step that does not read holds none; with the CPU's default
AdamW it holds exactly one of the trainer's, the non-finite flag, and the skip that the fused optimizer does
on the device leaves weights and optimizer state exactly as they were.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from helpers import tiny_run_config
from spannorm.data.dataset import BatchesAhead, WindowSampler
from spannorm.diagnostics.callback import DiagnosticsCallback
from spannorm.train.callbacks import Callback, needs_step_end_at_once
from spannorm.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "__array__")
"""The Tensor methods that hand a value to the host."""


class HostReads:
    """Test double: counts every host read of a tensor, with the module that asked for it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[tuple[str, str]] = []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        for name in ("equal", "allclose", "is_nonzero"):
            monkeypatch.setattr(torch, name, self._counted(f"torch.{name}", getattr(torch, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._counted("torch.cuda.synchronize", lambda *a: None))

    def _counted(self, name, original):
        calls = self.calls

        def counted(*args, **kwargs):
            calls.append((name, sys._getframe(1).f_globals.get("__name__", "?")))
            return original(*args, **kwargs)

        return counted


class StepMarks:
    """Marks where each step's backward ends, so that reads can be told apart by step: step s's span runs from
    its backward to the next step's (it holds the optimizer step and, at a reading step, the read)."""

    def __init__(self, reads: HostReads):
        self.reads, self.marks = reads, []

    def on_after_backward(self, trainer, step):
        self.marks.append((step, len(self.reads.calls)))

    def per_step(self) -> dict[int, list[tuple[str, str]]]:
        ends = [count for _, count in self.marks[1:]] + [len(self.reads.calls)]
        return {step: self.reads.calls[start:end] for (step, start), end in zip(self.marks, ends)}


def fused_on_cpu(tmp_path, run, callbacks) -> Trainer:
    """A trainer with the fused AdamW that CUDA runs use, on the CPU (``optim.fused=true``)."""
    trainer = Trainer(tiny_run_config(tmp_path, *SETTINGS, "optim.fused=true"), run, callbacks=callbacks)
    assert trainer.skips_update_on_device()
    return trainer


SETTINGS = ("train.steps=8", "train.log_every=4", "train.eval_every=0", "train.checkpoint_every=0")
"""Steps 4 and 8 read (logging, and the last step's evaluation and checkpoint); 1-3 and 5-7 do not."""
NOT_READING = (1, 2, 3, 5, 6, 7)


def test_a_step_that_does_not_read_holds_no_host_read_with_the_fused_optimizer(tmp_path, monkeypatch):
    trainer = fused_on_cpu(tmp_path, tmp_path / "run", callbacks=[])
    reads = HostReads(monkeypatch)
    marks = StepMarks(reads)
    trainer.callbacks.insert(0, marks)
    summary = trainer.run()
    assert summary.status == "completed" and summary.steps == 8
    per_step = marks.per_step()
    assert {step: per_step[step] for step in NOT_READING} == {step: [] for step in NOT_READING}
    assert per_step[4] and ("tolist", "spannorm.train.trainer") in per_step[4]  # the reading step reads
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 9))


def test_without_a_device_side_skip_a_step_reads_only_the_non_finite_flag(tmp_path, monkeypatch):
    trainer = Trainer(tiny_run_config(tmp_path, *SETTINGS), tmp_path / "run", callbacks=[])
    assert not trainer.skips_update_on_device()  # the CPU's AdamW (for-loop kernel)
    reads = HostReads(monkeypatch)
    marks = StepMarks(reads)
    trainer.callbacks.insert(0, marks)
    trainer.run()
    for step, calls in marks.per_step().items():
        if step in NOT_READING:
            ours = [call for call in calls if call[1].startswith("spannorm")]
            assert ours == [("__bool__", "spannorm.train.trainer")], step
            # The rest is AdamW's own: its step counters are host tensors in this kernel (on CUDA too).
            assert all(module.startswith("torch.optim") for _, module in calls if (_, module) not in ours)


class NaNGradientAt:
    """After the backward pass of step ``step``, poison one gradient; keep the weights and AdamW's state."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer, step):
        if step == self.step:
            self.trainer = trainer
            self.weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            self.optimizer = {i: {k: v.clone() for k, v in s.items()}
                              for i, s in trainer.optimizer.state_dict()["state"].items()}
            next(trainer.model.parameters()).grad.view(-1)[0] = float("nan")


def test_a_non_finite_step_between_reads_is_skipped_on_the_device_and_reported_with_its_step(tmp_path):
    """Step 5 is poisoned and does not read; steps 6 and 7 run but are skipped too (the flag stays raised);
    step 8 reads, finds step 5, and the run ends as if it had stopped at step 5."""
    poison = NaNGradientAt(5)
    run = tmp_path / "run"
    trainer = fused_on_cpu(tmp_path, run, callbacks=[poison])
    summary = trainer.run()
    assert summary.status == "diverged" and summary.diverged_step == 5 and summary.steps == 4
    assert summary.tokens == 4 * trainer.cfg.tokens_per_step
    assert summary.message.startswith("step 5: non-finite gradient norm (nan) detected before the optimizer "
                                      "step; weights are those after step 4")
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["final_train_loss"] == read_metrics(run)[-1]["train_loss"]
    live = trainer.model.state_dict()
    assert all(torch.equal(live[k], poison.weights[k]) for k in live)  # weights: exactly those after step 4
    state = trainer.optimizer.state_dict()["state"]
    for index, saved in poison.optimizer.items():  # moments and step counts too
        assert all(torch.equal(state[index][k], saved[k]) for k in saved), index
    assert {int(s["step"]) for s in state.values()} == {4}


class LateLog(Callback):
    """Only looks at the records, so it lets its on_step_end come at the next reading step."""

    def __init__(self):
        self.calls: list[tuple[int, int, float]] = []

    def needs_step_end_at_once(self, step):
        return False

    def on_step_end(self, trainer, step, record):
        self.calls.append((step, trainer.step, record["train_loss"]))


def test_records_read_late_equal_records_read_at_once(tmp_path):
    """The same run logging every step (every step reads) and every 4th: identical metrics but the timings;
    a callback that does not need a step at once gets every step, in order, at the reading steps."""
    late = LateLog()
    every = Trainer(tiny_run_config(tmp_path, *SETTINGS[:1], "train.log_every=1", *SETTINGS[2:]), tmp_path / "every")
    fourth = Trainer(tiny_run_config(tmp_path, *SETTINGS), tmp_path / "fourth", callbacks=[late])
    every.run()
    fourth.run()
    timing = ("tokens_per_s", "achieved_tflops", "mfu", "peak_mem_bytes")
    a = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "every")]
    b = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "fourth")]
    assert a == b and len(a) == 8
    assert [step for step, _, _ in late.calls] == list(range(1, 9))
    assert [now for _, now, _ in late.calls] == [4, 4, 4, 4, 8, 8, 8, 8]  # delivered at the reading steps
    assert [loss for _, _, loss in late.calls] == [r["train_loss"] for r in a]
    rates = [r["tokens_per_s"] for r in read_metrics(tmp_path / "fourth")]
    assert len(set(rates[:4])) == 1 and len(set(rates[4:])) == 1  # the mean rate of each reading interval


def test_which_callbacks_need_a_step_at_once():
    class Plain:
        def on_step_end(self, trainer, step, record):
            pass

    class Quiet:
        def on_train_start(self, trainer):
            pass

    class Derived(Callback):
        def on_step_end(self, trainer, step, record):
            pass

    assert needs_step_end_at_once(Plain(), 3) and needs_step_end_at_once(Derived(), 3)  # as before: every step
    assert not needs_step_end_at_once(Quiet(), 3) and not needs_step_end_at_once(Callback(), 3)
    assert not needs_step_end_at_once(LateLog(), 3)
    diagnostics = DiagnosticsCallback(every=3)  # measures the model as it is right after its steps
    assert [needs_step_end_at_once(diagnostics, step) for step in range(1, 7)] == [False, False, True] * 2


def test_batches_ahead_are_the_samplers_batches_and_resume_exactly(tmp_path):
    tokens = torch.arange(1000, dtype=torch.int64).numpy()
    plain = WindowSampler(tokens, 16, 4, seed=3)
    ahead = BatchesAhead(WindowSampler(tokens, 16, 4, seed=3), torch.device("cpu"))
    for _ in range(3):
        a, b = plain.next_batch(), ahead.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ahead.sampler.batches_drawn == 4  # one drawn ahead
    assert ahead.state_dict() == plain.state_dict()  # but its state is that after the three handed out
    resumed = BatchesAhead(WindowSampler(tokens, 16, 4, seed=99), torch.device("cpu"))
    resumed.next_batch()
    resumed.load_state_dict(ahead.state_dict())  # drops the batch it had drawn ahead
    assert torch.equal(resumed.next_batch()[0], plain.next_batch()[0])
