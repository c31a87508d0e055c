"""The study report: markdown tables and PNG plots from one or more finished sweeps.

``build_report(results, out_dir)`` writes into ``out_dir``:

- ``report.md``: the corpus's unigram reference (does the best baseline learn?), the pre-registered
  comparison and its outcome, the headline tables (final and best val loss per placement and depth, dense
  and MoE, mean ± std over seeds, at each cell's best LR and at the shared LR), SpanNorm against the best
  baseline with Welch p-values, the divergence table, the LR searches and their bracketing, and links to
  every plot;
- ``results.csv`` (one row per run) and ``results.json`` (the aggregated tables and tests);

Sweeps on different corpora are reported side by side: a ranking table per depth and FFN with one column
per corpus, then every section above once per corpus (headings and plot names carry the corpus).
- ``val_vs_depth_{ffn}.png``, ``curves_{ffn}_L{depth}.png``, ``layers_{ffn}_L{depth}.png`` and, when the
  placements ``pre``, ``peri`` and a ``peri`` variant with Δt ≠ 1 are present, ``kan_moments.png``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from spannorm.experiments.layer_stats import DUAL_STATS, STREAM_STATS
from spannorm.experiments.lr_search import is_collapsed
from spannorm.experiments.plan import format_lr
from spannorm.experiments.results import SPAN_PLACEMENTS, GroupStats, StudyResults
from spannorm.experiments.unigram import LEARNED_MARGIN, NOT_LEARNED_MARGIN

WHICH = {"best": "each placement's best LR", "shared": "the shared LR"}


# ---------------------------------------------------------------------- formatting
def fmt_loss(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def fmt_cell(group: GroupStats | None, metric: str = "final", with_lr: bool = True) -> str:
    """``2.345 ± 0.012 @1e-2``, with ``(k/n div)`` when runs diverged, ``diverged (n/n)`` when all did, and
    ``(k pending)`` while k runs the plan asks for at that LR are unfinished (the numbers are partial)."""
    if group is None or group.n == 0:
        return "—"
    if not (group.final if metric == "final" else group.best):
        text = f"diverged ({group.n_diverged}/{group.n})"
    else:
        mean = group.final_mean if metric == "final" else group.best_mean
        std = group.final_std if metric == "final" else group.best_std
        text = fmt_loss(mean, std)
        if group.n_diverged:
            text += f" ({group.n_diverged}/{group.n} div)"
    if with_lr:
        text += f" @{format_lr(group.lr)}"
    if group.missing:
        text += f" ({group.missing} pending)"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------------- tables
def not_learned(results: StudyResults, group: GroupStats | None) -> bool:
    """A group whose mean final val loss is within :data:`NOT_LEARNED_MARGIN` of the unigram loss (or above
    it): it has learned byte frequencies and little else."""
    unigram = results.unigram.loss
    return (unigram is not None and group is not None and group.final_mean is not None
            and group.final_mean > unigram - NOT_LEARNED_MARGIN)


def n_collapsed(results: StudyResults, group: GroupStats | None) -> int:
    """Runs of ``group`` that finished (no divergence) within :data:`NOT_LEARNED_MARGIN` of the unigram loss
    (or above it): collapsed to byte frequencies. They count in the mean like any run, so a cell marks them."""
    unigram = results.unigram.loss
    if unigram is None or group is None:
        return 0
    return sum(v > unigram - NOT_LEARNED_MARGIN for v in group.final)


def edge_mark(results: StudyResults, cell) -> str:
    """`` (LR at edge)`` when the plan brackets LRs and the cell's best LR is still at an edge of its search."""
    plan = results.plan_of[cell.key]
    if plan.max_extensions == 0:
        return ""
    state = results.search_state(cell)
    return " (LR at edge)" if state.best is not None and state.edge is not None else ""


def loss_table(results: StudyResults, ffn: str, which: str, metric: str = "final") -> list[str]:
    """Placements × depths: mean ± std of the final (or best) val loss at ``which`` LR; a final loss near the
    unigram loss is marked ``(not learned)``, a best LR still at an edge of its bracketed search ``(LR at
    edge)``."""
    header = ["placement"] + [f"L={d}" for d in results.depths]
    rows = []
    for placement in results.placements:
        row = [f"`{placement}`"]
        for depth in results.depths:
            cell = results.cell(placement, depth, ffn)
            group = results.at(cell, which) if cell else None
            text = fmt_cell(group, metric)
            if metric == "final" and group is not None and group.n and not_learned(results, group):
                text += " (not learned)"
            elif metric == "final" and group is not None and 0 < n_collapsed(results, group) < len(group.final):
                text += f" ({n_collapsed(results, group)}/{len(group.final)} not learned)"
            if which == "best" and cell is not None and group is not None:
                text += edge_mark(results, cell)
            row.append(text)
        rows.append(row)
    return _table(header, rows)


