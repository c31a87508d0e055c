"""Run a sweep plan: worker processes, resumability, and a sweep-level index of every run and its status.

Layout of a sweep directory::

    DIR/plan.yaml          the plan as given (rewritten on every start)
    DIR/index.json         every run the plan asks for so far, with its status and headline numbers
    DIR/runs.jsonl         one line per event (a run finished, diverged, failed or was found done)
    DIR/runs/RUN_ID/       the trainer's run directory: config.yaml, metrics.jsonl, summary.json,
                           checkpoints/, plus run.json (the run's grid coordinates), layer_stats.json
                           and train.log

A run whose ``summary.json`` exists is finished and is never run again: a sweep that is started again
(after a kill, or with more seeds in the plan) runs only what is missing. A run directory without a summary is
resumed from its last checkpoint when it has one, and restarted otherwise. A run that raises is recorded as
``failed`` and retried by the next sweep, and so is a run whose worker process dies (the out-of-memory killer)
while it trains alone (:mod:`~spannorm.experiments.pool`: the runs beside it train on); a run that diverges is
finished, recorded as ``diverged``. A run stopped early (Ctrl-C reaches the trainer, which checkpoints and
writes a summary with ``status: interrupted``) is not finished: the sweep stops, and the next one resumes that
run from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from spannorm.config import ConfigError
from spannorm.configuration import parse_override
from spannorm.data.dataset import content_sha256, prepared_folder, tokenizer_from_config
from spannorm.data.tokenizer import fingerprint
from spannorm.experiments.declaration import start_record
from spannorm.experiments.layer_stats import measure_model_dir
from spannorm.experiments.ledger import (
    Ledger,
    check_ledger_plan,
    check_ledger_writable,
    ledger_precision,
    read_curves,
    read_ledger,
    run_line,
    start_line,
)
from spannorm.experiments.plan import FINISHED, RunSpec, StudyPlan, stored_overrides
from spannorm.experiments.plan_checks import check_sweep_folder, read_index
from spannorm.experiments.pool import RunPool
from spannorm.experiments.sweep_setup import sweep_overrides
from spannorm.files import atomic_write_text
from spannorm.interop.init_from import run_config_layer
from spannorm.launch import train
from spannorm.train.checkpoint import latest_checkpoint, read_json
from spannorm.train.config import RunConfig, load_config_file, resolve_config
from spannorm.train.layout import CHECKPOINTS_DIR, STATE_NAME, SUMMARY_NAME
from spannorm.train.run_lock import hold_run_folder

RUNS_DIR = "runs"
RUN_INFO_NAME = "run.json"
LAYER_STATS_NAME = "layer_stats.json"
INTERRUPTED = "interrupted"
"""A run summary's status when the trainer stopped before its last step (Ctrl-C, a stop request)."""
SUMMARY_FIELDS = ("final_val_loss", "best_val_loss", "diverged", "diverged_step", "steps", "tokens", "wall_s",
                  "tokens_per_s")


