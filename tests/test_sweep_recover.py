"""``spannorm sweep --recover``: a run the ledger keeps as numbers only is retrained, and its curves and layer
stats enter the ledger only when it reproduces the recorded final val loss exactly."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import tiny_sweep_base
from spannorm.cli.main import main
from spannorm.config import ConfigError
from spannorm.experiments import runner
from spannorm.experiments.ledger import read_ledger
from spannorm.experiments.plan import parse_plan
from spannorm.experiments.recover import check_recoverable, recover_runs
from spannorm.experiments.results import load_results
from spannorm.experiments.runner import run_sweep
from test_sweep_interrupt import StopAfter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plan(cache_dir) -> dict:
    return {"name": "recoverable",
            "base": tiny_sweep_base(cache_dir),
            "grid": {"placements": ["span"], "depths": [1], "lrs": [3e-3, 1e-2], "seeds": [0]},
            "measure": {"layer_stats": True, "batch_size": 2, "prune_checkpoints": True}}


def _numbers_only(ledger, edit=None) -> None:
    """The ledger as it is after its run folders were lost and only the numbers survived."""
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    for line in lines:
        if line["kind"] == "run":
            line.update(val_curve=[], train_curve=[], layer_stats=None)
            line["summary"] = {"final_val_loss": line["summary"]["final_val_loss"],
                               "best_val_loss": line["summary"]["best_val_loss"], "diverged": False,
                               "status": "completed", "source": "results.csv of an earlier commit"}
            if edit:
                edit(line)
    ledger.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _swept_then_lost(tmp_path, data: dict):
    """The plan ``data`` written to a file and swept in-process with a ledger, which is then cut back to numbers
    only: (plan file, ledger)."""
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(data))
    ledger = tmp_path / "ledger.jsonl"
    run_sweep(parse_plan(data), tmp_path / "lost", workers=0, log=lambda _: None, plan_text=plan_file.read_text(),
              ledger=ledger)
    _numbers_only(ledger)
    return plan_file, ledger


def test_a_numbers_only_run_is_retrained_and_its_curves_kept_only_when_it_reproduces(tmp_path, capsys):
    data = _plan(tmp_path / "cache")
    plan, text = parse_plan(data), yaml.safe_dump(data)
    ledger = tmp_path / "ledger.jsonl"
    first = run_sweep(plan, tmp_path / "lost", workers=0, log=lambda _: None, plan_text=text, ledger=ledger)
    assert sorted(first.executed) == ["span-L1-dense-lr1e-2-s0", "span-L1-dense-lr3e-3-s0"]
    full = read_ledger(ledger).runs

    def tamper(line):  # one recorded number that no retraining can reproduce
        if line["spec"]["run_id"] == "span-L1-dense-lr1e-2-s0":
            line["summary"]["final_val_loss"] += 1e-9

    _numbers_only(ledger, tamper)
    assert all(not line["val_curve"] for line in read_ledger(ledger).runs.values())
    outcome = recover_runs(plan, tmp_path / "again", ledger, ["span-L1-dense-lr3e-3-s0", "span-L1-dense-lr1e-2-s0"],
                           workers=0, log=lambda _: None)
    assert outcome.recovered == ["span-L1-dense-lr3e-3-s0"] and not outcome.failed
    (run_id, recorded, got), = outcome.mismatched
    assert run_id == "span-L1-dense-lr1e-2-s0" and recorded == full[run_id]["summary"]["final_val_loss"] + 1e-9
    assert got == full[run_id]["summary"]["final_val_loss"]

    book = read_ledger(ledger)
    back = book.runs["span-L1-dense-lr3e-3-s0"]  # the later line wins: curves and stats are back
    assert back["summary"]["final_val_loss"] == full["span-L1-dense-lr3e-3-s0"]["summary"]["final_val_loss"]
    assert back["summary"]["recovered"]["recorded_summary_source"] == "results.csv of an earlier commit"
    assert back["val_curve"] == full["span-L1-dense-lr3e-3-s0"]["val_curve"]
    assert back["layer_stats"]["rms"] == full["span-L1-dense-lr3e-3-s0"]["layer_stats"]["rms"]
    assert not book.runs["span-L1-dense-lr1e-2-s0"]["val_curve"]  # not reproduced: the recorded line stays
    results = load_results([ledger])
    assert sum(bool(r.val_curve) for runs in results.runs.values() for r in runs) == 1

    # Refusals, one line each, nothing written: a run that has its curves now, one the ledger lacks, no ledger.
    size = ledger.stat().st_size
    assert check_recoverable(plan, ledger, ["span-L1-dense-lr3e-3-s0"])[1] == {}  # recovered: nothing to train
    with pytest.raises(ConfigError, match="holds no such run"):
        check_recoverable(plan, ledger, ["pre-L1-dense-lr3e-3-s0"])
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(text)
    assert main(["sweep", str(plan_file), "--out", str(tmp_path / "x"), "--recover", "a"]) == 2
    assert "--recover needs --ledger" in capsys.readouterr().err
    assert main(["sweep", str(plan_file), "--out", str(tmp_path / "x"), "--ledger", str(ledger),
                 "--recover", "pre-L1-dense-lr3e-3-s0"]) == 2
    assert "holds no such run" in capsys.readouterr().err
    assert ledger.stat().st_size == size and not (tmp_path / "x").exists()
    # The same command again (after a kill, say): the run recovered already is left alone, nothing trains.
    assert main(["sweep", str(plan_file), "--out", str(tmp_path / "x"), "--ledger", str(ledger),
                 "--recover", "span-L1-dense-lr3e-3-s0,span-L1-dense-lr3e-3-s0"]) == 0
    out = capsys.readouterr().out
    assert "1 run(s) already hold their curves" in out and "0 recovered" in out and "1 had their curves already" in out
    assert ledger.stat().st_size == size and not (tmp_path / "x" / "runs").exists()


@pytest.mark.slow
def test_a_pooled_recovery_starts_a_run_when_a_worker_is_free_and_keeps_each_line_as_it_ends(tmp_path):
    """With workers, each run is logged when it starts, not when it is queued, and its line is in the ledger
    as soon as it reproduces: a recovery killed later keeps what it recovered so far."""
    data = _plan(tmp_path / "cache")
    plan = parse_plan(data)
    ledger = tmp_path / "ledger.jsonl"
    run_sweep(plan, tmp_path / "lost", workers=0, log=lambda _: None, plan_text=yaml.safe_dump(data), ledger=ledger)
    _numbers_only(ledger)
    events = []

    def log(line: str) -> None:  # what the ledger holds with curves whenever a line is logged
        with_curves = sorted(r for r, line_ in read_ledger(ledger).runs.items() if line_["val_curve"])
        events.append((line.split(":")[0], with_curves))

    ids = ["span-L1-dense-lr3e-3-s0", "span-L1-dense-lr1e-2-s0"]
    outcome = recover_runs(plan, tmp_path / "again", ledger, ids, workers=1, log=log)
    assert outcome.recovered == ids and not outcome.failed and not outcome.mismatched
    assert [e for e, _ in events[1:]] == [f"[recover] start {ids[0]}", f"[recover] {ids[0]}",
                                          f"[recover] start {ids[1]}", f"[recover] {ids[1]}"]
    assert events[3][1] == [ids[0]]  # the first run's line was appended before the second started


def test_ctrl_c_stops_a_recovery_keeps_its_lines_and_the_same_command_resumes_the_run_bit_for_bit(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C reaches the second run being recovered: the command stops with exit status 130 and says so, the
    ledger keeps the first run's recovered line and nothing of the stopped one, and the same command resumes
    the stopped run from its checkpoint to exactly the recorded final val loss."""
    data = _plan(tmp_path / "cache")
    plan_file, ledger = _swept_then_lost(tmp_path, data)
    ids = ["span-L1-dense-lr3e-3-s0", "span-L1-dense-lr1e-2-s0"]
    real_train, calls = runner.train, []

    def train(cfg, out, **kwargs):  # a stop request after step 2 of the second run, as the Ctrl-C handler makes
        calls.append(out)
        return real_train(cfg, out, callbacks=[StopAfter(2)] if len(calls) == 2 else [], **kwargs)

    monkeypatch.setattr(runner, "train", train)
    command = ["sweep", str(plan_file), "--out", str(tmp_path / "again"), "--ledger", str(ledger), "--workers", "0",
               "--recover", ",".join(ids)]
    assert main(command) == 130
    out = capsys.readouterr().out
    assert f"[recover] interrupted {ids[1]} after step 2" in out and "[recover] stopped by Ctrl-C" in out
    runs = read_ledger(ledger).runs
    assert runs[ids[0]]["val_curve"] and not runs[ids[1]]["val_curve"]  # the first kept, the second untouched

    resumed = []

    def train_again(cfg, out, **kwargs):
        resumed.append(kwargs["resume"])
        return real_train(cfg, out, **kwargs)

    monkeypatch.setattr(runner, "train", train_again)
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "1 recovered, 0 did not reproduce, 0 failed, 1 had their curves already" in out
    assert resumed == [True]  # from the checkpoint the stop wrote, not from step 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "again" / "runs" / ids[1] / "metrics.jsonl")
             .read_text().splitlines() if "step" in json.loads(line)]
    assert sorted(set(steps)) == steps and steps[0] == 1  # every step once
    assert read_ledger(ledger).runs[ids[1]]["val_curve"]


