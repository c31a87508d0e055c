"""A sweep run stopped early by Ctrl-C is not finished: the sweep stops, the run stays pending, and the next
sweep resumes it from its checkpoint to its last step (before, its ``status: interrupted`` summary was
recorded as ``done`` with the losses of a part-trained run, and never run again)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spannorm.cli.main import main
from spannorm.experiments import runner
from spannorm.experiments.plan import parse_plan
from spannorm.experiments.runner import load_index, read_summary, run_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 6


def plan_dict(cache_dir) -> dict:
    return {"name": "stop", "base": {"config": {
        "model": {"d_model": 16, "n_heads": 2, "context_length": 16},
        "data": {"embedded_max_bytes": 60000, "cache_dir": str(cache_dir)},
        "optim": {"warmup_steps": 1},
        "train": {"steps": STEPS, "batch_size": 2, "eval_every": 3, "eval_batches": 1, "tensorboard": False,
                  "progress": "none", "checkpoint_every": 0, "keep_checkpoints": 1, "device": "cpu",
                  "precision": "fp32"}}},
        "grid": {"placements": ["pre"], "depths": [1], "lrs": [3e-3], "seeds": [0, 1]},
        "measure": {"layer_stats": False}}


class StopAfter:
    """Callback: a stop request after optimizer step ``step``, as the trainer's Ctrl-C handler makes one."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, record):
        if step == self.step:
            trainer.request_stop("interrupted (Ctrl-C)")


def stop_first_run_at(monkeypatch, step: int) -> None:
    real_train = runner.train
    calls = []

    def train(cfg, out, **kwargs):
        calls.append(out)
        callbacks = [StopAfter(step)] if len(calls) == 1 else []
        return real_train(cfg, out, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(runner, "train", train)


def test_an_interrupted_run_stops_the_sweep_stays_pending_and_resumes(tmp_path, monkeypatch):
    plan = parse_plan(plan_dict(tmp_path / "cache"))
    out = tmp_path / "sweep"
    stop_first_run_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, out, workers=0, log=lambda _: None)
    (first, *_), = [[s.run_id for s in plan.expand()]]
    on_disk = json.loads((out / "runs" / first / "summary.json").read_text())
    assert (on_disk["status"], on_disk["steps"]) == ("interrupted", 2)
    assert read_summary(out / "runs" / first) is None  # not finished
    index = json.loads((out / "index.json").read_text())
    assert index["counts"] == {"pending": 2}  # the stopped run is pending, and the sweep did not go on
    assert not (out / "runs" / "pre-L1-dense-lr3e-3-s1").exists()

    monkeypatch.undo()
    real_train, resumed = runner.train, {}

    def train(cfg, out_dir, **kwargs):
        resumed[Path(out_dir).name] = kwargs["resume"]
        return real_train(cfg, out_dir, **kwargs)

    monkeypatch.setattr(runner, "train", train)
    outcome = run_sweep(plan, out, workers=0, log=lambda _: None)
    assert sorted(outcome.executed) == sorted(s.run_id for s in plan.expand())
    records = load_index(out)
    assert {r["status"] for r in records.values()} == {"done"}
    assert records[first]["steps"] == STEPS
    assert resumed == {first: True, "pre-L1-dense-lr3e-3-s1": False}  # from the checkpoint the stop wrote


def test_the_cli_says_how_to_resume_and_exits_130(tmp_path, monkeypatch, capsys):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan_dict(tmp_path / "cache")))
    stop_first_run_at(monkeypatch, 1)
    assert main(["sweep", str(plan_file), "--out", str(tmp_path / "sweep"), "--workers", "0"]) == 130
    printed = capsys.readouterr().out
    assert "interrupted pre-L1-dense-lr3e-3-s0 after step 1" in printed
    assert "the same command resumes the rest" in printed
    dry = main(["sweep", str(plan_file), "--out", str(tmp_path / "sweep"), "--workers", "0", "--dry-run"])
    assert dry == 0
    assert "pre-L1-dense-lr3e-3-s0" in capsys.readouterr().out.split("pending")[0]


def test_a_run_stopped_part_way_is_resumed_before_runs_not_started(tmp_path, monkeypatch):
    """A sweep started again finishes the runs that have a checkpoint first, whatever the plan's order: that
    work is the most at risk, and a session may end before the run's turn would come."""
    data = plan_dict(tmp_path / "cache")
    data["grid"]["seeds"] = [1]
    out = tmp_path / "sweep"
    stop_first_run_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(parse_plan(data), out, workers=0, log=lambda _: None)
    monkeypatch.undo()
    data["grid"]["seeds"] = [0, 1]  # extended: seed 0 comes first in the plan's order
    plan = parse_plan(data)
    assert [s.run_id for s in plan.expand()] == ["pre-L1-dense-lr3e-3-s0", "pre-L1-dense-lr3e-3-s1"]
    real_train, order = runner.train, []

    def train(cfg, out_dir, **kwargs):
        order.append((Path(out_dir).name, kwargs["resume"]))
        return real_train(cfg, out_dir, **kwargs)

    monkeypatch.setattr(runner, "train", train)
    run_sweep(plan, out, workers=0, log=lambda _: None)
    assert order == [("pre-L1-dense-lr3e-3-s1", True), ("pre-L1-dense-lr3e-3-s0", False)]