@dataclass
class SweepOutcome:
    """What one call of :func:`run_sweep` did."""

    executed: list[str] = field(default_factory=list)
    """Runs trained by this call (finished, diverged or failed)."""
    skipped: list[str] = field(default_factory=list)
    """Runs found finished and left alone."""
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=True))


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` as a dict, or None when the run has not finished: no summary, or the summary
    of a run stopped before its last step (``status: interrupted``), which the next sweep resumes."""
    path = run_dir / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return None if not isinstance(summary, dict) or summary.get("status") == INTERRUPTED else summary


def record_from_summary(spec: RunSpec, summary: dict[str, Any]) -> dict[str, Any]:
    """The index record of a finished run: its coordinates, its status, the summary's numbers and the content
    hash of its data (``data_sha256``; None for a run that predates data fingerprints) and, for a run resumed
    on other data, the hashes of its earlier steps' data (``data_earlier``)."""
    record = spec.to_dict()
    record.pop("overrides")
    for name in SUMMARY_FIELDS:
        record[name] = summary.get(name)
    record["diverged"] = bool(summary.get("diverged"))
    data = summary.get("data")
    record["data_sha256"] = data.get("sha256") if isinstance(data, Mapping) else None  # None: before fingerprints
    if isinstance(data, Mapping) and data.get("earlier"):  # resumed on other data: its earlier steps' hashes
        record["data_earlier"] = [e.get("sha256") for e in data["earlier"] if isinstance(e, Mapping)]
    for name in ("final_val_loss", "best_val_loss"):
        record[name] = _finite_or_none(record[name])
    record["status"] = "diverged" if record["diverged"] else "done"
    return record


def _latest_model_dir(run_dir: Path) -> Path | None:
    """The newest directory under ``run_dir/checkpoints`` that holds a saved model."""
    return latest_checkpoint(run_dir)


def _has_checkpoint(run_dir: Path) -> bool:
    return _latest_model_dir(run_dir) is not None


def settings_conflict(spec: RunSpec, stored: Mapping[str, Any], sweep_overrides: tuple[str, ...] | None = None,
                      strict: bool = False) -> str | None:
    """What differs between the settings ``stored`` for a run (a ``run.json`` or a ledger line: ``preset``,
    ``overrides`` and, when ``sweep_overrides`` is given, ``sweep_overrides``) and ``spec``'s; None when
    nothing does, or (unless ``strict``) when the stored settings do not parse."""
    def settings(overrides) -> dict[str, str]:  # later overrides of a key win, as in resolve_config
        return {".".join(parts): value for parts, value in map(parse_override, overrides)}

    try:
        old_preset = stored.get("preset")
        old = settings([*stored_overrides(stored),
                        *((stored.get("sweep_overrides") or ()) if sweep_overrides is not None else ())])
    except (ValueError, ConfigError, TypeError):
        # an unreadable run.json: the run's own config.yaml still guards a resume; a ledger line has no other guard
        return "settings that do not parse" if strict else None
    new = settings([*spec.overrides, *(sweep_overrides or ())])
    if old_preset == spec.preset and old == new:
        return None
    if old_preset != spec.preset:
        return f"preset {old_preset!r}, now {spec.preset!r}"
    gone = [f"{k}={v}" for k, v in old.items() if new.get(k) != v]
    added = [f"{k}={v}" for k, v in new.items() if old.get(k) != v]
    what = f"settings {', '.join(gone) or '(none)'}, now {', '.join(added) or '(none)'}"
    if "placement_names" not in stored and any(k.startswith("model.") and "span" in f"{k}={v}"
                                               for k, v in [*old.items(), *new.items()] if new.get(k) != old.get(k)):
        what += (" (it was stored before placement names 2, and reads in today's names as shown: a plan written "
                 "then says placement_names: 1)")
    return what


def check_run_settings(spec: RunSpec, run_dir: str | Path) -> None:
    """Raise :class:`ConfigError` when ``run_dir`` holds a run (finished or not) that an earlier sweep made
    with other settings than ``spec``'s: skipping or resuming it would mix two configs under one run id."""
    info_path = Path(run_dir) / RUN_INFO_NAME
    if not info_path.is_file():
        return
    try:
        stored = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return  # an unreadable record: the run's own config.yaml still guards a resume
    what = settings_conflict(spec, stored) if isinstance(stored, dict) else None
    if what is not None:
        raise ConfigError(f"run {spec.run_id} in {Path(run_dir).parent} was made with other {what}; allowed: "
                          "the plan that made it, or a new --out directory")


def _resolved(preset: str | None, overrides: list[str]) -> dict[str, Any] | None:
    try:
        return resolve_config(preset, None, overrides, init_from_layer=run_config_layer).to_dict()
    except ConfigError:
        return None


def check_ledger_settings(spec: RunSpec, ledger: Ledger, sweep_overrides: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` when ``ledger`` holds ``spec``'s run id made with other settings (the plan's
    overrides, or the sweep's own, such as the precision it chose): counting it finished would credit one
    config's result to another. Overrides that differ in text but resolve to the same config (a precision
    named that is the default anyway) are the same settings."""
    line = ledger.runs.get(spec.run_id)
    if line is None:
        return
    stored = {**line["spec"], "sweep_overrides": line.get("sweep_overrides") or []}
    what = settings_conflict(spec, stored, sweep_overrides, strict=True)
    if what is None:
        return
    if what != "settings that do not parse" and stored.get("preset") == spec.preset:
        old = _resolved(spec.preset, [*stored_overrides(stored), *stored["sweep_overrides"]])
        if old is not None and old == _resolved(spec.preset, [*spec.overrides, *sweep_overrides]):
            return
    raise ConfigError(f"run {spec.run_id} in ledger {str(ledger.path)!r} was made with other {what}; "
                      "allowed: the plan (and precision) that made it, or another --ledger file")


def recorded_data(run_dir: Path, ledger: Ledger | None, run_id: str) -> tuple[str, Mapping[str, Any] | None, bool]:
    """Where a run's record was found (words for a message), the data fingerprint it records
    (:func:`~spannorm.data.dataset.data_fingerprint`; None when it predates fingerprints or has not started),
    and whether the run is finished: its folder's summary, else its ledger line's, else (an unfinished run a
    sweep would resume) its latest checkpoint's trainer state."""
    summary = read_summary(run_dir)
    if summary is None and ledger is not None and run_id in ledger.runs:
        summary, where = ledger.runs[run_id].get("summary") or {}, f"in ledger {ledger.path}"
    else:
        where = f"in {run_dir.parent}"
    if summary is not None:
        data, finished = summary.get("data"), True
    else:
        ckpt = latest_checkpoint(run_dir)
        try:
            data = read_json(ckpt / STATE_NAME).get("data") if ckpt is not None else None
        except ConfigError:
            data = None  # a damaged checkpoint: the trainer's own resume check names it
        finished = False
    if not isinstance(data, Mapping) or not isinstance(data.get("sha256"), str):
        data = None
    return where, data, finished