def unigram_section(results: StudyResults) -> list[str]:
    """The corpus's unigram loss and, per depth and FFN, whether the best baseline learned (ended at least
    :data:`LEARNED_MARGIN` nats below it), and which cells did not learn."""
    ref = results.unigram
    if ref.loss is None:
        return [f"Unigram reference for {ref.corpus}: not available ({ref.reason})."] + data_lines(results)
    lines = [f"Corpus: {ref.corpus}. Byte-unigram loss (the entropy of the training split's byte distribution, "
             f"{ref.train_bytes:,} bytes; the loss of predicting byte frequencies only): **{ref.loss:.3f}** nats. "
             f"The study's criterion: at every depth the best baseline ends at least {LEARNED_MARGIN:g} nats "
             f"below it, i.e. at or below {ref.loss - LEARNED_MARGIN:.3f}. A cell whose mean final loss is "
             f"above {ref.loss - NOT_LEARNED_MARGIN:.3f} (within {NOT_LEARNED_MARGIN:g} nats of the unigram loss) "
             "is marked `(not learned)` in the tables.", ""]
    rows = []
    for ffn in results.ffns:
        for depth in results.depths:
            if not any(c.ffn == ffn and c.depth == depth for c in results.cells):
                continue
            base = results.best_baseline(depth, ffn, "best")
            if base is None:
                rows.append([ffn, str(depth), "— (a baseline is unfinished)", "—", "—"])
                continue
            name, group = base
            if group.final_mean is None:
                rows.append([ffn, str(depth), f"`{name}`", "diverged", "no"])
                continue
            gap = ref.loss - group.final_mean
            where = f"{gap:.2f} nats below" if gap >= 0 else f"{-gap:.2f} nats above"
            rows.append([ffn, str(depth), f"`{name}` @{format_lr(group.lr)}", f"{group.final_mean:.3f}",
                         f"{'yes' if gap >= LEARNED_MARGIN else 'no'} ({where})"])
    lines += _table(["ffn", "depth", "best baseline", "final val loss", f"≥ {LEARNED_MARGIN:g} nats below unigram"],
                    rows)
    stuck = []
    for cell in results.cells:
        at_best = results.at(cell, "best")
        if at_best is not None and at_best.n and not_learned(results, at_best):
            stuck.append(f"`{cell.placement}` L={cell.depth} {cell.ffn} ({at_best.final_mean:.3f})")
    lines += ["", "Not learned at the best LR: " + (", ".join(stuck) if stuck else "none") + "."]
    return lines + data_lines(results)


def data_lines(results: StudyResults) -> list[str]:
    """What the finished runs trained on, by the content hash each recorded (a run's data fingerprint), set
    against the corpus read now for the unigram reference: a warning when the runs trained on more than one
    version, or on another one than is read now. Nothing for runs that all predate fingerprints."""
    versions = results.data_versions()
    recorded = {sha: n for sha, n in versions.items() if sha is not None}
    if not recorded:
        return []
    total, now = sum(versions.values()), results.unigram.sha256
    older = versions.get(None, 0)
    parts = [f"`{sha[:16]}` ({n} run{'s' if n != 1 else ''})" for sha, n in recorded.items()]
    text = f"Data: content sha256 {', '.join(parts)}"
    if older:
        text += f"; {older} of {total} runs predate data fingerprints."
    else:
        text += ", the only run." if total == 1 else f", every one of {total} runs."
    if len(recorded) > 1:
        text += (f" **Warning: the runs trained on {len(recorded)} versions of this corpus**, so the tables "
                 "compare runs on different data.")
    mixed = sorted(run.run_id for runs in results.runs.values() for run in runs if run.record.get("data_earlier"))
    if mixed:
        text += (f" **Warning: {len(mixed)} run(s) were resumed on other data than they started on** "
                 f"({', '.join(mixed[:3])}{', ...' if len(mixed) > 3 else ''}); each is counted under its last data.")
    if now is not None and now not in recorded:
        text += f" **Warning: the corpus read now (sha256 `{now[:16]}`) is none of them**, so the unigram loss " \
                "above is not the one of the data the runs trained on."
    elif now is not None:
        text += " The unigram loss above was computed from the same text."
    return ["", text]


def learned_at_no_lr(results: StudyResults, cell, lrs) -> bool:
    """Every finished search run of ``cell`` at ``lrs`` diverged or ended within :data:`NOT_LEARNED_MARGIN` of
    the unigram loss: the search's best LR then ranks losses that differ by noise, and brackets nothing."""
    unigram = results.unigram.loss
    if unigram is None:
        return False
    plan = results.plan_of[cell.key]
    seeds = plan.search_seeds if plan.protocol == "lr_search" else plan.seeds
    runs = [r for lr in lrs for r in results.runs_at(cell, lr, seeds)]
    return bool(runs) and all(r.diverged or r.record.get("final_val_loss") is None
                              or float(r.record["final_val_loss"]) > unigram - NOT_LEARNED_MARGIN for r in runs)


def collapsed_search_runs(results: StudyResults, cell, lrs) -> tuple[int, int]:
    """(search runs of ``cell`` at ``lrs`` that ranked as collapsed under its plan's ``collapse_margin``,
    finished search runs): (0, n) when the plan has none."""
    plan = results.plan_of[cell.key]
    seeds = plan.search_seeds if plan.protocol == "lr_search" else plan.seeds
    runs = [r for lr in lrs for r in results.runs_at(cell, lr, seeds)]
    above = results.collapsed_above(cell)
    return sum(is_collapsed(r.record, above) for r in runs), len(runs)


