"""The sweep ledger: a sweep's results, curves, layer stats and starts survive the loss of its run folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import tiny_sweep_base
from spannorm.config import ConfigError
from spannorm.experiments.ledger import read_ledger
from spannorm.experiments.plan import parse_plan
from spannorm.experiments.report import build_report
from spannorm.experiments.results import load_results
from spannorm.experiments.runner import load_index, run_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plan_dict(cache_dir: Path) -> dict:
    return {"name": "ledgered",
            "base": tiny_sweep_base(cache_dir),
            "grid": {"placements": ["pre", "span"], "depths": [1], "ffn": {"dense": []}, "lrs": [3e-3, 1e-2],
                     "seeds": [0, 1]},
            "protocol": {"kind": "lr_search", "search_seeds": [0], "shared_lr": 3e-3,
                         "preregistered": {"a": "span", "b": "pre", "depth": 1, "ffn": "dense",
                                           "hypothesis": "span differs from pre"}},
            "measure": {"layer_stats": True, "batch_size": 2, "prune_checkpoints": True}}


def quiet(_line: str) -> None:
    pass


@pytest.mark.slow
def test_a_lost_sweep_folder_resumes_from_its_ledger_and_reports_the_same(tmp_path):
    data = plan_dict(tmp_path / "cache")
    plan, text = parse_plan(data), yaml.safe_dump(data)
    ledger = tmp_path / "kept" / "ledger.jsonl"
    first = run_sweep(plan, tmp_path / "a", workers=0, log=quiet, plan_text=text, ledger=ledger)
    assert first.executed and not first.failed
    book = read_ledger(ledger)
    assert set(book.runs) == set(load_index(tmp_path / "a")) == set(first.executed)
    assert len(book.starts) == 1 and book.plan_text == text
    for run_id, line in book.runs.items():
        folder = tmp_path / "a" / "runs" / run_id
        assert line["summary"] == json.loads((folder / "summary.json").read_text())
        stats = json.loads((folder / "layer_stats.json").read_text())
        assert line["layer_stats"].keys() == stats.keys()
        assert line["layer_stats"]["rms"] == pytest.approx(stats["rms"], rel=1e-5)
        metrics = [json.loads(m) for m in (folder / "metrics.jsonl").read_text().splitlines()]
        assert line["val_curve"] == [[m["step"], pytest.approx(m["val_loss"], abs=1e-5)]
                                     for m in metrics if "val_loss" in m]
        assert [s for s, _ in line["val_curve"]] == [2, 3] and [s for s, _ in line["train_curve"]] == [1, 2, 3]
        assert not (folder / "checkpoints").exists()  # pruned: the ledger is all that stays small
    report_a = build_report(load_results([tmp_path / "a"]), tmp_path / "report_a")

    # The machine is gone: a new folder with the same ledger trains nothing and reports the same numbers.
    shutil.rmtree(tmp_path / "a")
    again = run_sweep(plan, tmp_path / "b", workers=0, log=quiet, plan_text=text, ledger=ledger)
    assert again.executed == [] and sorted(again.skipped) == sorted(first.executed)
    assert not list((tmp_path / "b" / "runs").glob("*/summary.json"))  # nothing trained, nothing copied
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    assert index["ledger"] == str(ledger.resolve())
    assert all(r["status"] == "done" and r["source"] == "ledger" for r in index["runs"])
    # The first start (no run finished then) comes first, so the declaration still reads as made first.
    assert [s["finished_before"] for s in index["starts"]] == [0, len(first.executed)]
    assert len(read_ledger(ledger).starts) == 2 and len(read_ledger(ledger).runs) == len(first.executed)

    report_b = build_report(load_results([tmp_path / "b"]), tmp_path / "report_b")
    report_l = build_report(load_results([ledger]), tmp_path / "report_l")
    csv_a = (report_a.parent / "results.csv").read_text()
    assert (report_b.parent / "results.csv").read_text() == csv_a
    assert (report_l.parent / "results.csv").read_text() == csv_a
    json_a = json.loads((report_a.parent / "results.json").read_text())
    json_l = json.loads((report_l.parent / "results.json").read_text())
    assert json_l["cells"] == json_a["cells"] and json_l["welch"] == json_a["welch"]
    assert "declared before any run" in report_l.read_text()
    for name in ("curves_dense_L1.png", "layers_dense_L1.png"):  # curves and layer stats came from the ledger
        assert (report_l.parent / name).is_file()


@pytest.mark.slow
def test_a_ledger_run_made_with_other_settings_is_refused_before_anything_is_written(tmp_path):
    data = plan_dict(tmp_path / "cache")
    data["grid"]["placements"], data["grid"]["lrs"], data["protocol"] = ["pre"], [3e-3], {"kind": "full"}
    data["grid"]["seeds"] = [0]
    ledger = tmp_path / "ledger.jsonl"
    assert run_sweep(parse_plan(data), tmp_path / "a", workers=0, log=quiet, ledger=ledger).executed
    kept = ledger.read_text()
    data["base"]["config"]["train"]["steps"] = 4  # the same run id, other settings
    with pytest.raises(ConfigError, match=r"pre-L1-dense-lr3e-3-s0 in ledger .* other settings train\.steps=3, "
                                          r"now train\.steps=4; allowed: .* another --ledger file"):
        run_sweep(parse_plan(data), tmp_path / "b", workers=0, log=quiet, ledger=ledger)
    assert not (tmp_path / "b").exists() and ledger.read_text() == kept

    plan_file = tmp_path / "changed.yaml"
    plan_file.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "spannorm", "sweep", str(plan_file), "--out", str(tmp_path / "c"),
                           "--ledger", str(ledger)], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "other settings train.steps=3" in proc.stderr
    assert not (tmp_path / "c").exists() and ledger.read_text() == kept


def test_a_ledger_of_another_plan_or_format_is_refused_in_one_line(tmp_path, capsys):
    from spannorm.cli.main import main

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan_dict(tmp_path / "cache")))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"kind": "start", "plan": "someone-else", "plan_text": "x",
                                "record": {"time": 1.0}}) + "\n")
    not_one = tmp_path / "notes.jsonl"
    not_one.write_text('{"event": "done"}\n')
    for ledger, says in ((other, "belongs to plan 'someone-else', not 'ledgered'"),
                         (not_one, "line 1 is not a ledger line"), (tmp_path, "is not a file")):
        assert main(["sweep", str(plan_file), "--out", str(tmp_path / "out"), "--ledger", str(ledger)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (tmp_path / "out").exists()


def test_a_line_cut_by_a_kill_is_skipped_and_the_next_append_starts_a_new_line(tmp_path):
    ledger_path = tmp_path / "ledger.jsonl"
    whole = {"kind": "start", "plan": "p", "plan_text": "name: p", "record": {"time": 1.0}}
    ledger_path.write_text(json.dumps(whole) + "\n" + '{"kind": "run", "plan": "p", "spec": {"run_')
    book = read_ledger(ledger_path)
    assert book.skipped_lines == 1 and len(book.starts) == 1
    book.append({**whole, "record": {"time": 2.0}})
    again = read_ledger(ledger_path)
    assert again.skipped_lines == 1 and [s["record"]["time"] for s in again.starts] == [1.0, 2.0]


def test_report_cli_refuses_a_file_that_is_no_ledger_in_one_line(tmp_path, capsys):
    from spannorm.cli.main import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", str(empty), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no sweep start" in err[0]
    assert not (tmp_path / "rep").exists()


def test_a_report_of_runs_kept_as_numbers_only_says_so_and_draws_no_empty_curves(tmp_path):
    from spannorm.experiments.ledger import Ledger, run_line, start_line

    plan = {"name": "bare", "grid": {"placements": ["pre", "span"], "depths": [2], "ffn": {"dense": []},
                                     "lrs": [1e-3], "seeds": [0, 1]},
            "protocol": {"kind": "full", "shared_lr": 1e-3}}
    ledger = Ledger(tmp_path / "bare.jsonl")
    ledger.append(start_line("bare", yaml.safe_dump(plan), {"time": 1.0, "finished_before": 0}))
    for spec in parse_plan(plan).expand():
        loss = 2.0 + spec.seed / 10 + (spec.cell.placement == "span") / 100
        ledger.append(run_line("bare", spec.to_dict(), [], {"final_val_loss": loss, "best_val_loss": loss,
                                                            "diverged": False, "steps": 3}, [], [], None))
    report = build_report(load_results([ledger.path]), tmp_path / "rep")
    text = report.read_text()
    assert "Finished runs: 4 (0 diverged)" in text and "Of these, 4 carry their final numbers only" in text
    assert "curves_dense_L2.png" not in text and not (tmp_path / "rep" / "curves_dense_L2.png").exists()
    rows = (tmp_path / "rep" / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and any(",span," in r and ",2.01," in r for r in rows)


def test_a_plan_cut_below_what_its_ledger_holds_is_refused(tmp_path):
    from spannorm.experiments.ledger import Ledger, run_line, start_line

    plan = {"name": "cut", "grid": {"placements": ["pre", "span"], "depths": [2], "ffn": {"dense": []},
                                    "lrs": [1e-3], "seeds": [0]}}
    ledger = Ledger(tmp_path / "cut.jsonl")
    ledger.append(start_line("cut", yaml.safe_dump(plan), {"time": 1.0, "finished_before": 0}))
    for spec in parse_plan(plan).expand():
        ledger.append(run_line("cut", spec.to_dict(), [], {"final_val_loss": 2.0, "diverged": False}, [], [], None))
    plan["grid"]["placements"] = ["pre"]
    with pytest.raises(ConfigError, match=r"plan 'cut' no longer asks for 1 run\(s\) that ledger .* \(e\.g\. "
                                          r"span-L2-dense-lr1e-3-s0\); allowed: .* or another --ledger file"):
        run_sweep(parse_plan(plan), tmp_path / "out", workers=0, log=quiet, ledger=ledger.path)
    assert not (tmp_path / "out").exists()


LR_PLAN = {"name": "lr", "grid": {"placements": ["pre"], "depths": [1], "ffn": {"dense": []}, "lrs": [1e-3, 1e-2],
                                  "seeds": [0, 1]},
           "protocol": {"kind": "lr_search", "search_seeds": [0], "shared_lr": 1e-3}}
"""Search 1e-3 and 1e-2 on seed 0; then seed 1 at the best LR (1e-2 below) and at the shared LR 1e-3."""


def hand_ledger(path: Path, plan: dict, extra: tuple[str, ...] = (), edit=None) -> Path:
    """A ledger holding every run of ``plan``'s lr_search (numbers only; lower loss at the higher LR)."""
    from spannorm.experiments.ledger import Ledger, run_line, start_line

    book = Ledger(path)
    book.append(start_line(plan["name"], yaml.safe_dump(plan), {"time": 1.0, "finished_before": 0}))
    parsed, records = parse_plan(plan), {}
    while True:
        new = [s for s in parsed.expand(records) if s.run_id not in records]
        if not new:
            return path
        for spec in new:
            data = spec.to_dict()
            if edit is not None:
                edit(data)
            loss = 2.0 - spec.lr * 10 + spec.seed / 100
            book.append(run_line(plan["name"], data, list(extra), {"final_val_loss": loss, "best_val_loss": loss,
                                                                   "diverged": False, "steps": 3}, [], [], None))
            records[spec.run_id] = {"status": "done", "final_val_loss": loss}