def _current_data(data_cfg) -> tuple[str, str | None]:
    """The content hash of the data ``data_cfg`` names now and, for a text corpus with a ``tokenizer.json``
    tokenizer, that tokenizer's fingerprint (None where the content hash covers the tokenizer, or it is
    trained here: byte, bpe, a prepared folder)."""
    sha = content_sha256(data_cfg)
    if data_cfg.tokenizer in ("byte", "bpe") or prepared_folder(data_cfg) is not None:
        return sha, None
    return sha, fingerprint(tokenizer_from_config(data_cfg))


def check_data_unchanged(specs: list[RunSpec], runs_root: Path, ledger: Ledger | None) -> None:
    """Raise :class:`ConfigError` when a run under ``runs_root`` or in ``ledger`` recorded a data fingerprint
    whose content hash (or ``tokenizer.json``) differs from what its settings name now: a new or resumed run
    beside it would train on other data under the same plan (an edited corpus, or the embedded corpus of
    another Python version). Data that cannot be read now is refused the same way when some run of ``specs``
    would still train; when every one is finished there is nothing to check it for. Runs that predate
    fingerprints are not checked; the data is read once per data setting, and only for runs that record one."""
    current: dict[str, tuple[str, str | None] | str] = {}  # data setting -> hashes now, or why it is unreadable
    recorded = {spec.run_id: recorded_data(runs_root / spec.run_id, ledger, spec.run_id) for spec in specs}
    all_finished = all(finished for _, _, finished in recorded.values())
    for spec in specs:
        where, data, _ = recorded[spec.run_id]
        if data is None:
            continue
        data_cfg = resolve_config(spec.preset, None, list(spec.overrides), init_from_layer=run_config_layer).data
        key = json.dumps(asdict(data_cfg), sort_keys=True)
        if key not in current:
            try:
                current[key] = _current_data(data_cfg)
            except (ConfigError, OSError) as err:
                current[key] = str(err).splitlines()[0] if str(err) else type(err).__name__
        now = current[key]
        made_by = f" (the embedded corpus of Python {data['python']})" if data.get("python") else ""
        said = f"run {spec.run_id} ({where}) trained on {data.get('source')}{made_by} with content sha256 " \
               f"{data['sha256'][:16]}..."
        if isinstance(now, str):
            if all_finished:
                continue
            raise ConfigError(f"{said}, but that data cannot be read now ({now}); the plan's other runs would "
                              "train on other data or none; allowed: the data it trained on, where it was, or a "
                              "new --out (and another --ledger)")
        sha, tokenizer = now
        if sha != data["sha256"]:
            raise ConfigError(f"{said}, but that data now hashes to {sha[:16]}...; the plan's other runs would "
                              "train on other data; allowed: the data it trained on, or a new --out (and another "
                              "--ledger)")
        if tokenizer is not None and data.get("tokenizer") not in (None, tokenizer):
            raise ConfigError(f"{said} and tokenizer {data.get('tokenizer')}, but data.tokenizer="
                              f"{data_cfg.tokenizer} is now {tokenizer}; allowed: the tokenizer it trained with, "
                              "or a new --out (and another --ledger)")