def bracketing_section(results: StudyResults) -> list[str]:
    """How each searched cell's best LR was bracketed: the LRs searched, the extensions, the cells whose
    best LR is still at an edge of what was searched, and the cells where no LR learned (nothing bracketed).
    Under a plan's ``collapse_margin``, the search runs that ranked as collapsed are named per cell."""
    searched = [c for c in results.cells if results.plan_of[c.key].search_cell(c) == c]
    states = {c.key: results.search_state(c) for c in searched}
    margins = {c.key: results.plan_of[c.key].collapse_margin for c in searched}
    collapsed = {c.key: collapsed_search_runs(results, c, states[c.key].lrs) for c in searched}
    done = [c for c in searched if states[c.key].best is not None]
    failed = [c for c in done if learned_at_no_lr(results, c, states[c.key].lrs)]
    interior = [c for c in done if states[c.key].edge is None and c not in failed]
    extended = [c for c in searched if states[c.key].extensions]
    caps = sorted({results.plan_of[c.key].max_extensions for c in searched})
    lines = [f"Searched cells: {len(searched)}; finished: {len(done)}; best LR inside the searched LRs: "
             f"{len(interior)}; no LR learned: {len(failed)}; extended beyond the grid: {len(extended)} (cap: "
             f"{', '.join(str(c) for c in caps) or '—'} extension(s) per cell; 0 = no bracketing).", ""]
    rule = any(m is not None for m in margins.values())
    if rule:
        applied = [c for c in searched if collapsed[c.key][0]]
        given = sorted({f"{m:g}" for m in margins.values() if m is not None})
        unigram = "" if results.unigram.loss is None else f" ({results.unigram.loss:.3f})"
        lines += [f"Collapse rule (protocol.collapse_margin {', '.join(given)}): a search run that ended within "
                  f"that many nats of the unigram loss{unigram} ranked like a diverged run, so "
                  "a grid where no LR learned ties and extends downward. It applied in "
                  f"{len(applied)} cell(s) (column 'ranked as collapsed').", ""]
    rows = []
    for cell in searched:
        state = states[cell.key]
        if (state.best is not None and state.edge is None and not state.extensions and cell not in failed
                and not collapsed[cell.key][0]):
            continue
        lrs = ", ".join(format_lr(lr) for lr in sorted(state.lrs))
        if state.best is None:
            status = "search unfinished"
        elif cell in failed:
            status = (f"**no LR learned** (every search run diverged, or ended above the unigram loss less "
                      f"{NOT_LEARNED_MARGIN:g} nats: no LR learned more than byte frequencies)")
        elif state.edge is None:
            status = "bracketed"
        else:
            plan = results.plan_of[cell.key]
            why = "cap reached" if plan.max_extensions else "no bracketing"
            status = f"**at the {state.edge} edge** ({why})"
        row = [f"`{cell.placement}`", str(cell.depth), cell.ffn, lrs, str(state.extensions),
               "—" if state.best is None else format_lr(state.best), status]
        if rule:
            n, total = collapsed[cell.key]
            row.insert(-1, "— (rule off)" if margins[cell.key] is None else f"{n}/{total}")
        rows.append(row)
    if rows:
        lines += ["Cells extended, unfinished, still at an edge or where the collapse rule applied:" if rule
                  else "Cells extended, unfinished or still at an edge:", ""]
        header = ["placement", "depth", "ffn", "LRs searched", "extensions", "best", "status"]
        if rule:
            header.insert(-1, "ranked as collapsed")
        lines += _table(header, rows)
    else:
        lines += ["Every searched cell's best LR is inside its grid."]
    return lines


def preregistered_section(results: StudyResults) -> list[str]:
    """Each pre-registered comparison: its declaration, the proof that it came before the runs, its outcome."""
    lines: list[str] = []
    for sweep, pre in results.preregistered():
        out = results.preregistered_outcome(sweep, pre)
        lines += [f"Declared in plan `{sweep.plan.name}`: `{pre.a}` against `{pre.b}`, L={pre.depth}, {pre.ffn}, "
                  f"at {WHICH[pre.which]}, {pre.test} (two-sided, α = {pre.alpha:g})."
                  + (f" Hypothesis: {pre.hypothesis.rstrip('.')}." if pre.hypothesis else ""), "",
                  f"Fixed before the runs? {'yes' if out['declared_first'] else 'NO'}: {out['declaration']}.", ""]
        rows = []
        for side in ("a", "b"):
            group = out[side + "_stats"]
            name = getattr(pre, side)
            if group is None:
                rows.append([f"`{name}`", "—", "—", "0"])
                continue
            rows.append([f"`{name}`", format_lr(group["lr"]), fmt_loss(group["final_mean"], group["final_std"]),
                         f"{len(group['final_val_loss'])}" + (f" ({group['n_diverged']} diverged)"
                                                               if group["n_diverged"] else "")
                         + (f" ({group['missing']} pending)" if group.get("missing") else "")])
        lines += _table(["placement", "LR", "final val loss", "runs"], rows) + [""]
        delta = out.get("delta")
        diverged = [f"`{getattr(pre, side)}` {out[side + '_stats']['n_diverged']}" for side in ("a", "b")
                    if out[side + "_stats"] is not None and out[side + "_stats"]["n_diverged"]]
        lines += [f"Outcome: **{out['verdict']}**"
                  + ("" if delta is None else f"; Δ = {delta:+.3f} nats, t = "
                     f"{'n/a' if out['t'] is None else format(out['t'], '.3f')}, p = {fmt_p(out['p'])}") + "."
                  + (f" Diverged runs, left out of the test: {', '.join(diverged)}." if diverged else ""), ""]
    return lines


