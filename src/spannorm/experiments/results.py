"""Read finished sweeps back and aggregate them: per-cell statistics over seeds, LR selection, Welch tests.

Statistics follow SPEC §7: each cell (placement, depth, ffn) is reported at its best LR (selected on the
plan's search seeds by the mean final validation loss, a divergence ranking an LR below every LR without
one) and at the plan's shared LR, as mean ± sample std over seeds. Diverged runs are counted, never averaged:
means and tests use the runs that finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from spannorm.config import PLACEMENT_NAMES, ConfigError
from spannorm.experiments.declaration import DeclarationCheck, check_declared_first
from spannorm.experiments.ledger import Ledger, read_curves, read_ledger
from spannorm.experiments.lr_search import SearchState
from spannorm.experiments.plan import Cell, Preregistered, StudyPlan, load_plan, parse_plan_text, rank_key
from spannorm.experiments.plan_checks import read_index
from spannorm.experiments.runner import LAYER_STATS_NAME, RUNS_DIR, ledger_records, load_index
from spannorm.experiments.unigram import UnigramReference, corpus_label
from spannorm.model.placements import BLOCKS
from spannorm.train.config import DataConfig

SPAN_PLACEMENTS = tuple(p for p, cls in BLOCKS.items() if cls.span_variant)
"""The SpanNorm variants (block classes with ``span_variant``): each is tested against the best baseline."""


@dataclass
class RunResult:
    """One run of a sweep: its index record, its loss curves and (when measured) its per-layer stats."""

    record: dict[str, Any]
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    layer_stats: dict[str, Any] | None = None

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def cell(self) -> Cell:
        return Cell(self.record["placement"], int(self.record["depth"]), self.record["ffn"])

    @property
    def diverged(self) -> bool:
        return self.record.get("status") == "diverged"

    @property
    def finished(self) -> bool:
        return self.record.get("status") in ("done", "diverged")


@dataclass
class GroupStats:
    """Statistics of the runs of one cell at one LR."""

    lr: float
    n: int
    """Finished runs (diverged included)."""
    n_diverged: int
    final: list[float]
    """Final validation losses of the runs that did not diverge."""
    best: list[float]
    missing: int = 0
    """Runs the plan asks for at this LR (its seeds) that have not finished yet: while any is missing, the
    group's numbers are partial and no test or choice is made from them."""

    @property
    def complete(self) -> bool:
        """Every run the plan asks for at this LR has finished."""
        return self.missing == 0

    @staticmethod
    def _mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    @staticmethod
    def _std(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) >= 2 else None

    @property
    def final_mean(self) -> float | None:
        return self._mean(self.final)

    @property
    def final_std(self) -> float | None:
        return self._std(self.final)

    @property
    def best_mean(self) -> float | None:
        return self._mean(self.best)

    @property
    def best_std(self) -> float | None:
        return self._std(self.best)

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "n": self.n, "n_diverged": self.n_diverged, "final_val_loss": self.final,
                "best_val_loss": self.best, "final_mean": self.final_mean, "final_std": self.final_std,
                "best_mean": self.best_mean, "best_std": self.best_std, "missing": self.missing}