def ledger_records(ledger: Ledger) -> dict[str, dict[str, Any]]:
    """The ledger's finished runs as index records (``run_id -> record``), what plan expansion reads."""
    return {run_id: record_from_summary(RunSpec.from_dict(line["spec"]), line["summary"])
            for run_id, line in ledger.runs.items()}


def check_ledger(plan: StudyPlan, ledger: Ledger, out_dir: str | Path, precision: str | None) -> None:
    """Every check a ledger must pass before a sweep writes anything, each a :class:`ConfigError`: the sweep
    can append to it; it belongs to ``plan``; ``plan`` still asks for every run it holds; every run the plan
    asks for, given the ledger's and the folder's finished runs, was made with the same settings; and a run
    both in the ledger and finished in the folder has the same outcome in both."""
    check_ledger_writable(ledger.path)
    check_ledger_plan(ledger, plan.name)
    records = ledger_records(ledger)
    wanted = {spec.run_id for spec in plan.expand(records)}
    dropped = [run_id for run_id in records if run_id not in wanted]
    if dropped:
        raise ConfigError(f"plan {plan.name!r} no longer asks for {len(dropped)} run(s) that ledger "
                          f"{str(ledger.path)!r} holds (e.g. {dropped[0]}); allowed: the plan that made them "
                          "(extended, not cut), or another --ledger file")
    out = Path(out_dir)
    for spec in plan.expand({**records, **load_index(out)}):
        check_ledger_settings(spec, ledger, sweep_overrides(spec, precision))
    for run_id, record in records.items():
        summary = read_summary(out / RUNS_DIR / run_id)
        if summary is None:
            continue
        here = (bool(summary.get("diverged")), _finite_or_none(summary.get("final_val_loss")))
        there = (record["diverged"], record["final_val_loss"])
        if here != there:
            raise ConfigError(f"run {run_id} finished differently in {str(out)!r} (final val loss {here[1]}) and "
                              f"in ledger {str(ledger.path)!r} ({there[1]}); allowed: a folder and a ledger of "
                              "the same sweep, or a new --out")


def ledger_precision_setup(ledger: Ledger) -> dict[str, Any] | None:
    """A stored-setup stand-in for a new folder resuming from ``ledger``: the precision its runs trained in,
    so the sweep does not choose another one (None when the ledger has no runs or they disagree)."""
    known, precision = ledger_precision(ledger)
    if not ledger.runs or not known:
        return None
    return {"precision": precision,
            "inherited_from": f"the precision the runs of ledger {str(ledger.path)!r} trained in"}