def ranking_side_by_side(corpora: list[tuple[str, StudyResults]]) -> list[str]:
    """Per depth and FFN, each placement's mean final val loss at its best LR and its rank, one column per
    corpus (a divergence ranks last, and so does a collapse under a plan's ``collapse_margin``), so that a
    ranking that holds on one corpus only shows as such."""
    lines: list[str] = []
    ffns = list(dict.fromkeys(f for _, r in corpora for f in r.ffns))
    depths = sorted({d for _, r in corpora for d in r.depths})
    placements = list(dict.fromkeys(p for _, r in corpora for p in r.placements))
    for ffn in ffns:
        for depth in depths:
            ranks: dict[str, dict[str, str]] = {}
            for name, res in corpora:
                keyed = []
                for placement in placements:
                    cell = res.cell(placement, depth, ffn)
                    group = res.at(cell, "best") if cell else None
                    if cell is None or group is None or group.n == 0:
                        continue
                    keyed.append((res.rank(cell, group), placement, group))
                keyed.sort(key=lambda k: k[0])
                for rank, (_, placement, group) in enumerate(keyed, 1):
                    ranks.setdefault(placement, {})[name] = f"{rank}. {fmt_cell(group, with_lr=True)}"
            if not ranks:
                continue
            lines += [f"### {ffn}, L={depth}", ""]
            rows = [[f"`{p}`"] + [ranks[p].get(name, "—") for name, _ in corpora] for p in placements if p in ranks]
            lines += _table(["placement"] + [f"{name}: rank. final val loss" for name, _ in corpora], rows) + [""]
    return lines


def significance_rows(results: StudyResults, which: str) -> list[dict[str, Any]]:
    rows = []
    for ffn in results.ffns:
        for depth in results.depths:
            for placement in results.placements:
                if results.base_placement(placement) not in SPAN_PLACEMENTS:
                    continue
                test = results.welch(placement, depth, ffn, which)
                if test is not None:
                    rows.append(test)
    return rows


def control_rows(results: StudyResults, which: str) -> list[dict[str, Any]]:
    """Welch's tests of every variant against its control (:meth:`StudyResults.control_of`)."""
    rows = []
    for ffn in results.ffns:
        for depth in results.depths:
            for placement in results.placements:
                test = results.welch_control(placement, depth, ffn, which)
                if test is not None:
                    rows.append(test)
    return rows


def significance_table(rows: list[dict[str, Any]], against: str = "best baseline",
                       subject: str = "SpanNorm variant") -> list[str]:
    header = ["ffn", "depth", subject, "val loss", against, f"{against} val loss", "Δ", "Welch p", "verdict"]
    out = []
    for r in rows:
        delta = None if r["mean"] is None or r["baseline_mean"] is None else r["mean"] - r["baseline_mean"]
        if r.get("missing"):
            verdict = f"pending ({r['missing']} run(s) unfinished)"
        elif delta is None:
            verdict = "n/a"
        elif min(r.get("n", 2), r.get("baseline_n", 2)) < 2:
            verdict = "not tested (fewer than 2 runs on a side)"
        elif r["p"] is None or (isinstance(r["p"], float) and math.isnan(r["p"])):
            verdict = "not tested (no spread within either side)"
        elif r["p"] < 0.05:
            verdict = "better" if delta < 0 else "worse"
        else:
            verdict = "no significant difference"
        out.append([r["ffn"], str(r["depth"]), f"`{r['placement']}` @{format_lr(r['lr'])}",
                    fmt_loss(r["mean"], None) + (f" ({r['n_diverged']} div)" if r["n_diverged"] else ""),
                    f"`{r['baseline']}` @{format_lr(r['baseline_lr'])}", fmt_loss(r["baseline_mean"], None),
                    "n/a" if delta is None else f"{delta:+.3f}", fmt_p(r["p"]), verdict])
    return _table(header, out)


def divergence_table(results: StudyResults) -> list[str]:
    """Per cell: diverged runs out of finished runs at each LR (only cells with a divergence)."""
    header = ["placement", "depth", "ffn", "LR", "diverged / runs", "diverged at step"]
    rows = []
    for cell in results.cells:
        for lr in results.lrs(cell):
            runs = results.runs_at(cell, lr)
            bad = [r for r in runs if r.diverged]
            if bad:
                steps = ", ".join(str(r.record.get("diverged_step")) for r in bad)
                rows.append([f"`{cell.placement}`", str(cell.depth), cell.ffn, format_lr(lr),
                             f"{len(bad)} / {len(runs)}", steps])
    if not rows:
        return ["No run diverged."]
    return _table(header, rows)


def collapse_table(results: StudyResults) -> list[str]:
    """Per cell and LR: runs that finished without diverging but within :data:`NOT_LEARNED_MARGIN` of the
    unigram loss (only cells with such a run). Like a divergence, a collapse is a failure of training; unlike
    one, its loss is finite and counts in the cell's mean, so it is listed here to be seen."""
    unigram = results.unigram.loss
    if unigram is None:
        return []
    header = ["placement", "depth", "ffn", "LR", "at the unigram loss / finished runs", "final val loss"]
    rows = []
    for cell in results.cells:
        for lr in results.lrs(cell):
            runs = [r for r in results.runs_at(cell, lr) if not r.diverged
                    and r.record.get("final_val_loss") is not None]
            bad = [r for r in runs if float(r.record["final_val_loss"]) > unigram - NOT_LEARNED_MARGIN]
            if bad:
                rows.append([f"`{cell.placement}`", str(cell.depth), cell.ffn, format_lr(lr),
                             f"{len(bad)} / {len(runs)}",
                             ", ".join(f"{float(r.record['final_val_loss']):.3f}" for r in bad)])
    intro = (f"Runs that did not diverge but ended above the unigram loss ({unigram:.3f}) less "
             f"{NOT_LEARNED_MARGIN:g} nats: they learned byte frequencies at most (a collapse near the unigram "
             "loss, or too little training above it). They count in the means above.")
    if not rows:
        return [intro.split(":")[0] + ": none."]
    return [intro, ""] + _table(header, rows)


