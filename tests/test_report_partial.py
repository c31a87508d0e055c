"""The report of a sweep caught mid-way: a cell whose best LR is known but whose seeds are still running
gives partial numbers, marked as such, and no choice or test is made from them (issue 16's study reports
stage by stage while the sweep runs). Also: runs that collapsed to the unigram loss, and runs that diverged
in the pre-registered comparison, are named where their numbers are used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from scipy import stats

from spannorm.experiments.plan import format_lr
from spannorm.experiments.report import (
    collapse_table,
    loss_table,
    preregistered_section,
    significance_rows,
    significance_table,
)
from spannorm.experiments.results import load_results

PLAN = {"name": "partial",
        "grid": {"placements": ["pre", "peri", "span"], "depths": [4], "lrs": [1e-3, 3e-3, 1e-2],
                 "seeds": [0, 1, 2]},
        "protocol": {"kind": "lr_search", "shared_lr": 3e-3,
                     "preregistered": {"a": "span", "b": "pre", "depth": 4, "hypothesis": "span below pre"}}}

# final val losses by (placement, lr), seed 0 first; every cell's best LR is 3e-3 (interior), which is also
# the shared LR, so its seeds 1 and 2 are the only runs the plan asks for beyond the search
SEARCH = {"pre": {1e-3: 2.0, 3e-3: 1.50, 1e-2: 1.9}, "peri": {1e-3: 2.0, 3e-3: 1.40, 1e-2: 1.9},
          "span": {1e-3: 2.0, 3e-3: 1.30, 1e-2: 1.9}}
MORE_SEEDS = {"pre": [1.52, 1.54], "peri": [1.62, 1.64], "span": [1.31, 1.32]}


def _record(root: Path, placement: str, lr: float, seed: int, loss: float | None) -> dict:
    run_id = f"{placement}-L4-dense-lr{format_lr(lr)}-s{seed}"
    record = {"run_id": run_id, "placement": placement, "depth": 4, "ffn": "dense", "lr": lr, "seed": seed,
              "stage": "search" if seed == 0 else "best"}
    if loss is None:  # still to run: the index lists it as pending, with no summary
        return {**record, "status": "pending"}
    summary = {"final_val_loss": loss, "best_val_loss": loss, "diverged": False, "steps": 10}
    (root / "runs" / run_id).mkdir(parents=True)
    (root / "runs" / run_id / "summary.json").write_text(json.dumps(summary))
    return {**record, **summary, "status": "done"}


def _sweep(root: Path, finished: dict[str, int], plan: dict | None = None, more_seeds: dict | None = None) -> Path:
    """A sweep whose LR searches have all finished; ``finished[placement]`` of the two extra seeds at the best
    LR have finished too, the others are pending."""
    root.mkdir(parents=True)
    (root / "plan.yaml").write_text(yaml.safe_dump(plan or PLAN))
    records = [_record(root, p, lr, 0, loss) for p, losses in SEARCH.items() for lr, loss in losses.items()]
    for placement, losses in (more_seeds or MORE_SEEDS).items():
        for seed, loss in enumerate(losses, 1):
            records.append(_record(root, placement, 3e-3, seed, loss if seed <= finished[placement] else None))
    (root / "index.json").write_text(json.dumps({"plan": PLAN["name"], "runs": records}))
    return root


def test_a_partial_cell_is_marked_and_no_baseline_or_test_comes_from_it(tmp_path):
    # peri has one seed of three (1.40, the lowest mean so far), span two, pre all three
    results = load_results([_sweep(tmp_path / "s", {"pre": 2, "peri": 0, "span": 1})])
    cell = results.cell("peri", 4, "dense")
    assert results.planned_seeds(cell, 3e-3) == {0, 1, 2}
    group = results.at(cell, "best")
    assert group.n == 1 and group.missing == 2 and not group.complete
    assert results.at(results.cell("pre", 4, "dense"), "best").complete
    # peri's one run must not make it the best baseline, and no Welch row may be computed against a guess
    assert results.best_baseline(4, "dense", "best") is None
    assert significance_rows(results, "best") == []
    table = "\n".join(loss_table(results, "dense", "best"))
    assert "| `peri` | 1.400 @3e-3 (2 pending) |" in table
    assert "| `span` | 1.305 ± 0.007 @3e-3 (1 pending) |" in table
    assert "| `pre` | 1.520 ± 0.020 @3e-3 |" in table
    # the pre-registered comparison: span's two runs against pre's three would give p < 0.05 already
    assert stats.ttest_ind([1.30, 1.31], [1.50, 1.52, 1.54], equal_var=False).pvalue < 0.05
    sweep, pre = results.preregistered()[0]
    outcome = results.preregistered_outcome(sweep, pre)
    assert outcome["verdict"] == "undecided (runs the plan asks for are unfinished: `span` 1)"
    assert outcome["p"] is None and "delta" not in outcome
    section = "\n".join(preregistered_section(results))
    assert "| `span` | 3e-3 | 1.305 ± 0.007 | 2 (1 pending) |" in section
    assert "Outcome: **undecided (runs the plan asks for are unfinished: `span` 1)**." in section


def test_a_variant_with_a_run_pending_is_not_tested_against_a_complete_baseline(tmp_path):
    results = load_results([_sweep(tmp_path / "s", {"pre": 2, "peri": 2, "span": 1})])
    assert results.best_baseline(4, "dense", "best")[0] == "pre"  # peri's mean rose to 1.553 with its seeds
    (row,) = significance_rows(results, "best")
    assert row["placement"] == "span" and row["missing"] == 1 and row["p"] is None
    assert "pending (1 run(s) unfinished)" in "\n".join(significance_table([row]))


def test_once_every_run_has_finished_the_tests_are_made(tmp_path):
    results = load_results([_sweep(tmp_path / "s", {"pre": 2, "peri": 2, "span": 2})])
    base, group = results.best_baseline(4, "dense", "best")
    assert base == "pre" and group.complete
    (row,) = significance_rows(results, "best")
    expected = stats.ttest_ind([1.30, 1.31, 1.32], [1.50, 1.52, 1.54], equal_var=False).pvalue
    assert row["missing"] == 0 and row["p"] == pytest.approx(expected)
    assert "better" in "\n".join(significance_table([row]))
    sweep, pre = results.preregistered()[0]
    assert results.preregistered_outcome(sweep, pre)["verdict"] == "span lower than pre (p < 0.05)"
    assert "pending" not in "\n".join(loss_table(results, "dense", "best"))


def test_the_shared_lr_of_a_cell_whose_search_is_unfinished_is_partial(tmp_path):
    root = _sweep(tmp_path / "s", {"pre": 2, "peri": 2, "span": 0})
    index = json.loads((root / "index.json").read_text())
    for record in index["runs"]:
        if record["run_id"] == "span-L4-dense-lr1e-2-s0":  # span's search is still running
            record["status"] = "running"
    (root / "index.json").write_text(json.dumps(index))
    results = load_results([root])
    cell = results.cell("span", 4, "dense")
    assert results.best_lr(cell) is None and results.at(cell, "best") is None
    # its seed-0 search run at the shared LR is one of the three runs the shared LR will hold
    group = results.at(cell, "shared")
    assert group.final == [1.30] and group.missing == 2
    assert "| `span` | 1.300 @3e-3 (2 pending) |" in "\n".join(loss_table(results, "dense", "shared"))


def test_a_run_that_collapsed_to_the_unigram_loss_is_marked_in_its_cell_and_listed(tmp_path):
    corpus = tmp_path / "letters.txt"
    corpus.write_bytes(b"abcdefgh\n" * 400)  # byte-unigram loss ln 9 = 2.197: a run above 2.097 collapsed
    plan = {**PLAN, "base": {"config": {"data": {"path": str(corpus)}}}}
    root = _sweep(tmp_path / "s", {"pre": 2, "peri": 2, "span": 2}, plan,
                  {**MORE_SEEDS, "span": [2.19, 1.32]})  # span's seed 1 ends at byte frequencies
    results = load_results([root])
    table = "\n".join(loss_table(results, "dense", "best"))
    assert "| `span` | 1.603 ± 0.508 @3e-3 (1/3 not learned) |" in table
    assert "| `pre` | 1.520 ± 0.020 @3e-3 |" in table
    listed = "\n".join(collapse_table(results))
    assert "| `span` | 4 | dense | 3e-3 | 1 / 3 | 2.190 |" in listed and "`pre`" not in listed


def test_the_preregistered_outcome_names_the_runs_that_diverged_and_were_left_out(tmp_path):
    root = _sweep(tmp_path / "s", {"pre": 2, "peri": 2, "span": 2}, more_seeds={**MORE_SEEDS, "pre": [1.52, 1.56]})
    index = json.loads((root / "index.json").read_text())
    for record in index["runs"]:
        if record["run_id"] == "pre-L4-dense-lr3e-3-s2":
            record.update(status="diverged", final_val_loss=None, diverged=True)
    (root / "index.json").write_text(json.dumps(index))
    section = "\n".join(preregistered_section(load_results([root])))
    p = stats.ttest_ind([1.30, 1.31, 1.32], [1.50, 1.52], equal_var=False).pvalue
    assert "| `pre` | 3e-3 | 1.510 ± 0.014 | 2 (1 diverged) |" in section
    assert f"p = {p:.3f}. Diverged runs, left out of the test: `pre` 1." in section