def ledger_line_from_folder(spec: RunSpec, run_dir: Path, plan_name: str, summary: Mapping[str, Any],
                            sweep_overrides: tuple[str, ...]) -> dict[str, Any]:
    """The ledger line of a run finished in ``run_dir``: its ``run.json`` settings when it has one (the plan's
    otherwise), its summary, its loss curves and its per-layer stats."""
    stored: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((run_dir / RUN_INFO_NAME).read_text())
        stored = loaded if isinstance(loaded, dict) else {}
    spec_data: dict[str, Any] = {**spec.to_dict(), **{k: stored[k] for k in ("preset",) if k in stored}}
    if "overrides" in stored:  # in today's placement names, as the line's placement_names says
        spec_data["overrides"] = stored_overrides(stored)
    extra = stored.get("sweep_overrides", list(sweep_overrides))
    stats = None
    with contextlib.suppress(OSError, ValueError):
        stats = json.loads((run_dir / LAYER_STATS_NAME).read_text())
    val, train_curve = read_curves(run_dir)
    return run_line(plan_name, spec_data, extra, summary, val, train_curve, stats)


def measure_run(run_dir: Path, batch_size: int) -> dict[str, Any] | None:
    """Measure the per-layer moments of a finished run from its last checkpoint, on the fixed validation
    batch; write ``layer_stats.json``. None when the run has no checkpoint."""
    model_dir = _latest_model_dir(run_dir)
    if model_dir is None:
        return None
    cfg = RunConfig.from_dict(load_config_file(run_dir))  # the run folder: its config.yaml, read as saved
    stats = measure_model_dir(model_dir, cfg.data, batch_size)
    stats["checkpoint"] = str(model_dir.relative_to(run_dir))
    _write_json_atomic(run_dir / LAYER_STATS_NAME, stats)
    return stats


def execute_run(spec_data: dict[str, Any], run_dir: str, threads: int | None,
                measure: dict[str, Any], added_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train one run (in a worker process or in-process) and return its index record.

    ``added_overrides`` are the sweep's own settings (the precision it chose), applied after the plan's
    overrides and recorded in ``run.json`` apart from them. Never raises: an exception becomes a ``failed``
    record with the error's last line."""
    spec = RunSpec.from_dict(spec_data)
    path = Path(run_dir)
    started = time.time()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        summary = read_summary(path)
        if summary is None:
            cfg = resolve_config(spec.preset, None, [*spec.overrides, *added_overrides],
                                 init_from_layer=run_config_layer)
            resume = _has_checkpoint(path)
            path.mkdir(parents=True, exist_ok=True)
            with hold_run_folder(path):  # one process per run folder (two sweeps on one folder: one trains it)
                _write_json_atomic(path / RUN_INFO_NAME, {**spec.to_dict(), "sweep_overrides": list(added_overrides)})
                with open(path / "train.log", "a") as log, contextlib.redirect_stdout(log), \
                        contextlib.redirect_stderr(log):
                    # unattended: a damaged latest checkpoint falls back to the newest intact one (noted in the log)
                    run = train(cfg, path, resume=resume, overwrite=not resume, use_intact=resume)
            if run.status == INTERRUPTED:  # stopped early (Ctrl-C): not finished; the next sweep resumes it
                record = spec.to_dict()
                record.pop("overrides")
                record.update(status=INTERRUPTED, steps=run.steps, run_wall_s=round(time.time() - started, 2))
                return record
            summary = read_summary(path)
            if summary is None:
                raise RuntimeError(f"the trainer returned without writing {path / SUMMARY_NAME}")
        record = record_from_summary(spec, summary)
        if measure.get("layer_stats") and record["status"] == "done" and not (path / LAYER_STATS_NAME).is_file():
            measure_run(path, int(measure.get("batch_size", 8)))
        if measure.get("prune_checkpoints") and (path / CHECKPOINTS_DIR).is_dir():
            shutil.rmtree(path / CHECKPOINTS_DIR, ignore_errors=True)
    except Exception as err:  # noqa: BLE001 - a failed run must not stop the sweep
        record = spec.to_dict()
        record.pop("overrides")
        record.update(status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0][:500])
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
            (path / "error.txt").write_text(traceback.format_exc())
    record["run_wall_s"] = round(time.time() - started, 2)
    return record


ORDERS = ("longest", "shortest")
STAGE_ORDER = {"grid": 0, "search": 0, "best": 1, "shared": 2}
"""Runs start by stage (LR searches first, shared-LR runs last), then longest first."""