def test_runs_that_follow_from_the_ledgers_search_are_checked_before_anything_is_written(tmp_path):
    def other_steps(data):
        if data["stage"] != "search":
            data["overrides"] = [*data["overrides"], "train.steps=4"]

    ledger = hand_ledger(tmp_path / "lr.jsonl", LR_PLAN, edit=other_steps)
    kept = ledger.read_text()
    with pytest.raises(ConfigError, match=r"pre-L1-dense-lr1e-\d-s1 in ledger .* other settings"):
        run_sweep(parse_plan(LR_PLAN), tmp_path / "out", workers=0, log=quiet, ledger=ledger)
    assert not (tmp_path / "out").exists() and ledger.read_text() == kept


def test_dry_run_lists_the_runs_the_ledger_holds_beyond_the_search(tmp_path, capsys):
    from spannorm.cli.main import main

    ledger = hand_ledger(tmp_path / "lr.jsonl", LR_PLAN)
    plan_file = tmp_path / "lr.yaml"
    plan_file.write_text(yaml.safe_dump(LR_PLAN))
    assert main(["sweep", str(plan_file), "--out", str(tmp_path / "out"), "--ledger", str(ledger), "--dry-run",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    for run_id, stage in (("pre-L1-dense-lr1e-2-s1", "best"), ("pre-L1-dense-lr1e-3-s1", "shared")):
        assert any(line.split()[:3] == [run_id, stage, "done"] for line in out.splitlines()), out
    assert not (tmp_path / "out").exists()


def test_a_ledger_resumes_whole_without_training_and_backfills_an_old_folders_starts(tmp_path):
    ledger = hand_ledger(tmp_path / "lr.jsonl", LR_PLAN)
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.yaml").write_text(yaml.safe_dump(LR_PLAN))
    first = {"time": 0.5, "plan_sha256": "a" * 64, "finished_before": 0}
    (out / "index.json").write_text(json.dumps({"plan": "lr", "runs": [], "starts": [first]}))
    outcome = run_sweep(parse_plan(LR_PLAN), out, workers=0, log=quiet, ledger=ledger)
    assert outcome.executed == [] and len(outcome.skipped) == 4
    records = [s["record"] for s in read_ledger(ledger).starts]
    assert records[0]["time"] == 1.0 and first in records and records[-1]["finished_before"] == 4
    index = json.loads((out / "index.json").read_text())
    assert [s["time"] for s in index["starts"]][:2] == [0.5, 1.0]
    assert (out / index["ledger_from_folder"]).resolve() == ledger.resolve()


def test_a_run_that_finished_differently_in_folder_and_ledger_is_refused(tmp_path):
    ledger = hand_ledger(tmp_path / "lr.jsonl", LR_PLAN)
    folder = tmp_path / "out" / "runs" / "pre-L1-dense-lr1e-2-s0"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"final_val_loss": 2.5, "diverged": False}))
    kept = ledger.read_text()
    with pytest.raises(ConfigError, match=r"pre-L1-dense-lr1e-2-s0 finished differently in .* \(final val loss "
                                          r"2\.5\) and in ledger .* \(1\.9\); allowed"):
        run_sweep(parse_plan(LR_PLAN), tmp_path / "out", workers=0, log=quiet, ledger=ledger)
    assert ledger.read_text() == kept and not (tmp_path / "out" / "index.json").exists()