@dataclass
class Sweep:
    """One sweep directory: its plan and its runs."""

    path: Path
    plan: StudyPlan
    runs: list[RunResult]
    starts: list[dict[str, Any]] = field(default_factory=list)
    """The index's record of each sweep start (see :mod:`~spannorm.experiments.declaration`)."""

    @property
    def data(self) -> DataConfig | None:
        """The data config of the plan's base (None when it does not resolve here)."""
        return self.plan.base_data()

    @property
    def corpus(self) -> str:
        """The corpus the sweep trained on, as a short name."""
        data = self.data
        return "unknown corpus" if data is None else corpus_label(data)

    @property
    def corpus_key(self) -> tuple:
        """What makes two sweeps' data the same: the corpus (path, or the embedded one and its size), the
        tokenizer and the validation split."""
        data = self.data
        if data is None:
            return ("unknown", str(self.path))
        where = (str(Path(data.path).expanduser().resolve()) if data.path is not None
                 else f"embedded:{data.embedded_max_bytes}")
        return where, data.tokenizer, data.val_fraction


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep: a sweep folder (``plan.yaml``, ``index.json`` and each listed run's metrics and layer
    stats, falling back to the folder's ledger for a run whose folder is gone) or a ledger file alone (its
    latest start's plan text and its finished runs; :mod:`~spannorm.experiments.ledger`)."""
    path = Path(path)
    if path.is_file():
        return _load_ledger_sweep(path)
    plan_file, index_file = path / "plan.yaml", path / "index.json"
    if not plan_file.is_file() or not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a sweep directory: it needs plan.yaml and index.json "
                                "(written by `spannorm sweep`), or a ledger file (`spannorm sweep --ledger`)")
    index = read_index(path) or {}
    starts = index.get("starts") or []
    digest = hashlib.sha256(plan_file.read_bytes()).hexdigest()
    written = [s for s in starts if isinstance(s, Mapping) and s.get("plan_sha256") == digest]  # the start that
    # wrote plan.yaml (a start killed between writing it and the index leaves the previous start last)
    plan = load_plan(plan_file, stored_placement_names(written[-1] if written else starts[-1] if starts else None))
    book: Ledger | None = None
    runs = []
    for record in load_index(path).values():
        run_dir = path / RUNS_DIR / record["run_id"]
        val, train = read_curves(run_dir)
        stats_path = run_dir / LAYER_STATS_NAME
        try:
            stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        except (OSError, UnicodeDecodeError, ValueError):
            stats = None  # a damaged layer_stats.json: the run is reported without its per-layer plots
        if not run_dir.is_dir():  # the folder is gone: what the sweep's ledger kept, if it is still there
            book = book if book is not None else _folder_ledger(path, index)
            val, train = book.curves(record["run_id"])
            stats = book.layer_stats(record["run_id"])
        runs.append(RunResult(record, val, train, stats))
    return Sweep(path, plan, runs, starts)


def stored_placement_names(start: Any) -> int:
    """The placement names of a plan text stored at a sweep start (the index's or ledger's last start record):
    version 1 where the record predates the ``placement_names`` key, which every start records since."""
    if start is None:
        return PLACEMENT_NAMES
    return start.get("placement_names", 1) if isinstance(start, Mapping) else 1


def _folder_ledger(folder: Path, index: dict[str, Any]) -> Ledger:
    """The ledger a sweep folder's index names (by its path from the folder, then its absolute path); an
    empty one when neither is a readable ledger, so that its runs are reported as numbers only."""
    for where in (index.get("ledger_from_folder"), index.get("ledger")):
        if not where:
            continue
        candidate = Path(where) if Path(where).is_absolute() else folder / where
        if candidate.is_file():
            try:
                return read_ledger(candidate)
            except ConfigError:
                break
    return Ledger(folder / "ledger.jsonl")


def _load_ledger_sweep(path: Path) -> Sweep:
    book = read_ledger(path)
    if book.plan_text is None:
        raise FileNotFoundError(f"{path} is not a sweep ledger: it records no sweep start with a plan "
                                "(written by `spannorm sweep PLAN --out DIR --ledger FILE`)")
    plan = parse_plan_text(book.plan_text, f"the plan in ledger {str(path)!r}",
                           stored_placement_names(book.starts[-1].get("record")))
    runs = [RunResult(record, *book.curves(run_id), book.layer_stats(run_id))
            for run_id, record in ledger_records(book).items()]
    starts = sorted((s["record"] for s in book.starts), key=lambda r: float(r["time"]))
    return Sweep(path, plan, runs, starts)


