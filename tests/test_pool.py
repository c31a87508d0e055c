"""The worker pool of sweeps and recoveries: a worker that dies (out of memory, kill -9) costs the run it held,
not the sweep, and not the healthy runs beside it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from pool_jobs import note_and_maybe_die
from spannorm.experiments.plan import parse_plan
from spannorm.experiments.pool import WORKER_LOST, RunPool
from spannorm.experiments.runner import run_sweep
from test_sweep import micro_plan


def drain(pool: RunPool) -> dict:
    records = {}
    while pool.running:
        for key, record in pool.wait():
            assert key not in records, f"{key} returned twice"
            records[key] = record
    return records


def calls(folder: Path, key: str) -> int:
    return len((folder / f"{key}.calls").read_text().splitlines())


def job(folder: Path, key: str, dies: str = "never", beside: str | None = None) -> tuple:
    return ({"run_id": key, "placement": "pre", "overrides": ["x=1"]}, str(folder), dies, beside)


@pytest.mark.slow
def test_a_dead_worker_fails_its_own_run_and_the_run_beside_it_trains_again_alone(tmp_path):
    logs: list[str] = []
    with RunPool(2, note_and_maybe_die, log=logs.append) as pool:
        assert pool.free == 2
        # Both workers first, side by side. CPython's executor spawns a worker at a submit just after it wakes
        # its manager thread, which may then watch the older workers only and miss the new one's death until
        # the next run ends (the sweep test below meets that case too); warm workers take it out of this test.
        pool.submit("warm-a", job(tmp_path, "warm-a", beside="warm-b"))
        pool.submit("warm-b", job(tmp_path, "warm-b", beside="warm-a"))
        assert sorted(drain(pool)) == ["warm-a", "warm-b"]
        pool.submit("healthy", job(tmp_path, "healthy", dies="outlive", beside="doomed"))
        pool.submit("doomed", job(tmp_path, "doomed", dies="always", beside="healthy"))
        assert pool.free == 0 and sorted(pool.running) == ["doomed", "healthy"]
        records = drain(pool)
        assert records["healthy"]["status"] == "done"
        assert records["doomed"] == {"run_id": "doomed", "placement": "pre", "status": "failed", "error": WORKER_LOST}
        # Both lost their worker when the doomed one died; each then trained alone, and only the doomed one died.
        assert calls(tmp_path, "healthy") == 2 and calls(tmp_path, "doomed") == 2
        assert any("a worker ended abruptly while 2 run(s) trained (healthy, doomed)" in line for line in logs), logs
        assert any("the worker training doomed alone ended abruptly; doomed counts as failed" in line for line in logs)
        # The pool works on: two workers again, no run held back.
        assert pool.free == 2
        pool.submit("after", job(tmp_path, "after"))
        assert drain(pool)["after"]["status"] == "done"


@pytest.mark.slow
def test_a_run_alone_whose_worker_dies_trains_once_more_alone_and_an_idle_worker_that_dies_costs_nothing(tmp_path):
    logs: list[str] = []
    with RunPool(2, note_and_maybe_die, log=logs.append) as pool:
        # Alone in flight, its worker's death does not prove the run killed it (an idle worker may have died):
        # it trains once more on new workers, alone, and fails when it dies there too.
        pool.submit("doomed", job(tmp_path, "doomed", dies="always"))
        assert drain(pool)["doomed"]["error"] == WORKER_LOST and calls(tmp_path, "doomed") == 2
        pool.submit("unsendable", ({"run_id": "unsendable"}, str(tmp_path), lambda: 0, None))
        record = drain(pool)["unsendable"]
        assert record["status"] == "failed" and "pickle" in record["error"].lower()
        pool.submit("fine", job(tmp_path, "fine"))
        idle = drain(pool)["fine"]["pid"]
        os.kill(idle, signal.SIGKILL)  # an idle worker dies: the executor breaks with no run in flight
        deadline = time.time() + 60
        while Path(f"/proc/{idle}").exists() and time.time() < deadline:  # reaped when the pool notices
            time.sleep(0.05)
        pool.submit("next", job(tmp_path, "next"))  # before the fix: BrokenProcessPool, and the sweep ended
        assert drain(pool)["next"]["status"] == "done" and calls(tmp_path, "next") == 1
    assert any("a worker with no run had ended abruptly; new workers take next" in line for line in logs), logs


def test_in_process_the_pool_trains_one_job_at_each_wait(tmp_path):
    with RunPool(0, note_and_maybe_die) as pool:
        assert pool.free == 1
        pool.submit("here", job(tmp_path, "here"))
        assert pool.free == 0 and pool.running == ["here"] and not (tmp_path / "here.calls").exists()
        (key, record), = pool.wait()
        assert key == "here" and record["pid"] == os.getpid() and pool.running == [] and pool.free == 1
    with pytest.raises(ValueError, match="workers=-1 is invalid"):
        RunPool(-1, note_and_maybe_die)


def worker_pids(parent: int) -> list[int]:
    """The pool workers of ``parent`` (spawned, so their command line names spawn_main), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the workers through /proc (Linux)")
def test_a_sweep_goes_on_when_the_kernel_kills_one_of_its_workers(tmp_path):
    """SIGKILL to one of two workers while both train (what the out-of-memory killer does): the sweep neither
    ends nor loses a run. Both runs retrain alone from their last checkpoints and end with every step once."""
    data = micro_plan(tmp_path / "cache")
    data["grid"]["placements"], data["grid"]["depths"] = ["pre"], [1, 2]
    data["base"]["config"]["train"].update(steps=300, checkpoint_every=5, eval_every=0)
    data["measure"] = {"layer_stats": False}
    out = tmp_path / "sweep"
    logs: list[str] = []
    result = {}

    def sweep() -> None:
        result["outcome"] = run_sweep(parse_plan(data), out, workers=2, threads=1, log=logs.append,
                                      plan_text=yaml.safe_dump(data))

    thread = threading.Thread(target=sweep)
    thread.start()
    try:
        deadline = time.time() + 300
        runs = [out / "runs" / "pre-L1-dense-lr3e-3-s0", out / "runs" / "pre-L2-dense-lr3e-3-s0"]
        while not all(list((run / "checkpoints").glob("step_*")) for run in runs):
            assert thread.is_alive() and time.time() < deadline, "the sweep ended before a worker could be killed"
            time.sleep(0.05)
        assert not any((run / "summary.json").exists() for run in runs)
        victim, *_ = worker_pids(os.getpid())
        os.kill(victim, signal.SIGKILL)
    finally:
        thread.join(timeout=600)
    assert not thread.is_alive(), "the sweep did not end within 10 minutes of the kill"
    outcome = result["outcome"]
    assert sorted(outcome.executed) == sorted(run.name for run in runs) and not outcome.failed
    # Both runs lost their worker and trained again alone, or (when the executor saw the death only once the
    # other run had ended) the run that was left trained again alone: either way, both end whole.
    assert any("a worker ended abruptly while" in line for line in logs), logs
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 300 and summary["status"] == "completed"
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 301))  # resumed from a checkpoint, and no step logged twice
    index = json.loads((out / "index.json").read_text())
    assert index["counts"] == {"done": 2}