def compute_table(results: StudyResults) -> list[str]:
    """What the study cost: per depth and FFN, the finished runs, their summed training wall time and the
    median per run. A run's time is its trainer's own (``wall_s``, summed over any resumes); it leaves out the
    sweep's start-up and measurement, and it depends on how many runs shared the machine."""
    groups: dict[tuple[int, str], list[float]] = {}
    missing = 0
    for runs in results.runs.values():
        for run in runs:
            wall = run.record.get("wall_s")
            if wall is None:
                missing += 1
                continue
            groups.setdefault((run.cell.depth, run.cell.ffn), []).append(float(wall))
    if not groups:
        return ["No run recorded its wall time."]
    header = ["depth", "ffn", "runs", "run-hours (sum)", "median per run (s)"]
    rows = [[str(depth), ffn, str(len(walls)), f"{sum(walls) / 3600:.2f}", f"{statistics.median(walls):.0f}"]
            for (depth, ffn), walls in sorted(groups.items())]
    every = [w for walls in groups.values() for w in walls]
    rows.append(["all", "", str(len(every)), f"{sum(every) / 3600:.2f}", f"{statistics.median(every):.0f}"])
    note = [f"{missing} finished run(s) recorded no wall time and are left out.", ""] if missing else []
    return note + _table(header, rows)


def lr_table(results: StudyResults, ffn: str) -> list[str]:
    """The mean final val loss of every LR on the search seeds at each searched cell: how best LRs were picked."""
    header = ["placement", "depth"] + [f"lr {format_lr(lr)}" for lr in _all_lrs(results)] + ["best"]
    rows = []
    for placement in results.placements:
        for depth in results.depths:
            cell = results.cell(placement, depth, ffn)
            if cell is None or results.plan_of[cell.key].search_cell(cell) != cell:
                continue
            plan = results.plan_of[cell.key]
            seeds = plan.search_seeds if plan.protocol == "lr_search" else plan.seeds
            row = [f"`{placement}`", str(depth)]
            for lr in _all_lrs(results):
                runs = results.runs_at(cell, lr, seeds)
                if not runs:
                    row.append("—")
                elif any(r.diverged for r in runs):
                    row.append(f"div ({sum(r.diverged for r in runs)}/{len(runs)})")
                else:
                    row.append(f"{sum(float(r.record['final_val_loss']) for r in runs) / len(runs):.3f}")
            best = results.best_lr(cell)
            row.append("—" if best is None else format_lr(best))
            rows.append(row)
    return _table(header, rows)


def _all_lrs(results: StudyResults) -> list[float]:
    return sorted({lr for cell in results.cells for lr in results.lrs(cell)})


# ---------------------------------------------------------------------- plots
def _pyplot():
    # The Agg backend must be chosen before pyplot is imported.
    # Start-up time: matplotlib takes about a second to import, and only the plots need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time, as above

    return plt