class StudyResults:
    """Finished runs of one or more sweeps, grouped by cell and LR."""

    def __init__(self, sweeps: list[Sweep]):
        placed: dict[str, tuple[str, Sweep]] = {}
        for sweep in sweeps:  # one name, one model: a cell must not average two placements
            for variant in sweep.plan.placements:
                seen = placed.setdefault(variant.name, (variant.placement, sweep))
                if seen[0] != variant.placement:
                    raise ConfigError(
                        f"{variant.name!r} runs {seen[0]} in {str(seen[1].path)!r} (plan {seen[1].plan.name!r}) and "
                        f"{variant.placement} in {str(sweep.path)!r} (plan {sweep.plan.name!r}), so one report would "
                        "average two models in one row (placement names 1 and 2 read span differently); allowed: "
                        "sweeps whose variants of one name run one placement (report them apart)")
        self.sweeps = sweeps
        self.plan_of: dict[str, StudyPlan] = {}
        self.runs: dict[str, list[RunResult]] = {}
        order: list[Cell] = []
        for sweep in sweeps:
            for cell in sweep.plan.cells():
                if cell.key not in self.plan_of:
                    self.plan_of[cell.key] = sweep.plan
                    order.append(cell)
            for run in sweep.runs:
                if run.finished:
                    self.runs.setdefault(run.cell.key, []).append(run)
        self.cells = order

    # ------------------------------------------------------------------ axes
    @property
    def placements(self) -> list[str]:
        return list(dict.fromkeys(c.placement for c in self.cells))

    @property
    def depths(self) -> list[int]:
        return sorted({c.depth for c in self.cells})

    @property
    def ffns(self) -> list[str]:
        return list(dict.fromkeys(c.ffn for c in self.cells))

    def cell(self, placement: str, depth: int, ffn: str) -> Cell | None:
        cell = Cell(placement, depth, ffn)
        return cell if cell.key in self.plan_of else None

    def base_placement(self, placement: str) -> str:
        """The model placement behind a variant name (``peri-dt0.1`` -> ``peri``)."""
        for sweep in self.sweeps:
            for variant in sweep.plan.placements:
                if variant.name == placement:
                    return variant.placement
        return placement

    # ------------------------------------------------------------------ groups
    def runs_at(self, cell: Cell, lr: float, seeds: list[int] | None = None) -> list[RunResult]:
        return [r for r in self.runs.get(cell.key, [])
                if math.isclose(float(r.record["lr"]), lr, rel_tol=1e-9)
                and (seeds is None or int(r.record["seed"]) in seeds)]

    @cached_property
    def _planned(self) -> dict[str, list[tuple[float, set[int]]]]:
        """Cell key -> (LR, the seeds its plan asks for at that LR), as the plan expands given the finished
        runs (:meth:`~spannorm.experiments.plan.StudyPlan.expand`: the search, then each best and shared LR)."""
        records = {r.run_id: r.record for runs in self.runs.values() for r in runs}
        planned: dict[str, list[tuple[float, set[int]]]] = {}
        plans = {id(plan): plan for plan in self.plan_of.values()}
        for plan in plans.values():
            for spec in plan.expand(records):
                key = spec.cell.key
                if self.plan_of.get(key) is not plan:
                    continue
                entries = planned.setdefault(key, [])
                entry = next((e for e in entries if math.isclose(e[0], spec.lr, rel_tol=1e-9)), None)
                if entry is None:
                    entries.append((float(spec.lr), {int(spec.seed)}))
                else:
                    entry[1].add(int(spec.seed))
        return planned

    def planned_seeds(self, cell: Cell, lr: float) -> set[int]:
        """The seeds the cell's plan asks for at ``lr``, given the finished runs (empty when none). The shared
        LR of an ``lr_search`` plan with ``shared_runs`` counts every seed even before the cell's search has
        finished (the plan adds those runs once it has), so a search run there is never a whole group."""
        seeds = next((set(seeds) for at, seeds in self._planned.get(cell.key, [])
                      if math.isclose(at, lr, rel_tol=1e-9)), set())
        plan = self.plan_of.get(cell.key)
        if (plan is not None and plan.protocol == "lr_search" and plan.shared_runs
                and math.isclose(plan.reference_lr, lr, rel_tol=1e-9)):
            seeds |= set(plan.seeds)
        return seeds

    def group(self, cell: Cell, lr: float) -> GroupStats:
        runs = self.runs_at(cell, lr)
        ok = [r for r in runs if not r.diverged and r.record.get("final_val_loss") is not None]
        missing = self.planned_seeds(cell, lr) - {int(r.record["seed"]) for r in runs}
        return GroupStats(lr=lr, n=len(runs), n_diverged=sum(r.diverged for r in runs),
                          final=[float(r.record["final_val_loss"]) for r in ok],
                          best=[float(r.record["best_val_loss"]) for r in ok
                                if r.record.get("best_val_loss") is not None],
                          missing=len(missing))

    def lrs(self, cell: Cell) -> list[float]:
        """Every LR of the cell: its grid, the LRs bracketing added, and any other LR it has runs at."""
        lrs = set(self.search_state(cell).lrs) | {float(r.record["lr"]) for r in self.runs.get(cell.key, [])}
        return sorted(lrs)

    def search_state(self, cell: Cell) -> SearchState:
        """Where the cell's LR search stands (its search seeds at its search depth; every seed under the full
        protocol): the LRs searched, bracketing's extensions, the best LR and whether it is at an edge."""
        plan = self.plan_of[cell.key]
        search = plan.search_cell(cell)
        records = {r.run_id: r.record for r in self.runs.get(search.key, [])}
        return plan.search_state(cell, records)

    def best_lr(self, cell: Cell) -> float | None:
        """The cell's best LR from the plan's LR search; None until every run of that search (bracketing's
        extensions included) has finished."""
        return self.search_state(cell).best

    def shared_lr(self, cell: Cell) -> float:
        return self.plan_of[cell.key].reference_lr

    def at(self, cell: Cell, which: str) -> GroupStats | None:
        """The cell's statistics at its ``best`` LR or at the ``shared`` LR."""
        lr = self.best_lr(cell) if which == "best" else self.shared_lr(cell)
        return None if lr is None else self.group(cell, lr)

    # ------------------------------------------------------------------ significance
    def collapsed_above(self, cell: Cell) -> float | None:
        """The loss above which a run of ``cell`` counts as collapsed under its plan's ``collapse_margin``
        (None: the plan has none); see :func:`~spannorm.experiments.lr_search.rank_key`."""
        return self.plan_of[cell.key].collapsed_above()

    def rank(self, cell: Cell, group: GroupStats) -> tuple:
        """How ``group`` (a cell at one LR) ranks against other cells: by :func:`rank_key` under the cell's
        plan's collapse rule (as its LR search ranked its LRs), then, among equals, by the plain rule."""
        records = [{"status": "diverged"}] * group.n_diverged + [{"final_val_loss": v} for v in group.final]
        return rank_key(records, self.collapsed_above(cell)), rank_key(records)

    def best_baseline(self, depth: int, ffn: str, which: str = "best") -> tuple[str, GroupStats] | None:
        """The non-SpanNorm placement with the lowest mean final val loss at ``which`` LR (a divergence, and
        under a plan's ``collapse_margin`` a collapse, ranks below every cell without one; see :meth:`rank`).
        None while any baseline of that depth and FFN has a run the plan asks for at that LR unfinished: a best
        chosen among some baselines only, or from some seeds only, would not be the best baseline."""
        candidates = []
        for placement in self.placements:
            if self.base_placement(placement) in SPAN_PLACEMENTS:
                continue
            cell = self.cell(placement, depth, ffn)
            if cell is None:
                continue
            group = self.at(cell, which)
            if group is None or group.n == 0 or not group.complete:
                return None
            candidates.append((self.rank(cell, group), placement, group))
        if not candidates:
            return None
        _, placement, group = min(candidates, key=lambda c: c[0])
        return placement, group

    def welch(self, placement: str, depth: int, ffn: str, which: str = "best") -> dict[str, Any] | None:
        """Welch's t-test (scipy ``ttest_ind(equal_var=False)``) of ``placement``'s final val losses against
        the best baseline's, at ``which`` LR (None while the best baseline is not known). No test while a run
        the plan asks for on either side is unfinished (``missing``), or either side has fewer than two
        finished runs."""
        base = self.best_baseline(depth, ffn, which)
        return None if base is None else self._welch_against(placement, *base, depth, ffn, which)

    def control_of(self, placement: str) -> str | None:
        """The variant that ``placement`` is tested against as its control: among the plan's variants of the
        same model placement (e.g. ``peri-dt0.1`` beside ``peri``), the one with no overrides of its own, else
        the first listed. None for the control itself, and for a placement with no such sibling."""
        for sweep in self.sweeps:
            siblings = [v for v in sweep.plan.placements
                        if v.placement == self.base_placement(placement)]
            if placement not in [v.name for v in siblings]:
                continue
            plain = [v for v in siblings if not v.overrides and not v.overrides_by_depth]
            control = (plain or siblings)[0].name
            return None if control == placement else control
        return None

    def welch_control(self, placement: str, depth: int, ffn: str, which: str = "best") -> dict[str, Any] | None:
        """Welch's t-test of ``placement`` against its control (:meth:`control_of`), each at ``which`` LR, as
        :meth:`welch` tests against the best baseline; None without a control or a finished search."""
        control = self.control_of(placement)
        if control is None:
            return None
        cell = self.cell(control, depth, ffn)
        group = None if cell is None else self.at(cell, which)
        return None if group is None else self._welch_against(placement, control, group, depth, ffn, which)

    def _welch_against(self, placement: str, base_name: str, base_group: GroupStats, depth: int, ffn: str,
                       which: str) -> dict[str, Any] | None:
        from scipy import stats  # start-up time: scipy.stats takes seconds to import; only the test needs it

        cell = self.cell(placement, depth, ffn)
        group = self.at(cell, which) if cell else None
        if group is None:
            return None
        out: dict[str, Any] = {"placement": placement, "depth": depth, "ffn": ffn, "which": which,
                               "lr": group.lr, "mean": group.final_mean, "n": len(group.final),
                               "n_diverged": group.n_diverged, "baseline": base_name, "baseline_lr": base_group.lr,
                               "baseline_mean": base_group.final_mean, "baseline_n": len(base_group.final),
                               "missing": group.missing + base_group.missing, "t": None, "p": None}
        if group.complete and base_group.complete and len(group.final) >= 2 and len(base_group.final) >= 2:
            result = stats.ttest_ind(group.final, base_group.final, equal_var=False)
            t, p = float(result.statistic), float(result.pvalue)
            out["t"] = t if math.isfinite(t) else None
            out["p"] = p if math.isfinite(p) else None
        return out


    # ------------------------------------------------------------------ corpora and references
    def by_corpus(self) -> list[tuple[str, "StudyResults"]]:
        """The sweeps grouped by the corpus they trained on, each group as its own results (in the order the
        corpora first appear); one group holds every sweep when they share a corpus."""
        groups: dict[tuple, list[Sweep]] = {}
        for sweep in self.sweeps:
            groups.setdefault(sweep.corpus_key, []).append(sweep)
        names = [sweeps[0].corpus for sweeps in groups.values()]
        names = [name if names.count(name) == 1 else f"{name} ({sweeps[0].plan.name})"
                 for name, sweeps in zip(names, groups.values())]
        if len(groups) == 1:
            return [(names[0], self)]
        return [(name, StudyResults(sweeps)) for name, sweeps in zip(names, groups.values())]

    def data_versions(self) -> dict[str | None, int]:
        """The content hashes of the data the finished runs trained on, each with its number of runs (most
        first); None counts the runs that predate data fingerprints."""
        counts: dict[str | None, int] = {}
        for runs in self.runs.values():
            for run in runs:
                key = run.record.get("data_sha256")
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))

    @cached_property
    def unigram(self) -> UnigramReference:
        """The byte-unigram loss of the corpus of these sweeps (the first sweep's data; see
        :mod:`~spannorm.experiments.unigram`), as the plan computed it for its ``collapse_margin``."""
        if not self.sweeps:
            return UnigramReference("unknown corpus", None, "the plan's base config does not resolve here")
        return self.sweeps[0].plan.unigram_reference()

    # ------------------------------------------------------------------ the pre-registered comparison
    def preregistered(self) -> list[tuple[Sweep, Preregistered]]:
        """The pre-registered comparisons of these sweeps' plans, each with the sweep that declared it."""
        return [(s, s.plan.preregistered) for s in self.sweeps if s.plan.preregistered is not None]

    def preregistered_outcome(self, sweep: Sweep, pre: Preregistered) -> dict[str, Any]:
        """The declared comparison's numbers and verdict: ``a`` against ``b`` at the declared depth, FFN and
        LR choice, Welch's t-test (two-sided) on the final val losses of the runs that did not diverge.
        The verdict stays ``undecided`` until every run the plan asks for on each side has finished and each
        side has two runs that did not diverge."""
        # Start-up time: scipy.stats takes seconds to import; only the tests need it.
        from scipy import stats

        check: DeclarationCheck = check_declared_first(sweep.starts, pre.to_dict())
        out: dict[str, Any] = {**pre.to_dict(), "declared_first": check.declared_first, "declaration": check.text,
                               "t": None, "p": None}
        sides = {}
        for side in ("a", "b"):
            cell = self.cell(getattr(pre, side), pre.depth, pre.ffn)
            group = self.at(cell, pre.which) if cell else None
            sides[side] = group
            out[side + "_stats"] = None if group is None else group.to_dict()
        a, b = sides["a"], sides["b"]
        pending = [f"`{getattr(pre, side)}` {group.missing}" for side, group in sides.items()
                   if group is not None and group.missing]
        if pending:
            out["verdict"] = f"undecided (runs the plan asks for are unfinished: {', '.join(pending)})"
            return out
        if a is None or b is None or len(a.final) < 2 or len(b.final) < 2:
            out["verdict"] = "undecided (each side needs two finished runs that did not diverge)"
            return out
        result = stats.ttest_ind(a.final, b.final, equal_var=False)
        t, p = float(result.statistic), float(result.pvalue)
        out["t"], out["p"] = (t, p) if math.isfinite(p) else (None, None)
        delta = statistics.fmean(a.final) - statistics.fmean(b.final)
        out["delta"] = delta
        if out["p"] is None:
            out["verdict"] = "not tested (no spread within either side)"
        elif p < pre.alpha:
            out["verdict"] = f"{pre.a} {'lower' if delta < 0 else 'higher'} than {pre.b} (p < {pre.alpha:g})"
        else:
            out["verdict"] = f"no significant difference at level {pre.alpha:g}"
        return out


def load_results(paths: list[str | Path]) -> StudyResults:
    """Read one or more sweep directories into one :class:`StudyResults`."""
    return StudyResults([load_sweep(p) for p in paths])