def _cost(spec: RunSpec, plan: StudyPlan) -> float:
    """A relative cost estimate for ordering: longest runs first (depth, and MoE a little dearer)."""
    moe = any(o.startswith("model.moe") for o in plan.ffn[spec.cell.ffn])
    return spec.cell.depth * (1.5 if moe else 1.0)


def resumable_runs(runs_root: Path) -> set[str]:
    """The run ids under ``runs_root`` stopped part way (a kill, Ctrl-C): a folder with a checkpoint."""
    if not runs_root.is_dir():
        return set()
    return {d.name for d in runs_root.iterdir() if d.is_dir() and _has_checkpoint(d)}


def start_order(pending: list[RunSpec], plan: StudyPlan, order: str, resumable: set[str]) -> list[RunSpec]:
    """``pending`` in the order a sweep starts them: the ``resumable`` runs first (their checkpoints are the
    work most at risk of being lost with the folder, and a run started is a run its stage had already
    reached); then by the plan's start rank (``protocol.order``), stage, and cost (``order``: ``longest`` or
    ``shortest`` first); ties keep the plan's order."""
    sign = -1.0 if order == "longest" else 1.0
    return sorted(pending, key=lambda s: (s.run_id not in resumable, plan.start_rank(s), STAGE_ORDER.get(s.stage, 0),
                                          sign * _cost(s, plan)))


