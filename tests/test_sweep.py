"""The sweep harness: plan expansion and the LR-search protocol, a micro-sweep end to end, and resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spannorm.config import ConfigError
from spannorm.experiments.plan import format_lr, load_plan, parse_plan, rank_key, select_best_lr
from spannorm.experiments.runner import load_index, run_sweep

MICRO_BASE = {
    "config": {
        "model": {"d_model": 16, "n_heads": 2, "context_length": 16},
        "data": {"embedded_max_bytes": 60000},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 3, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "tensorboard": False,
                  "progress": "none", "checkpoint_every": 0, "keep_checkpoints": 1, "device": "cpu"},
    }
}


def micro_plan(cache_dir: Path) -> dict:
    base = json.loads(json.dumps(MICRO_BASE))
    base["config"]["data"]["cache_dir"] = str(cache_dir)
    return {"name": "micro", "base": base,
            "grid": {"placements": ["pre", "span"], "depths": [1, 2], "ffn": {"dense": []}, "lrs": [3e-3],
                     "seeds": [0]},
            "measure": {"layer_stats": True, "batch_size": 2}}


def test_format_lr_is_compact_and_stable():
    assert format_lr(0.003) == "3e-3"
    assert format_lr(1e-2) == "1e-2"
    assert format_lr(0.0015) == "1.5e-3"


def test_full_protocol_expands_the_product_with_stable_ids():
    plan = parse_plan({"grid": {"placements": ["pre", "span"], "depths": [6, 24],
                                "ffn": {"dense": [], "moe": ["model.moe.n_experts=4"]},
                                "lrs": [1e-3, 3e-3], "seeds": [0, 1, 2]}})
    specs = plan.expand()
    assert len(specs) == 2 * 2 * 2 * 2 * 3
    ids = {s.run_id for s in specs}
    assert len(ids) == len(specs)
    assert "span-L24-moe-lr3e-3-s1" in ids
    spec = next(s for s in specs if s.run_id == "span-L24-moe-lr3e-3-s1")
    assert "model.placement=span" in spec.overrides and "model.n_layers=24" in spec.overrides
    assert "model.moe.n_experts=4" in spec.overrides and "train.seed=1" in spec.overrides
    assert spec.overrides[-2] == "optim.lr=0.003"


def _done(loss: float) -> dict:
    return {"status": "done", "final_val_loss": loss}


def test_lr_search_protocol_waits_for_the_search_then_runs_best_and_shared():
    plan = parse_plan({"grid": {"placements": ["pre"], "depths": [6, 24], "ffn": {"dense": []},
                                "lrs": [1e-3, 1e-2, 3e-2], "seeds": [0, 1, 2]},
                       "protocol": {"kind": "lr_search", "search_seeds": [0], "search_depths": [6],
                                    "shared_lr": 1e-2}})
    first = plan.expand({})
    assert [s.run_id for s in first] == ["pre-L6-dense-lr1e-3-s0", "pre-L6-dense-lr1e-2-s0",
                                         "pre-L6-dense-lr3e-2-s0"]
    partial = {"pre-L6-dense-lr1e-3-s0": _done(2.5), "pre-L6-dense-lr1e-2-s0": _done(2.4)}
    assert len(plan.expand(partial)) == 3  # the search is unfinished: nothing else yet
    # 3e-2 has the lowest loss but diverged: it ranks last, so 1e-3 (2.5) loses to 1e-2 (2.4) only
    results = {**partial, "pre-L6-dense-lr3e-2-s0": {"status": "diverged", "final_val_loss": None}}
    results["pre-L6-dense-lr1e-3-s0"] = _done(2.3)
    specs = plan.expand(results)
    stages = {s.run_id: s.stage for s in specs}
    # best LR is 1e-3 at depth 6, and depth 24 takes depth 6's choice
    for depth in (6, 24):
        for seed in (0, 1, 2):
            assert f"pre-L{depth}-dense-lr1e-3-s{seed}" in stages
            assert f"pre-L{depth}-dense-lr1e-2-s{seed}" in stages
    assert stages["pre-L6-dense-lr1e-3-s0"] == "search"
    assert stages["pre-L24-dense-lr1e-3-s1"] == "best"
    assert stages["pre-L24-dense-lr1e-2-s2"] == "shared"
    assert len(specs) == 3 + 2 + 2 + 3 + 3  # search, L6 best/shared seeds 1-2, L24 best/shared seeds 0-2


def test_diverged_counts_as_worst_when_ranking_lrs():
    assert rank_key([_done(2.0), {"status": "diverged"}]) == (1, 2.0)
    assert select_best_lr({1e-3: [_done(3.0)], 1e-2: [_done(1.0), {"status": "diverged"}]}) == 1e-3
    assert select_best_lr({1e-3: [_done(2.0)], 1e-2: [_done(2.0)]}) == 1e-3  # ties go to the smaller LR
    assert math.isinf(rank_key([{"status": "diverged"}])[1])


@pytest.mark.parametrize("bad, message", [
    ({"grid": {"placements": ["prenorm"], "depths": [2]}}, "allowed: pre"),
    ({"grid": {"placements": ["pre"], "depths": [2], "lrs": [1e-3]}, "protocol": {"shared_lr": 5e-3}},
     "protocol.shared_lr"),
    ({"grid": {"placements": ["pre"], "depths": [0]}}, "grid.depths"),
    ({"grid": {"placements": ["pre"], "depths": [2]}, "protocol": {"kind": "random"}}, "protocol.kind"),
    ({"grid": {"placements": ["pre"], "depths": [2]}, "extra": 1}, "plan.extra is not a known config key; allowed:"),
    ({"grid": {"placements": ["pre"], "depth": [2]}}, "plan.grid.depth is not a known config key (did you mean"),
    ({"name": "x"}, "plan is missing 'grid'"),
    ({"grid": {"placements": ["pre"], "depths": [2], "lrs": [float("inf")]}}, "=inf is invalid: must be a finite"),
    ({"grid": {"placements": ["pre"], "depths": [2], "lrs": ["nan"]}}, "='nan' is invalid: must be a finite"),
    ({"grid": {"placements": [{"name": "a", "placement": "sandwich"}], "depths": [2]}},
     "placement='sandwich' is invalid: allowed: pre"),
    ({"grid": {"placements": ["pre"], "depths": [2], "ffn": {"dense": ["model.n_layers"]}}}, "plan.grid.ffn.dense"),
    ({"grid": {"placements": ["pre"], "depths": [2, 2]}}, "values must be distinct"),
])
def test_bad_plans_fail_with_a_message_naming_the_key(bad, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_plan(bad)


def test_plan_file_errors_name_the_file(tmp_path):
    file = tmp_path / "plan.yaml"
    file.write_text("name: no-grid\n")
    with pytest.raises(ConfigError, match=r"^plan file '.*plan\.yaml': plan is missing 'grid'"):
        load_plan(file)


@pytest.mark.slow
def test_micro_sweep_end_to_end_then_resume_skips_finished_runs(tmp_path):
    plan = parse_plan(micro_plan(tmp_path / "cache"))
    out = tmp_path / "sweep"
    logs: list[str] = []
    outcome = run_sweep(plan, out, workers=2, threads=1, log=logs.append)
    expected = {"pre-L1-dense-lr3e-3-s0", "pre-L2-dense-lr3e-3-s0", "span-L1-dense-lr3e-3-s0",
                "span-L2-dense-lr3e-3-s0"}
    assert set(outcome.executed) == expected and not outcome.failed and not outcome.skipped
    index = load_index(out)
    assert set(index) == expected
    for run_id, record in index.items():
        assert record["status"] == "done"
        run_dir = out / "runs" / run_id
        summary = json.loads((run_dir / "summary.json").read_text())
        assert record["final_val_loss"] == pytest.approx(summary["final_val_loss"])
        assert summary["steps"] == 3
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]
        stats = json.loads((run_dir / "layer_stats.json").read_text())
        depth = record["depth"]
        assert stats["n_layers"] == depth and len(stats["rms"]) == depth + 1
        assert len(stats["grad_norm"]) == depth + 1 and len(stats["param_grad_norm"]) == depth
        assert all(v > 0 and math.isfinite(v) for v in stats["rms"] + stats["grad_norm"])
    events = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(e["run_id"] for e in events) == sorted(expected)

    mtimes = {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in expected}
    again = run_sweep(plan, out, workers=0, log=logs.append)
    assert again.executed == [] and set(again.skipped) == expected
    assert {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in expected} == mtimes

    # A sweep killed mid-run leaves a run directory without a summary: only that run trains again.
    victim = out / "runs" / "span-L2-dense-lr3e-3-s0"
    (victim / "summary.json").unlink()
    third = run_sweep(plan, out, workers=0, log=logs.append)
    assert third.executed == ["span-L2-dense-lr3e-3-s0"]
    assert set(third.skipped) == expected - {"span-L2-dense-lr3e-3-s0"}
    assert (victim / "summary.json").is_file()
    assert {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns
            for r in expected - {victim.name}} == {r: mtimes[r] for r in expected - {victim.name}}
    assert load_index(out)["span-L2-dense-lr3e-3-s0"]["status"] == "done"


@pytest.mark.slow
def test_sweep_cli_rejects_a_bad_plan_and_writes_nothing(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"grid": {"placements": ["pre"], "depths": [2],
                                                  "ffn": {"dense": ["model.d_modle=16"]}}}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spannorm", "sweep", str(plan_file), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spannorm: error:") and "d_modle" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_changed_plan_refuses_to_reuse_runs_made_with_other_settings(tmp_path):
    data = micro_plan(tmp_path / "cache")
    data["grid"]["placements"], data["grid"]["depths"] = ["pre"], [1]
    out = tmp_path / "sweep"
    assert run_sweep(parse_plan(data), out, workers=0, log=lambda _: None).executed
    data["base"]["config"]["train"]["steps"] = 4  # same run ids, other settings
    with pytest.raises(ConfigError, match=r"pre-L1-dense-lr3e-3-s0 .* other settings train\.steps=3, now "
                                          r"train\.steps=4; allowed: the plan that made it, or a new --out"):
        run_sweep(parse_plan(data), out, workers=0, log=lambda _: None, plan_text="changed")
    assert not (out / "plan.yaml").exists()  # refused before writing anything
    plan_file = tmp_path / "changed.yaml"
    plan_file.write_text(yaml.safe_dump(data))
    before = (out / "index.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "spannorm", "sweep", str(plan_file), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "other settings train.steps=3" in proc.stderr
    assert (out / "index.json").read_text() == before  # nothing rewritten


KILL_PLAN = """
import sys
from spannorm.experiments.plan import load_plan
from spannorm.experiments.runner import run_sweep
run_sweep(load_plan(sys.argv[1]), sys.argv[2], workers=0, log=lambda line: print(line, flush=True))
"""


@pytest.mark.slow
def test_sweep_killed_mid_run_resumes_that_run_from_its_checkpoint(tmp_path):
    """A real kill (SIGKILL) of a sweep while its second run trains: the next sweep skips the finished run
    and resumes the killed one from its last checkpoint, and that run's metrics hold every step once."""
    import signal
    import time

    data = micro_plan(tmp_path / "cache")
    data["grid"]["placements"], data["grid"]["depths"] = ["pre"], [1, 2]
    data["base"]["config"]["train"].update(steps=400, checkpoint_every=5, eval_every=0)
    data["measure"] = {"layer_stats": False}
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "sweep"
    first, second = (out / "runs" / "pre-L2-dense-lr3e-3-s0", out / "runs" / "pre-L1-dense-lr3e-3-s0")
    proc = subprocess.Popen([sys.executable, "-c", KILL_PLAN, str(plan_file), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (first / "summary.json").is_file() or not list((second / "checkpoints").glob("step_*")):
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (second / "summary.json").exists()
    killed_at = max(int(p.name.split("_")[1]) for p in (second / "checkpoints").glob("step_*"))
    assert 0 < killed_at < 400
    logs: list[str] = []
    outcome = run_sweep(parse_plan(data), out, workers=0, log=logs.append)
    assert outcome.skipped == [first.name] and outcome.executed == [second.name]
    summary = json.loads((second / "summary.json").read_text())
    assert summary["steps"] == 400 and summary["status"] == "completed"
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401))  # resumed, not restarted, and no step logged twice


def test_dry_run_lists_the_pending_runs_in_the_order_the_sweep_starts_them(tmp_path, capsys):
    """Finished runs first, then the pending ones as run_sweep would start them: here the deepest first
    (--order longest, the default), the shallowest first with --order shortest; the plan's own order (depth 1
    first) is neither."""
    from spannorm.cli.main import main

    data = micro_plan(tmp_path / "cache")
    data["grid"]["placements"] = ["pre"]
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(data))
    listed = {}
    for order in ("longest", "shortest"):
        assert main(["sweep", str(plan_file), "--out", str(tmp_path / "out"), "--dry-run", "--order", order]) == 0
        lines = capsys.readouterr().out.splitlines()
        listed[order] = [line.split()[0] for line in lines if line.endswith("pending")]
        assert lines[-1].endswith("the finished first, then the 2 pending in the order the sweep starts them")
    assert listed["longest"] == ["pre-L2-dense-lr3e-3-s0", "pre-L1-dense-lr3e-3-s0"]
    assert listed["shortest"] == ["pre-L1-dense-lr3e-3-s0", "pre-L2-dense-lr3e-3-s0"]
    assert not (tmp_path / "out").exists()