def _colors(names: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    if len(names) <= 10:
        cmap = plt.get_cmap("tab10")
        return {name: cmap(i) for i, name in enumerate(names)}
    cmap = plt.get_cmap("tab20")  # the ten strong colors first, then their light partners
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {name: cmap(order[i % 20]) for i, name in enumerate(names)}


def plot_val_vs_depth(results: StudyResults, ffn: str, path: Path) -> bool:
    """Val loss against depth per placement (final and best, at the best and the shared LR); False (nothing
    written) while no run of this FFN kind has finished."""
    if not any(r.cell.ffn == ffn for runs in results.runs.values() for r in runs):
        return False
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter  # start-up time: see _pyplot

    colors = _colors(results.placements)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, which in enumerate(("best", "shared")):
        for row, metric in enumerate(("final", "best")):
            ax = axes[row][col]
            for placement in results.placements:
                xs, ys, es, div = [], [], [], []
                for depth in results.depths:
                    cell = results.cell(placement, depth, ffn)
                    group = results.at(cell, which) if cell else None
                    if group is None or group.n == 0:
                        continue
                    values = group.final if metric == "final" else group.best
                    if values:
                        mean = sum(values) / len(values)
                        std = group.final_std if metric == "final" else group.best_std
                        xs.append(depth)
                        ys.append(mean)
                        es.append(std or 0.0)
                    if group.n_diverged:
                        div.append(depth)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=placement, color=colors[placement])
                for depth in div:
                    ax.axvline(depth, color=colors[placement], alpha=0.15, lw=4)
            ax.set_xscale("log")
            ax.set_xticks(results.depths, [str(d) for d in results.depths])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{metric} val loss at {WHICH[which]} ({ffn})", fontsize=10)
            ax.set_ylabel(f"{metric} val loss")
            ax.grid(alpha=0.3)
    axes[1][0].set_xlabel("depth (blocks)")
    axes[1][1].set_xlabel("depth (blocks)")
    if axes[0][1].get_legend_handles_labels()[0]:
        axes[0][1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    steps = sorted(s for s, v in by_step.items() if len(v) == len(curves))
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def plot_curves(results: StudyResults, ffn: str, depth: int, path: Path) -> bool:
    """Train loss (mean over seeds, at each placement's best LR) and val loss points; False (nothing written)
    when no run there carries a curve."""
    if not any(r.val_curve or r.train_curve for runs in results.runs.values() for r in runs
               if r.cell.depth == depth and r.cell.ffn == ffn):
        return False
    plt = _pyplot()
    colors = _colors(results.placements)
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for placement in results.placements:
        cell = results.cell(placement, depth, ffn)
        lr = results.best_lr(cell) if cell else None
        if cell is None or lr is None:
            continue
        runs = [r for r in results.runs_at(cell, lr) if not r.diverged]
        if not runs:
            continue
        steps, values = _mean_curve([r.train_curve for r in runs])
        if steps:
            ax_train.plot(steps, values, label=f"{placement} @{format_lr(lr)}", color=colors[placement], lw=1.2)
        steps, values = _mean_curve([r.val_curve for r in runs])
        if steps:
            ax_val.plot(steps, values, marker="o", label=f"{placement} @{format_lr(lr)}", color=colors[placement])
    for ax, name in ((ax_train, "train loss"), (ax_val, "val loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{name}, L={depth}, {ffn}, mean over seeds at the best LR", fontsize=10)
        ax.grid(alpha=0.3)
    if ax_val.get_legend_handles_labels()[0]:
        ax_val.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def mean_layer_stats(results: StudyResults, placement: str, depth: int, ffn: str) -> dict[str, list[float]] | None:
    """Per-layer stats averaged over the seeds of the cell's best LR (runs without stats are left out)."""
    cell = results.cell(placement, depth, ffn)
    lr = results.best_lr(cell) if cell else None
    if cell is None or lr is None:
        return None
    stats = [r.layer_stats for r in results.runs_at(cell, lr) if r.layer_stats and not r.diverged]
    if not stats:
        return None
    out = {}
    for key in (*STREAM_STATS, *DUAL_STATS, "param_grad_norm"):
        columns = [s[key] for s in stats if key in s]
        if columns and all(len(c) == len(columns[0]) for c in columns):
            out[key] = [sum(v) / len(v) for v in zip(*columns)]
    out["n_runs"] = [float(len(stats))]
    out["lr"] = [lr]
    return out


def plot_layers(results: StudyResults, ffn: str, depth: int, path: Path) -> bool:
    """Per-layer RMS of the stream and the activation-gradient norm after training, per placement."""
    plt = _pyplot()
    colors = _colors(results.placements)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    drew = False
    for placement in results.placements:
        stats = mean_layer_stats(results, placement, depth, ffn)
        if not stats or "rms" not in stats:
            continue
        drew = True
        layers = list(range(len(stats["rms"])))
        axes[0].plot(layers, stats["rms"], label=placement, color=colors[placement])
        axes[1].plot(layers, stats["grad_norm"], label=placement, color=colors[placement])
        if "param_grad_norm" in stats:
            axes[2].plot(range(len(stats["param_grad_norm"])), stats["param_grad_norm"], label=placement,
                         color=colors[placement])
    for ax, title in zip(axes, ("RMS of x_l (x_0 = embedding)", "‖∂loss/∂x_l‖", "‖∂loss/∂θ‖ per block")):
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(f"{title}, L={depth}, {ffn}", fontsize=10)
        ax.grid(alpha=0.3)
    if drew:
        axes[0].legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drew


KAN_EXTRA = ("span", "span_post", "residual")
"""Placements shown beside Peri-LN in Kan et al.'s picture when present (issue 16, item 4)."""


def kan_placements(results: StudyResults) -> list[str]:
    """``pre``, ``peri`` and every ``peri`` variant (e.g. ``peri-dt0.1``) present in the results, then the
    variants of :data:`KAN_EXTRA` (``span`` and its forms, ``span_post``, ``residual``)."""
    names: list[str] = [p for p in ("pre", "peri") if p in results.placements]
    names += [p for p in results.placements if p not in ("pre", "peri") and results.base_placement(p) == "peri"]
    names += [p for p in results.placements if p not in names and results.base_placement(p) in KAN_EXTRA]
    return names


def plot_kan(results: StudyResults, path: Path) -> tuple[int, list[str]] | None:
    """Kan et al.'s picture: mean |x_l|, entry-wise variance and max |x_l| per layer after training, for pre,
    peri and peri with a small Δt (and span, span_post, residual when present), dense, at the deepest depth
    where pre, peri and its variants all have stats; the others are drawn where they have stats there.
    ResiDual's x_l is its Post-LN stream; its dual stream d_l, where recorded, is drawn dashed beside it."""
    names = kan_placements(results)
    core = [p for p in names if p == "pre" or results.base_placement(p) == "peri"]
    if len(core) < 2 or "dense" not in results.ffns:
        return None
    depth = None
    for d in sorted(results.depths, reverse=True):
        if all(mean_layer_stats(results, p, d, "dense") for p in core):
            depth = d
            break
    if depth is None:
        return None
    names = [p for p in names if mean_layer_stats(results, p, depth, "dense")]
    plt = _pyplot()
    colors = _colors(names)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for placement in names:
        stats = mean_layer_stats(results, placement, depth, "dense")
        assert stats is not None
        layers = list(range(len(stats["mean_abs"])))
        dual = "dual_mean_abs" in stats
        label = f"{placement} @{format_lr(stats['lr'][0])}" + (": x_l" if dual else "")
        for ax, key in zip(axes, ("mean_abs", "variance", "max_abs")):
            ax.plot(layers, stats[key], marker=".", label=label, color=colors[placement])
            if dual:
                ax.plot(layers, stats[f"dual_{key}"], marker=".", linestyle="--", color=colors[placement],
                        label=f"{placement} @{format_lr(stats['lr'][0])}: dual stream d_l")
    for ax, title in zip(axes, ("mean |x_l|", "entry-wise variance of x_l", "max |x_l|")):
        ax.set_yscale("log")
        ax.set_xlabel("layer l (0 = embedding)")
        ax.set_title(f"{title} after training, L={depth}, dense", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return depth, names


def kan_table(results: StudyResults, depth: int, names: list[str]) -> list[str]:
    header = ["placement", "LR", "mean abs x_0", "mean abs x_L", "ratio", "Var(x_L)/Var(x_0)",
              "max abs x (all layers)", "runs"]
    rows = []
    for placement in names:
        s = mean_layer_stats(results, placement, depth, "dense")
        if not s:
            continue
        for name, prefix in ((f"`{placement}`", ""), (f"`{placement}` dual stream d_l", "dual_")):
            if f"{prefix}mean_abs" not in s:
                continue
            mean_abs, variance = s[f"{prefix}mean_abs"], s[f"{prefix}variance"]
            rows.append([name, format_lr(s["lr"][0]), f"{mean_abs[0]:.3g}", f"{mean_abs[-1]:.3g}",
                         f"{mean_abs[-1] / mean_abs[0]:.3g}", f"{variance[-1] / variance[0]:.3g}",
                         f"{max(s[f'{prefix}max_abs']):.3g}", f"{int(s['n_runs'][0])}"])
    return _table(header, rows)


# ---------------------------------------------------------------------- files
CSV_FIELDS = ("run_id", "corpus", "placement", "depth", "ffn", "lr", "seed", "stage", "status", "final_val_loss",
              "best_val_loss", "diverged_step", "steps", "tokens", "wall_s", "tokens_per_s")


def write_csv(corpora: list[tuple[str, StudyResults]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for name, results in corpora:
            for cell in results.cells:
                for run in sorted(results.runs.get(cell.key, []), key=lambda r: (r.record["lr"], r.record["seed"])):
                    writer.writerow({**{k: run.record.get(k) for k in CSV_FIELDS}, "corpus": name})


def corpus_json(results: StudyResults) -> dict[str, Any]:
    cells = []
    for cell in results.cells:
        state = results.search_state(cell)
        entry: dict[str, Any] = {"placement": cell.placement, "depth": cell.depth, "ffn": cell.ffn,
                                 "best_lr": state.best, "shared_lr": results.shared_lr(cell),
                                 "lrs_searched": sorted(state.lrs), "extensions": state.extensions,
                                 "best_lr_edge": state.edge}
        plan = results.plan_of[cell.key]
        if plan.collapse_margin is not None:  # the search runs its collapse rule ranked like diverged runs
            entry["collapse_margin"] = plan.collapse_margin
            entry["search_runs_collapsed"] = collapsed_search_runs(results, plan.search_cell(cell), state.lrs)[0]
        for which in WHICH:
            group = results.at(cell, which)
            entry[which] = None if group is None else group.to_dict()
            entry[f"{which}_not_learned"] = not_learned(results, group) if group is not None and group.n else None
        cells.append(entry)
    ref = results.unigram
    return {"cells": cells, "welch": {w: significance_rows(results, w) for w in WHICH},
            "welch_control": {w: control_rows(results, w) for w in WHICH},
            "unigram": {"corpus": ref.corpus, "loss": ref.loss, "reason": ref.reason, "train_bytes": ref.train_bytes,
                        "sha256": ref.sha256, "learned_margin": LEARNED_MARGIN,
                        "not_learned_margin": NOT_LEARNED_MARGIN},
            "data_sha256": {sha or "not recorded": n for sha, n in results.data_versions().items()},
            "preregistered": [results.preregistered_outcome(s, p) for s, p in results.preregistered()]}


def results_json(corpora: list[tuple[str, StudyResults]]) -> dict[str, Any]:
    """The aggregated tables and tests: the first corpus's at the top level (as a one-corpus report has
    them), and every corpus's under ``corpora``."""
    by_name = {name: corpus_json(res) for name, res in corpora}
    return {**by_name[corpora[0][0]], "corpora": by_name}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "corpus"


def corpus_body(results: StudyResults, out: Path, tag: str = "", suffix: str = "") -> list[str]:
    """Every per-corpus section of the report; ``tag`` ends each heading and ``suffix`` each plot name when
    several corpora share one report."""
    lines = [f"## Unigram reference{tag}", ""] + unigram_section(results) + [""]
    if results.preregistered():
        lines += [f"## Pre-registered comparison{tag}", ""] + preregistered_section(results)
    for ffn in results.ffns:
        for which in WHICH:
            lines += [f"## Final val loss, {ffn}, at {WHICH[which]}{tag}", ""]
            lines += loss_table(results, ffn, which, "final") + [""]
        lines += [f"## Best val loss (lowest evaluation of the run), {ffn}, at each placement's best LR{tag}", ""]
        lines += loss_table(results, ffn, "best", "best") + [""]
    for which in WHICH:
        lines += [f"## SpanNorm against the best baseline at {WHICH[which]} (Welch's t-test, final val loss){tag}",
                  "", "The best baseline is the non-SpanNorm placement with the lowest mean at that depth and FFN; "
                  "a depth where a run of some baseline at that LR is unfinished is left out, and a variant with a run "
                  "unfinished is `pending`, not tested. `verdict` reads p < 0.05 (two-sided).", ""]
        lines += significance_table(significance_rows(results, which)) + [""]
    controls = control_rows(results, "best")
    if controls:
        lines += [f"## Variants against their control at each placement's best LR (Welch's t-test, final val "
                  f"loss){tag}", "", "A variant is tested against the plan's variant of the same model placement "
                  "that has no overrides of its own (else the first listed): `peri-dt0.1` against `peri`, say. "
                  "`verdict` reads p < 0.05 (two-sided).", ""]
        lines += significance_table(controls, against="control", subject="variant") + [""]
    lines += [f"## Divergences{tag}", ""] + divergence_table(results) + [""]
    collapsed = collapse_table(results)
    if collapsed:
        lines += collapsed + [""]
    for ffn in results.ffns:
        lines += [f"## LR search ({ffn}): mean final val loss on the search seeds{tag}", ""]
        lines += lr_table(results, ffn) + [""]
    lines += [f"## LR bracketing{tag}", ""] + bracketing_section(results) + [""]
    lines += [f"## Compute{tag}", "", "Training wall time as each run's trainer recorded it (summed over resumes; "
              "start-up and measurement left out). It depends on the machine and on how many runs shared it.",
              ""] + compute_table(results) + [""]
    lines += [f"## Plots{tag}", ""]
    for ffn in results.ffns:
        name = f"val_vs_depth_{ffn}{suffix}.png"
        if plot_val_vs_depth(results, ffn, out / name):
            lines += [f"![val loss vs depth, {ffn}]({name})", ""]
        for depth in results.depths:
            name = f"curves_{ffn}_L{depth}{suffix}.png"
            if plot_curves(results, ffn, depth, out / name):
                lines += [f"![loss curves, {ffn}, L={depth}]({name})", ""]
    lines += [f"## Per-layer moments and gradients after training{tag}", "",
              "Measured on the run's final checkpoint with one forward and backward pass on a fixed "
              "validation batch (the first evenly spaced validation windows), mean over the seeds of the best LR.",
              ""]
    for ffn in results.ffns:
        for depth in results.depths:
            name = f"layers_{ffn}_L{depth}{suffix}.png"
            if plot_layers(results, ffn, depth, out / name):
                lines += [f"![per-layer stats, {ffn}, L={depth}]({name})", ""]
    name = f"kan_moments{suffix}.png"
    kan = plot_kan(results, out / name)
    if kan is not None:
        depth, names = kan
        lines += [f"## Kan et al.'s picture: hidden-state moments per layer after training{tag}", "",
                  f"![Kan et al. moments]({name})", "",
                  f"L={depth}, dense; `runs`: the runs at the best LR whose stats the row averages.", ""]
        lines += kan_table(results, depth, names) + [""]
    return lines


def build_report(results: StudyResults, out_dir: str | Path, title: str = "Study report") -> Path:
    """Write ``report.md``, ``results.csv``, ``results.json`` and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_runs = sum(len(v) for v in results.runs.values())
    n_div = sum(r.diverged for v in results.runs.values() for r in v)
    lines = [f"# {title}", "",
             f"Finished runs: {n_runs} ({n_div} diverged), from "
             + ", ".join(f"`{s.path}` (plan `{s.plan.name}`, {s.plan.protocol} protocol)" for s in results.sweeps)
             + ".", ""]
    old_names = [s.plan.name for s in results.sweeps if s.plan.placement_names == 1]
    if old_names:
        names = list(dict.fromkeys(old_names))
        which = (f"plan `{names[0]}` is" if len(names) == 1
                 else f"plans {', '.join(f'`{n}`' for n in names)} are")
        lines += [f"Placement names: {which} written in the names of before placement names 2. The rows keep "
                  "those names: a plan's `span` is today's `span_post`, and its `span_clean` (with any variant "
                  "of it) today's `span`.", ""]
    bare = sum(not (r.val_curve or r.train_curve) for v in results.runs.values() for r in v)
    if bare:
        lines += [f"Of these, {bare} carry their final numbers only: no loss curves or per-layer stats were found "
                  "for them (no run folder, and a ledger that kept numbers only or could not be read; a ledger "
                  "line's summary may say where its numbers came from). The plots leave them out.", ""]
    lines += ["Cells are mean ± sample std over seeds of the validation loss, `@LR` the learning rate; "
             "`(k/n div)` counts diverged runs, which are left out of the mean and of the tests, never "
             "averaged in. The best LR of a cell is chosen on the plan's search seeds by mean final val "
             "loss, with any divergence ranking an LR last.", ""]
    corpora = results.by_corpus()
    if len(corpora) == 1:
        lines += corpus_body(results, out)
    else:
        lines += ["## Ranking per corpus, side by side (final val loss at each placement's best LR)", "",
                  "Corpora: " + ", ".join(f"{name} ({', '.join(f'`{s.plan.name}`' for s in res.sweeps)})"
                                          for name, res in corpora) + ".", ""]
        lines += ranking_side_by_side(corpora)
        for name, res in corpora:
            lines += [f"# Corpus: {name}", ""] + corpus_body(res, out, f" — {name}", f"_{_slug(name)}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_csv(corpora, out / "results.csv")
    (out / "results.json").write_text(json.dumps(results_json(corpora), indent=2))
    return out / "report.md"


__all__ = ["bracketing_section", "build_report", "collapse_table", "compute_table", "control_rows", "corpus_body",
           "data_lines", "divergence_table", "fmt_cell", "loss_table", "mean_layer_stats", "plot_kan",
           "preregistered_section", "ranking_side_by_side", "results_json", "significance_rows", "significance_table",
           "unigram_section", "write_csv"]