def test_precision_is_compared_as_the_config_it_makes_and_a_new_folder_takes_the_ledgers(tmp_path):
    from spannorm.experiments.runner import check_ledger_settings, ledger_precision_setup

    spec = parse_plan(LR_PLAN).expand()[0]
    plain = read_ledger(hand_ledger(tmp_path / "plain.jsonl", LR_PLAN))
    check_ledger_settings(spec, plain, ("train.precision=fp32",))  # fp32 is the default: the same run
    with pytest.raises(ConfigError, match=r"other settings \(none\), now train\.precision=bf16"):
        check_ledger_settings(spec, plain, ("train.precision=bf16",))
    assert ledger_precision_setup(plain)["precision"] is None
    bf16 = read_ledger(hand_ledger(tmp_path / "bf16.jsonl", LR_PLAN, extra=("train.precision=bf16",)))
    assert ledger_precision_setup(bf16)["precision"] == "bf16"
    check_ledger_settings(spec, bf16, ("train.precision=bf16",))


def test_a_ledger_override_that_does_not_parse_is_refused_not_trusted(tmp_path):
    from spannorm.experiments.runner import check_ledger_settings

    def broken(data):
        data["overrides"] = [*data["overrides"], "no-equals-sign"]

    book = read_ledger(hand_ledger(tmp_path / "bad.jsonl", LR_PLAN, edit=broken))
    with pytest.raises(ConfigError, match="other settings that do not parse"):
        check_ledger_settings(parse_plan(LR_PLAN).expand()[0], book, ())