@pytest.mark.slow
def test_a_real_ctrl_c_stops_a_pooled_recovery_and_the_same_command_resumes_it(tmp_path):
    """SIGINT to the recovery's process group (what Ctrl-C in a terminal sends) while its worker trains: exit
    status 130 and the Ctrl-C line, nothing appended for that run, and the same command resumes it from the
    checkpoint its worker wrote on the way out, to exactly the recorded final val loss."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = _plan(tmp_path / "cache")
    data["grid"]["lrs"] = [3e-3]
    data["base"]["config"]["train"].update(steps=400, eval_every=100)
    plan_file, ledger = _swept_then_lost(tmp_path, data)
    run_id = "span-L1-dense-lr3e-3-s0"
    command = [sys.executable, "-m", "spannorm", "sweep", str(plan_file), "--out", str(tmp_path / "again"),
               "--ledger", str(ledger), "--workers", "1", "--recover", run_id]
    metrics = tmp_path / "again" / "runs" / run_id / "metrics.jsonl"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 5):  # the worker is training
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    assert "[recover] stopped by Ctrl-C" in out and "Traceback" not in err, (out, err)
    assert not read_ledger(ledger).runs[run_id]["val_curve"]
    stopped_at = len(metrics.read_text().splitlines())
    assert 5 <= stopped_at < 400
    # train.checkpoint_every is 0: the one checkpoint is the one the worker wrote when Ctrl-C stopped it
    checkpoints = sorted((metrics.parent / "checkpoints").glob("step_*"))
    assert [int(p.name.split("_")[1]) for p in checkpoints] == [stopped_at]
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "1 recovered, 0 did not reproduce" in again.stdout, (again.stdout, again.stderr)
    assert read_ledger(ledger).runs[run_id]["val_curve"]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 401))  # resumed where the Ctrl-C stopped it, every step once