def load_index(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The sweep's ``index.json`` as ``run_id -> record`` (empty when there is none); a corrupt index is
    :class:`ConfigError` naming the file."""
    data = read_index(out_dir)
    return {} if data is None else {r["run_id"]: r for r in data["runs"]}


def run_sweep(plan: StudyPlan, out_dir: str | Path, *, workers: int = 1, threads: int | None = 1,
              plan_text: str | None = None, log: Callable[[str], None] = print,
              max_runs: int | None = None, order: str = "longest", precision: str | None = None,
              setup: Mapping[str, Any] | None = None,
              plan_path: str | Path | None = None, ledger: str | Path | None = None) -> SweepOutcome:
    """Run every run of ``plan`` that is not finished under ``out_dir``.

    ``workers`` processes (spawn context) train runs in parallel, each with ``threads`` torch threads
    (None: leave torch's default); ``workers=0`` trains in this process, one run at a time. ``precision``
    trains the runs whose plan names no ``train.precision`` in it (None: their config's default). ``setup``
    (:meth:`~spannorm.experiments.sweep_setup.SweepSetup.to_dict`: how this sweep was started, and why) is
    stored in ``index.json`` and logged to ``runs.jsonl``. ``max_runs``
    stops after starting that many runs (the rest stay pending for the next call). Runs start stage by
    stage (LR search, best LR, shared LR); within a stage ``order="longest"`` starts the deepest runs first
    (the shortest total time), ``"shortest"`` the cheapest first (the most runs finished by any deadline);
    a plan with ``protocol.order: depth`` starts its shallowest depth first, stage by stage, then the next.
    Each call appends to the index's ``starts`` what the plan (``plan_text``, read from ``plan_path``)
    declared, for :mod:`~spannorm.experiments.declaration`.

    ``ledger`` (:mod:`~spannorm.experiments.ledger`): a file that outlives the run folders. Every run it holds
    counts as finished (its settings checked against the plan's, as a run folder's are), every run this
    sweep finds finished or finishes is appended to it, and so is this start, with the plan's text; the
    starts it records come before this folder's own in the index."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is invalid; allowed: {', '.join(ORDERS)}")
    out = Path(out_dir)
    runs_root = out / RUNS_DIR
    checked: set[str] = set()  # run ids whose folder check_run_settings has passed
    check_sweep_folder(plan, out, load_index(out))  # a sweep folder belongs to one plan
    book = None if ledger is None else read_ledger(ledger)
    if book is not None:
        check_ledger(plan, book, out, precision)  # before anything is written
    old_index = read_index(out) or {}
    on_disk = {p.parent.name for p in runs_root.glob(f"*/{SUMMARY_NAME}") if read_summary(p.parent) is not None}
    finished_before = len(on_disk | (set(book.runs) if book is not None else set()))  # an index can be lost
    declaration = None if plan.preregistered is None else plan.preregistered.to_dict()
    start = start_record(declaration, plan_text, plan_path, finished_before)
    starts = _merge_starts(old_index.get("starts", []), [] if book is None else [s["record"] for s in book.starts])
    # the folder's own starts the ledger lacks (an old folder given a new ledger): kept, so that the evidence
    # of a declaration made first outlives the folder
    backfill = [] if book is None else [s for s in old_index.get("starts", []) if _start_key(s) not in
                                        {_start_key(line["record"]) for line in book.starts}]
    starts.append(start)

    def check_settings(spec: RunSpec) -> None:
        check_run_settings(spec, runs_root / spec.run_id)
        if book is not None:
            check_ledger_settings(spec, book, sweep_overrides(spec, precision))
        checked.add(spec.run_id)

    finished = {**(ledger_records(book) if book is not None else {}), **load_index(out)}
    expanded = plan.expand(finished)
    for spec in expanded:  # before anything is written: a changed plan keeps the old files
        check_run_settings(spec, runs_root / spec.run_id)  # check_ledger checked these specs against the ledger
        checked.add(spec.run_id)

    check_data_unchanged(expanded, runs_root, book)
    runs_root.mkdir(parents=True, exist_ok=True)
    if plan_text is not None:
        (out / "plan.yaml").write_text(plan_text)
    if book is not None:
        if book.skipped_lines:
            log(f"[sweep] ledger {book.path}: {book.skipped_lines} line(s) cut short (a kill while writing) skipped")
        for old_start in sorted(backfill, key=lambda s: float(s.get("time") or 0)):
            book.append(start_line(plan.name, None, old_start))
        book.append(start_line(plan.name, plan_text, start))
    started = time.time()
    outcome = SweepOutcome()
    measure = {"layer_stats": plan.measure.layer_stats, "batch_size": plan.measure.batch_size,
               "prune_checkpoints": plan.measure.prune_checkpoints}
    records: dict[str, dict[str, Any]] = {}
    pool = RunPool(workers, execute_run, log=lambda line: log(f"[sweep] {line}"))  # workers die with this process
    submitted: dict[str, RunSpec] = {}
    events = open(out / "runs.jsonl", "a")

    def note(record: dict[str, Any], event: str) -> None:
        records[record["run_id"]] = record
        events.write(json.dumps({"event": event, "time": round(time.time(), 3), **record}) + "\n")
        events.flush()

    def write_index(specs: list[RunSpec]) -> None:
        rows = []
        running = set(pool.running)
        for spec in specs:
            row = records.get(spec.run_id)
            if row is None:
                row = spec.to_dict()
                row.pop("overrides")
                row["status"] = "running" if spec.run_id in running else "pending"
            rows.append(row)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        index = {"plan": plan.name, "updated": time.time(), "counts": counts, "starts": starts,
                 "runs": rows}
        if setup is not None:
            index["setup"] = dict(setup)
        if book is not None:  # where a report finds runs whose folders are gone; relative survives a move
            index["ledger"] = str(book.path.resolve())
            index["ledger_from_folder"] = os.path.relpath(book.path.resolve(), out.resolve())
        _write_json_atomic(out / "index.json", index)

    # Runs finished by earlier sweeps (their summary is on disk) are recorded without being touched.
    def absorb_finished(specs: list[RunSpec]) -> None:
        running = set(pool.running)
        for spec in specs:
            if spec.run_id in records or spec.run_id in running:
                continue
            if spec.run_id not in checked:  # a spec the LR search added since the last loop
                check_settings(spec)
            summary = read_summary(runs_root / spec.run_id)
            if summary is None:
                line = None if book is None else book.runs.get(spec.run_id)
                if line is None:
                    continue
                record = {**record_from_summary(spec, line.get("summary") or {}), "source": "ledger"}
            else:
                record = record_from_summary(spec, summary)
                if plan.measure.layer_stats and record["status"] == "done" \
                        and not (runs_root / spec.run_id / LAYER_STATS_NAME).is_file():
                    record = execute_run(spec.to_dict(), str(runs_root / spec.run_id), None, measure,
                                         sweep_overrides(spec, precision))
                keep(spec, record)
            note(record, "found")
            outcome.skipped.append(spec.run_id)

    def keep(spec: RunSpec, record: dict[str, Any]) -> None:
        """Append a run finished in its folder to the ledger, once."""
        if book is None or record["status"] not in FINISHED or spec.run_id in book.runs:
            return
        summary = read_summary(runs_root / spec.run_id)
        if summary is not None:
            book.append(ledger_line_from_folder(spec, runs_root / spec.run_id, plan.name, summary,
                                                sweep_overrides(spec, precision)))

    attempted: set[str] = set()
    resumable = resumable_runs(runs_root)  # started before the ones not started (start_order)
    if setup is not None:
        events.write(json.dumps({"event": "start", "time": round(time.time(), 3), "setup": dict(setup)}) + "\n")
        events.flush()
    try:
        while True:
            specs = plan.expand(records)
            while True:  # a finished run can extend the plan (LR search, bracketing): absorb until none is new
                known = len(records)
                absorb_finished(specs)
                specs = plan.expand(records)
                if len(records) == known:
                    break
            pending = start_order([s for s in specs if s.run_id not in records and s.run_id not in attempted],
                                  plan, order, resumable)
            slots = pool.free
            if max_runs is not None:
                slots = min(slots, max_runs - len(attempted))
            for spec in pending[:max(0, slots)]:
                attempted.add(spec.run_id)
                submitted[spec.run_id] = spec
                pool.submit(spec.run_id, (spec.to_dict(), str(runs_root / spec.run_id), threads if workers else None,
                                          measure, sweep_overrides(spec, precision)))
                log(f"[sweep] start {spec.run_id}")
            write_index(plan.expand(records))
            if not pool.running:
                break
            for run_id, record in pool.wait():
                _finish(record, outcome, note, log)
                keep(submitted[run_id], record)
    finally:
        pool.close()
        write_index(plan.expand(records))
        events.close()
    outcome.wall_s = time.time() - started
    return outcome


def _start_key(start: Mapping[str, Any]) -> tuple[Any, Any]:
    return start.get("time"), start.get("plan_sha256")


def _merge_starts(own: list[dict[str, Any]], from_ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The folder's recorded starts and the ledger's, each once (by time and plan digest), oldest first."""
    merged = {_start_key(s): dict(s) for s in [*from_ledger, *own]}
    return sorted(merged.values(), key=lambda s: float(s.get("time") or 0))


def _finish(record: dict[str, Any], outcome: SweepOutcome, note, log) -> None:
    run_id, status = record["run_id"], record["status"]
    if status == INTERRUPTED:  # Ctrl-C reached the run: stop the sweep; the run stays pending, to be resumed
        log(f"[sweep] interrupted {run_id} after step {record.get('steps')}: the next sweep resumes it")
        raise KeyboardInterrupt
    outcome.executed.append(run_id)
    if status == "failed":
        outcome.failed.append(run_id)
        log(f"[sweep] FAILED {run_id}: {record.get('error')}")
    else:
        if status == "diverged":
            outcome.diverged.append(run_id)
        loss = record.get("final_val_loss")
        shown = f"{loss:.4f}" if isinstance(loss, float) else "n/a"
        log(f"[sweep] {status} {run_id}: final val loss {shown} ({record.get('run_wall_s')} s)")
    note(record, status)


__all__ = ["FINISHED", "INTERRUPTED", "SweepOutcome", "check_data_unchanged", "check_ledger", "check_ledger_settings",
           "check_run_settings", "execute_run", "ledger_line_from_folder", "ledger_precision_setup", "ledger_records",
           "load_index",
           "measure_run", "read_summary", "record_from_summary", "recorded_data", "resumable_runs", "run_sweep",
           "start_order"]