@pytest.mark.parametrize("mutate, says", [
    (lambda e: e["spec"].pop("run_id"), "spec.run_id is None"),
    (lambda e: e["spec"].pop("lr"), "spec.lr is None"),
    (lambda e: e.update(summary=[1, 2]), "without a 'summary' object"),
    (lambda e: e.update(ledger_version="one"), "ledger_version 'one', not a whole number"),
    (lambda e: e.update(ledger_version=None), "ledger_version None, not a whole number"),
    (lambda e: e.update(ledger_version=9), "ledger_version 9; this spannorm reads up to 1"),
])
def test_a_ledger_line_of_the_wrong_shape_is_refused_in_one_line(tmp_path, capsys, mutate, says):
    from spannorm.cli.main import main

    ledger = hand_ledger(tmp_path / "lr.jsonl", LR_PLAN)
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[1])
    mutate(entry)
    lines[1] = json.dumps(entry)
    ledger.write_text("\n".join(lines) + "\n")
    plan_file = tmp_path / "lr.yaml"
    plan_file.write_text(yaml.safe_dump(LR_PLAN))
    for argv in (["sweep", str(plan_file), "--out", str(tmp_path / "out"), "--ledger", str(ledger)],
                 ["report", str(ledger), "--out", str(tmp_path / "rep")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "line 2" in err[0] and says in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "rep").exists()


def test_a_start_line_without_a_record_and_a_ledger_under_a_file_are_refused(tmp_path, capsys):
    from spannorm.cli.main import main

    plan_file = tmp_path / "lr.yaml"
    plan_file.write_text(yaml.safe_dump(LR_PLAN))
    no_record = tmp_path / "nr.jsonl"
    no_record.write_text(json.dumps({"kind": "start", "plan": "lr", "plan_text": "x"}) + "\n")
    (tmp_path / "afile").write_text("")
    for ledger, says in ((no_record, "start line without a 'record'"), (tmp_path / "afile" / "l.jsonl", "is a file")):
        assert main(["sweep", str(plan_file), "--out", str(tmp_path / "out"), "--ledger", str(ledger)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (tmp_path / "out").exists()
