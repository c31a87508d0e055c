"""Retrain runs that a ledger keeps as numbers only, to get back their loss curves and per-layer stats.

A ledger line without curves (for example one rebuilt from a ``results.csv`` after the run folders were lost)
still counts the run as finished, but a report cannot plot it. ``spannorm sweep PLAN --out DIR --ledger FILE
--recover RUN_ID[,RUN_ID...]`` trains each named run again, with the settings the ledger recorded (the plan's
overrides and the sweep's own, such as its precision), into ``DIR/runs/RUN_ID``. Training is deterministic on
one machine and code, so the retrained run must end at exactly the recorded final val loss. Only then is its
full line (curves, layer stats) appended to the ledger, where it takes the old line's place. A run that ends
elsewhere is reported, and the ledger keeps the recorded line. Nothing else of the plan runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from spannorm.config import ConfigError
from spannorm.experiments.ledger import Ledger, check_ledger_plan, check_ledger_writable, read_ledger
from spannorm.experiments.plan import RunSpec, StudyPlan
from spannorm.experiments.pool import RunPool
from spannorm.experiments.runner import (
    INTERRUPTED,
    RUNS_DIR,
    check_ledger_settings,
    execute_run,
    ledger_line_from_folder,
    ledger_records,
    read_summary,
)
from spannorm.train.run_lock import hold_run_folder


@dataclass
class RecoverOutcome:
    """What one call of :func:`recover_runs` did."""

    recovered: list[str] = field(default_factory=list)
    """Runs retrained to the recorded final val loss, their full lines appended to the ledger."""
    mismatched: list[tuple[str, Any, Any]] = field(default_factory=list)
    """(run id, recorded final val loss, retrained final val loss) of runs that did not reproduce."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(run id, error) of runs whose retraining failed."""
    had_curves: list[str] = field(default_factory=list)
    """Runs named that the ledger already holds with their curves (recovered before): not trained."""


def _outcome(summary: dict[str, Any]) -> tuple[bool, Any]:
    return bool(summary.get("diverged")), summary.get("final_val_loss")


def check_recoverable(plan: StudyPlan, ledger_path: str | Path,
                      run_ids: list[str]) -> tuple[Ledger, dict[str, RunSpec]]:
    """The ledger and the specs of the runs of ``run_ids`` it keeps as numbers only (a run that already has its
    curves is left out: the same command, run again after a kill, goes on with the rest), after every check,
    each a one-line :class:`ConfigError`: the ledger can be appended to and belongs to ``plan``; each run is in
    it, the plan still asks for it, and with the settings the ledger recorded."""
    book = read_ledger(ledger_path)
    check_ledger_writable(book.path)
    check_ledger_plan(book, plan.name)
    if not run_ids:
        raise ConfigError("--recover names no run; allowed: run ids of the ledger, separated by commas")
    wanted = {spec.run_id: spec for spec in plan.expand(ledger_records(book))}
    specs = {}
    for run_id in run_ids:
        line = book.runs.get(run_id)
        if line is None:
            example = next(iter(book.runs), "none")
            raise ConfigError(f"--recover {run_id}: ledger {str(book.path)!r} holds no such run; allowed: a run "
                              f"id the ledger holds (e.g. {example})")
        if line.get("val_curve") or line.get("train_curve"):
            continue  # recovered already (by an earlier, killed call of the same command), or never lost
        if run_id not in wanted:
            raise ConfigError(f"--recover {run_id}: plan {plan.name!r} no longer asks for it; allowed: a run of "
                              "the plan that made the ledger")
        check_ledger_settings(wanted[run_id], book, tuple(line.get("sweep_overrides") or ()))
        specs[run_id] = wanted[run_id]
    return book, specs


def recover_runs(plan: StudyPlan, out_dir: str | Path, ledger_path: str | Path, run_ids: list[str], *,
                 workers: int = 1, threads: int | None = 1,
                 log: Callable[[str], None] = print) -> RecoverOutcome:
    """Retrain ``run_ids`` (see the module docstring) in ``workers`` processes (0: in this process), each
    with ``threads`` torch threads, and append the line of each that reproduces its recorded final val loss."""
    book, specs = check_recoverable(plan, ledger_path, run_ids)  # every refusal before anything is written
    outcome = RecoverOutcome(had_curves=[run_id for run_id in run_ids if run_id not in specs])
    if outcome.had_curves:
        log(f"[recover] {len(outcome.had_curves)} run(s) already hold their curves in the ledger, left as they are "
            f"(e.g. {outcome.had_curves[0]})")
    if not specs:
        return outcome
    log(f"[recover] {len(specs)} run(s), {workers} worker(s) x {threads or 'default'} thread(s)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    measure = {"layer_stats": plan.measure.layer_stats, "batch_size": plan.measure.batch_size,
               "prune_checkpoints": plan.measure.prune_checkpoints}
    jobs = {run_id: (specs[run_id].to_dict(), str(out / RUNS_DIR / run_id), threads, measure,
                     tuple(book.runs[run_id].get("sweep_overrides") or ()))
            for run_id in specs}

    def settle(run_id: str, record: dict[str, Any]) -> None:
        """Append the run's line to the ledger if it reproduced its recorded outcome, at once: a recovery
        killed later keeps every line appended so far."""
        run_dir = out / RUNS_DIR / run_id
        if record.get("status") == INTERRUPTED:  # Ctrl-C reached the run: stop; the same command resumes it
            log(f"[recover] interrupted {run_id} after step {record.get('steps')}: the same command resumes it")
            raise KeyboardInterrupt
        summary = read_summary(run_dir)
        recorded = book.runs[run_id].get("summary") or {}
        if summary is None:
            outcome.failed.append((run_id, str(record.get("error") or record.get("status"))))
            log(f"[recover] {run_id} failed: {outcome.failed[-1][1]}")
            return
        if _outcome(summary) != _outcome(recorded):
            outcome.mismatched.append((run_id, recorded.get("final_val_loss"), summary.get("final_val_loss")))
            log(f"[recover] {run_id} did not reproduce: recorded final val loss "
                f"{recorded.get('final_val_loss')!r}, retrained {summary.get('final_val_loss')!r}; the ledger "
                "keeps the recorded line")
            return
        kept = {**summary, "recovered": {"recorded_summary_source": recorded.get("source"),
                                         "note": "retrained by spannorm sweep --recover; final val loss equal "
                                                 "to the recorded one bit for bit"}}
        book.append(ledger_line_from_folder(specs[run_id], run_dir, plan.name, kept, jobs[run_id][4]))
        outcome.recovered.append(run_id)
        log(f"[recover] {run_id}: final val loss {summary.get('final_val_loss')!r} equals the recorded one; "
            "its curves and layer stats are in the ledger now")

    # one sweep or recovery per folder at a time
    with hold_run_folder(out), RunPool(workers, execute_run, log=lambda line: log(f"[recover] {line}")) as pool:
        queue = list(jobs)
        while queue or pool.running:
            while queue and pool.free > 0:  # submitted when a worker is free: it starts now
                run_id = queue.pop(0)
                pool.submit(run_id, jobs[run_id])
                log(f"[recover] start {run_id}")
            for run_id, record in pool.wait():
                settle(run_id, record)
    return outcome


__all__ = ["RecoverOutcome", "check_recoverable", "recover_runs"]
