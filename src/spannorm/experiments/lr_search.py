"""Choosing a cell's learning rate: ranking LRs by their runs, and bracketing the optimum.

A cell's LR search runs a grid of LRs on the search seeds; the best LR is the one whose runs rank best by
:func:`rank_key` (a divergence ranks an LR below every LR without one; ties go to the smaller LR). A best LR
at an edge of its grid is not known to be an optimum: the loss may still fall beyond that edge. With
bracketing on (a plan's ``protocol.bracket``), :func:`bracket_search` then adds one LR beyond that edge,
waits for its runs, and repeats until the best LR is interior or ``max_extensions`` LRs have been added.

The step beyond an edge continues the grid's own geometric pattern (:func:`extend_lr`): a grid that
alternates x3 and x3.33 (1e-3, 3e-3, 1e-2, 3e-2) continues to 1e-1 and 3e-1 above, 3e-4 and 1e-4 below;
a uniform grid continues with its ratio; a plan may set the factor instead.

A grid where no LR learned brackets nothing: its losses sit at the corpus's byte-unigram loss and differ by
noise. With a plan's ``protocol.collapse_margin``, a run that ended within that margin of the unigram loss
ranks like a diverged run (:func:`rank_key`'s ``collapsed_above``), so such a grid ties, the tie goes to the
smallest LR, and bracketing extends the search downward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

FINISHED = ("done", "diverged")
"""Run statuses that end a run for good (``failed`` runs are retried by the next sweep)."""
EDGES = ("low", "high")


def is_collapsed(record: Mapping[str, Any], collapsed_above: float | None) -> bool:
    """A run that did not diverge but ended with a final val loss above ``collapsed_above`` (the unigram loss
    less a plan's ``protocol.collapse_margin``): it learned byte frequencies only. Never, when None."""
    if collapsed_above is None or record.get("status") == "diverged" or record.get("diverged"):
        return False
    loss = record.get("final_val_loss")
    return loss is not None and math.isfinite(float(loss)) and float(loss) > collapsed_above


def rank_key(records: Iterable[Mapping[str, Any]], collapsed_above: float | None = None) -> tuple[int, float]:
    """How good an LR is from its runs: (number of diverged runs, mean final val loss of the others).
    Lower is better, so a divergence ranks an LR below every LR without one: diverged counts as worst.
    With ``collapsed_above`` (see :func:`is_collapsed`), a run that collapsed to the unigram loss counts as
    diverged too, so a grid where no LR learned ties, and the tie goes to the smaller LR."""
    records = list(records)
    failed = [r.get("status") == "diverged" or bool(r.get("diverged")) or is_collapsed(r, collapsed_above)
              for r in records]
    losses = [float(r["final_val_loss"]) for r, bad in zip(records, failed)
              if not bad and r.get("final_val_loss") is not None and math.isfinite(float(r["final_val_loss"]))]
    mean = sum(losses) / len(losses) if losses else math.inf
    return sum(failed), mean


def select_best_lr(runs_by_lr: Mapping[float, Iterable[Mapping[str, Any]]],
                   collapsed_above: float | None = None) -> float:
    """The LR whose runs rank best by :func:`rank_key`; ties go to the smaller LR."""
    return min(runs_by_lr, key=lambda lr: (*rank_key(runs_by_lr[lr], collapsed_above), lr))


def extend_lr(lrs: Sequence[float], edge: str, factor: float | None = None) -> float:
    """The LR one step beyond ``edge`` (``low`` or ``high``) of ``lrs`` (two or more LRs), rounded to six
    significant digits. The step is ``factor`` when given; else the ratio two places in from that edge
    (so a grid alternating two ratios keeps alternating), or the only ratio of a two-LR grid."""
    ordered = sorted(lrs)
    if len(ordered) < 2:
        raise ValueError("extending an LR grid needs at least two learning rates")
    if edge not in EDGES:
        raise ValueError(f"edge={edge!r} is invalid; allowed: {', '.join(EDGES)}")
    if factor is None:
        if edge == "high":
            factor = ordered[-2] / ordered[-3] if len(ordered) >= 3 else ordered[-1] / ordered[-2]
        else:
            factor = ordered[2] / ordered[1] if len(ordered) >= 3 else ordered[1] / ordered[0]
    value = ordered[-1] * factor if edge == "high" else ordered[0] / factor
    return float(f"{value:.6g}")


@dataclass(frozen=True)
class SearchState:
    """Where a cell's LR search stands, given the runs finished so far."""

    lrs: tuple[float, ...]
    """Every LR the search asks for so far: the grid in its order, then each extension."""
    best: float | None
    """The best LR, or None while a run of the search is unfinished (or an extension is due)."""
    extensions: int
    """LRs added beyond the grid's edges."""
    edge: str | None
    """``low`` or ``high`` when the best LR is at that edge of ``lrs`` (bracketing capped or off), else None."""

    @property
    def complete(self) -> bool:
        return self.best is not None


def bracket_search(grid: Sequence[float], records_at: Callable[[float], list[Mapping[str, Any] | None]],
                   max_extensions: int = 0, factor: float | None = None,
                   collapsed_above: float | None = None) -> SearchState:
    """The search over ``grid`` extended as the finished runs ask: ``records_at(lr)`` gives the records of
    that LR's search runs (None for a run without a record). A best LR at an edge of a grid of two or more
    LRs adds :func:`extend_lr` beyond that edge, at most ``max_extensions`` times in all. LRs rank by
    :func:`rank_key` with ``collapsed_above``."""
    lrs = list(grid)
    extensions = 0
    while True:
        found = {lr: records_at(lr) for lr in lrs}
        runs = {lr: [r for r in records if r is not None and r.get("status") in FINISHED]
                for lr, records in found.items()}
        if any(len(runs[lr]) < len(found[lr]) for lr in lrs):
            return SearchState(tuple(lrs), None, extensions, None)
        best = select_best_lr(runs, collapsed_above)
        ordered = sorted(lrs)
        edge = None if len(ordered) < 2 else "low" if best == ordered[0] else "high" if best == ordered[-1] else None
        if edge is None or extensions >= max_extensions:
            return SearchState(tuple(lrs), best, extensions, edge)
        lrs.append(extend_lr(lrs, edge, factor))
        extensions += 1


__all__ = ["EDGES", "FINISHED", "SearchState", "bracket_search", "extend_lr", "is_collapsed", "rank_key",
           "select_best_lr"]
