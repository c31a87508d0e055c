"""The study machinery of issue 16: LR bracketing, per-variant LR grids, depth-dependent overrides, the
pre-registered comparison and its declaration record, the unigram reference, and corpora side by side."""

from __future__ import annotations

import json
import math
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from scipy import stats

from helpers import refused_sweep_line
from spannorm.config import PLACEMENTS, ConfigError
from spannorm.experiments import plan as plan_module
from spannorm.experiments.declaration import check_declared_first, declaration_digest, start_record
from spannorm.experiments.lr_search import bracket_search, extend_lr
from spannorm.experiments.plan import format_lr, parse_plan
from spannorm.experiments.report import build_report, unigram_section
from spannorm.experiments.results import load_results
from spannorm.experiments.runner import load_index, run_sweep
from spannorm.experiments.unigram import byte_unigram_loss, unigram_reference
from spannorm.train.config import DataConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STUDIES = Path(__file__).resolve().parents[1] / "studies"


def _done(loss: float) -> dict:
    return {"status": "done", "final_val_loss": loss}


def _diverged() -> dict:
    return {"status": "diverged", "final_val_loss": None}


# ---------------------------------------------------------------------- the step beyond an edge
def test_extension_continues_the_grids_own_pattern_or_a_given_factor():
    grid = [1e-3, 3e-3, 1e-2, 3e-2]
    assert extend_lr(grid, "high") == 0.1  # the grid alternates x3 and x3.33: 3e-2 -> 1e-1
    assert extend_lr(grid + [0.1], "high") == 0.3  # -> 3e-1
    assert extend_lr(grid, "low") == 3e-4
    assert extend_lr([3e-4] + grid, "low") == 1e-4
    assert extend_lr([1e-3, 1e-2], "high") == 0.1 and extend_lr([1e-3, 1e-2], "low") == 1e-4
    assert extend_lr([0.01, 0.02, 0.04], "high") == 0.08  # a uniform grid keeps its ratio
    assert extend_lr(grid, "high", factor=math.sqrt(10)) == pytest.approx(3e-2 * math.sqrt(10), rel=1e-5)
    with pytest.raises(ValueError):
        extend_lr([1e-3], "high")


# ---------------------------------------------------------------------- bracketing on fake results
def _search(grid, losses: dict, cap: int):
    """bracket_search over records made from ``losses`` (lr -> loss, None = diverged; a missing LR has not run)."""
    def records_at(lr):
        if lr not in losses:
            return [None]
        return [_diverged() if losses[lr] is None else _done(losses[lr])]
    return bracket_search(grid, records_at, cap)


def test_best_at_an_edge_asks_for_one_more_lr_beyond_it():
    grid = [1e-3, 3e-3, 1e-2, 3e-2]
    state = _search(grid, {1e-3: 2.5, 3e-3: 2.3, 1e-2: 2.2, 3e-2: 2.1}, cap=2)
    assert state.lrs == (1e-3, 3e-3, 1e-2, 3e-2, 0.1) and state.best is None and state.extensions == 1
    # the extension ran and is worse: the optimum (3e-2) is now interior
    state = _search(grid, {1e-3: 2.5, 3e-3: 2.3, 1e-2: 2.2, 3e-2: 2.1, 0.1: 2.4}, cap=2)
    assert state.best == 3e-2 and state.edge is None and state.extensions == 1
    # at the low edge: 3e-4 below
    state = _search(grid, {1e-3: 2.0, 3e-3: 2.3, 1e-2: 2.4, 3e-2: 2.5}, cap=2)
    assert state.lrs[-1] == 3e-4 and state.best is None


def test_interior_best_needs_no_extension():
    state = _search([1e-3, 3e-3, 1e-2, 3e-2], {1e-3: 2.5, 3e-3: 2.1, 1e-2: 2.2, 3e-2: None}, cap=2)
    assert state.best == 3e-3 and state.edge is None and state.extensions == 0 and len(state.lrs) == 4


def test_diverged_ranks_last_so_an_all_but_one_diverged_grid_is_bracketed_from_below():
    # the lowest LR is the only one that trains: an edge, so the search goes lower
    state = _search([1e-3, 3e-3, 1e-2], {1e-3: 3.0, 3e-3: None, 1e-2: None}, cap=2)
    assert state.lrs[-1] == pytest.approx(1e-3 / 3.33333, rel=1e-4) and state.best is None


def test_the_cap_stops_extending_and_the_edge_is_reported():
    grid = [1e-3, 3e-3, 1e-2, 3e-2]
    losses = {1e-3: 2.5, 3e-3: 2.3, 1e-2: 2.2, 3e-2: 2.1, 0.1: 2.0, 0.3: 1.9}
    state = _search(grid, losses, cap=2)
    assert state.lrs[-2:] == (0.1, 0.3) and state.best == 0.3 and state.edge == "high" and state.extensions == 2
    state = _search(grid, losses, cap=0)  # no bracketing: the edge is still reported
    assert state.best == 3e-2 and state.edge == "high" and state.extensions == 0


def _bracket_plan(**protocol) -> dict:
    return {"grid": {"placements": ["pre", {"name": "post-low", "placement": "post", "lrs": [1e-4, 1e-3]}],
                     "depths": [2, 4], "ffn": {"dense": []}, "lrs": [1e-3, 3e-3, 1e-2], "seeds": [0, 1, 2]},
            "protocol": {"kind": "lr_search", "shared_lr": 3e-3, "bracket": {"max_extensions": 1}, **protocol}}


def test_plan_extends_each_cell_at_every_depth_and_a_resumed_sweep_recomputes_it():
    plan = parse_plan(_bracket_plan())
    first = {s.run_id for s in plan.expand({})}
    # the search runs at every depth (search_depths defaults to all), each variant on its own grid
    assert first == {f"pre-L{d}-dense-lr{lr}-s0" for d in (2, 4) for lr in ("1e-3", "3e-3", "1e-2")} | \
        {f"post-low-L{d}-dense-lr{lr}-s0" for d in (2, 4) for lr in ("1e-4", "1e-3")}
    results = {i: _done(2.0) for i in first}
    results["pre-L2-dense-lr1e-2-s0"] = _done(1.5)  # pre at depth 2: best at the high edge
    results["pre-L4-dense-lr3e-3-s0"] = _done(1.5)  # pre at depth 4: interior
    results["post-low-L2-dense-lr1e-4-s0"] = _done(1.5)  # low edge of its own grid
    specs = {s.run_id: s for s in plan.expand(results)}
    assert specs["pre-L2-dense-lr3e-2-s0"].stage == "search"  # 1e-2 x (1e-2 / 3e-3) rounded
    assert "optim.lr=0.03" in specs["pre-L2-dense-lr3e-2-s0"].overrides
    assert "post-low-L2-dense-lr1e-5-s0" in specs
    assert "pre-L2-dense-lr1e-2-s1" not in specs  # no best-LR seeds while the search is extended
    assert {f"pre-L4-dense-lr3e-3-s{s}" for s in (1, 2)} <= set(specs)  # interior: seeds at once
    # the extension ran (and won: the cap of 1 stops there, at the edge): a new sweep works it all out again
    results["pre-L2-dense-lr3e-2-s0"] = _done(1.4)
    results["post-low-L2-dense-lr1e-5-s0"] = _done(1.6)
    specs = {s.run_id: s for s in plan.expand(results)}
    assert plan.search_state(plan.cells()[0], results).edge == "high"
    assert specs["pre-L2-dense-lr3e-2-s1"].stage == "best" and specs["pre-L2-dense-lr3e-3-s2"].stage == "shared"
    assert specs["post-low-L2-dense-lr1e-4-s1"].stage == "best"  # 1e-5 lost: 1e-4 is interior now
    assert "pre-L2-dense-lr1e-1-s0" not in specs


def test_depth_first_order_ranks_runs_by_depth_then_ffn():
    plan = parse_plan({**_bracket_plan(order="depth"),
                       "grid": {**_bracket_plan()["grid"], "ffn": {"dense": [], "moe": ["model.moe.n_experts=4"]}}})
    specs = plan.expand({})
    ranks = {(s.cell.depth, s.cell.ffn): plan.start_rank(s) for s in specs}
    assert ranks == {(2, "dense"): (0, 0), (2, "moe"): (0, 1), (4, "dense"): (1, 0), (4, "moe"): (1, 1)}
    assert parse_plan(_bracket_plan()).start_rank(specs[0]) == ()


# ---------------------------------------------------------------------- depth-dependent overrides
def _depth_plan(by_depth) -> dict:
    return {"grid": {"placements": ["pre", {"name": "peri-dtL", "placement": "peri",
                                            "overrides_by_depth": by_depth}],
                     "depths": [12, 48], "lrs": [1e-3]}}


def test_overrides_by_depth_apply_at_their_depth_only():
    plan = parse_plan(_depth_plan({12: ["model.delta_t=0.204124"], 48: ["model.delta_t=0.102062"]}))
    specs = {s.run_id: s for s in plan.expand()}
    assert "model.delta_t=0.204124" in specs["peri-dtL-L12-dense-lr1e-3-s0"].overrides
    assert "model.delta_t=0.102062" in specs["peri-dtL-L48-dense-lr1e-3-s0"].overrides
    assert not any("delta_t" in o for o in specs["pre-L48-dense-lr1e-3-s0"].overrides)
    spec = specs["peri-dtL-L48-dense-lr1e-3-s0"]
    assert spec.overrides.index("model.delta_t=0.102062") < spec.overrides.index("optim.lr=0.001")


@pytest.mark.parametrize("by_depth, message", [
    ({12: ["model.delta_t=0.2"]}, r"overrides_by_depth lacks depth 48; allowed: one list of overrides for each"),
    ({12: ["model.delta_t=0.2"], 48: ["model.delta_t=0.1"], 24: ["model.delta_t=0.14"]},
     "names depth 24, not in grid.depths"),
    ({12: ["delta_t"], 48: []}, r"overrides_by_depth\[12\]"),
    ({12: ["model.n_layers=6"], 48: []}, "which the grid decides"),
    ({"twelve": [], 48: []}, "must be an integer"),
    ([1, 2], "must be a mapping"),
])
def test_bad_depth_overrides_fail_with_one_line_naming_the_field(by_depth, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_plan(_depth_plan(by_depth))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("protocol, message", [
    ({"preregistered": {"a": "span_clean", "b": "pre", "depth": 4}}, "preregistered.a='span_clean' is invalid"),
    ({"preregistered": {"a": "span", "b": "pre", "depth": 8}}, "preregistered.depth=8 is invalid"),
    ({"preregistered": {"a": "span", "b": "pre", "depth": 4, "ffn": "moe"}}, "preregistered.ffn='moe'"),
    ({"preregistered": {"a": "span", "b": "span", "depth": 4}}, "must differ from a"),
    ({"preregistered": {"a": "span", "b": "pre", "depth": 4, "test": "mannwhitney"}}, "allowed: welch"),
    ({"bracket": {"max_extensions": -1}}, "max_extensions=-1 is invalid"),
    ({"bracket": {"factor": 1.0}}, "factor=1.0 is invalid"),
    ({"order": "random"}, "protocol.order"),
])
def test_bad_protocol_entries_name_the_field(protocol, message):
    data = {"grid": {"placements": ["pre", "span"], "depths": [2, 4], "lrs": [1e-3, 1e-2]}, "protocol": protocol}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_plan(data)


def test_bracketing_a_one_lr_grid_is_refused():
    with pytest.raises(ConfigError, match="bracket needs an LR grid of two or more LRs"):
        parse_plan({"grid": {"placements": ["pre", {"name": "x", "placement": "post", "lrs": [1e-3]}],
                             "depths": [2], "lrs": [1e-3, 1e-2]}, "protocol": {"bracket": {}}})


@pytest.mark.slow
def test_sweep_cli_refuses_bad_depth_overrides_in_one_line_and_writes_nothing(tmp_path):
    line = refused_sweep_line(tmp_path, _depth_plan({12: ["model.delta_t=0.2"]}))
    assert "overrides_by_depth lacks depth 48" in line


# ---------------------------------------------------------------------- the declaration record
def test_a_declaration_counts_as_first_only_when_the_first_start_found_no_run():
    pre = {"a": "span", "b": "pre", "depth": 4}
    first = start_record(pre, "plan text", None, finished_before=0)
    assert first["preregistered_sha256"] == declaration_digest(pre) and len(first["plan_sha256"]) == 64
    later = start_record(pre, "plan text, more seeds", None, finished_before=12)
    assert check_declared_first([first, later], pre).declared_first
    assert not check_declared_first([later], pre).declared_first  # runs existed before the first record
    assert not check_declared_first([], pre).declared_first
    changed = start_record({**pre, "depth": 2}, "plan text", None, finished_before=12)
    check = check_declared_first([first, changed], pre)
    assert not check.declared_first and "another declaration" in check.text


def test_start_record_names_the_plan_files_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "plan.yaml").write_text("name: x\n")
    subprocess.run(git + ["add", "plan.yaml"], check=True)
    subprocess.run(git + ["commit", "-qm", "plan"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = start_record(None, "name: x\n", repo / "plan.yaml", 0)
    assert record["commit"] == head and record["committed"] is True
    (repo / "plan.yaml").write_text("name: y\n")
    assert start_record(None, "name: y\n", repo / "plan.yaml", 0)["committed"] is False
    assert start_record(None, "x", tmp_path / "elsewhere.yaml", 0)["commit"] is None


# ---------------------------------------------------------------------- the unigram reference
def test_byte_unigram_loss_is_the_entropy_of_the_byte_frequencies():
    assert byte_unigram_loss(b"abab") == pytest.approx(math.log(2))
    assert byte_unigram_loss(bytes(range(256)) * 3) == pytest.approx(math.log(256))
    assert byte_unigram_loss(b"aaaa") == 0.0
    text = b"aaab"
    assert byte_unigram_loss(text) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_unigram_reference_reads_the_training_split_only(tmp_path):
    path = tmp_path / "text.txt"
    train, val = b"ab\n" * 30, b"zzzzzzzzz\n"  # the last 10 % (from a line start) is validation
    path.write_bytes(train + val)
    ref = unigram_reference(DataConfig(path=str(path), val_fraction=0.1))
    assert ref.train_bytes == len(train) and ref.loss == pytest.approx(math.log(3))
    assert ref.corpus == "text.txt"
    assert unigram_reference(DataConfig(path=str(path), tokenizer="bpe")).loss is None
    assert "cannot be read" in unigram_reference(DataConfig(path=str(tmp_path / "missing.txt"))).reason


# ---------------------------------------------------------------------- the report
def _write_sweep(root: Path, plan: dict, losses: dict, starts: list | None = None) -> None:
    """A sweep folder with finished runs: ``losses`` maps (placement, depth, lr) to per-seed final losses."""
    root.mkdir(parents=True)
    (root / "plan.yaml").write_text(yaml.safe_dump(plan))
    records = []
    for (placement, depth, lr), values in losses.items():
        for seed, loss in enumerate(values):
            run_id = f"{placement}-L{depth}-dense-lr{format_lr(lr)}-s{seed}"
            (root / "runs" / run_id).mkdir(parents=True)
            summary = {"final_val_loss": loss, "best_val_loss": loss, "diverged": False, "steps": 10}
            (root / "runs" / run_id / "summary.json").write_text(json.dumps(summary))
            records.append({"run_id": run_id, "placement": placement, "depth": depth, "ffn": "dense", "lr": lr,
                            "seed": seed, "stage": "search" if seed == 0 else "best", **summary, "status": "done"})
    (root / "index.json").write_text(json.dumps({"plan": plan["name"], "starts": starts or [], "runs": records}))


PRE = {"a": "span", "b": "pre", "depth": 4, "hypothesis": "span ends below pre"}


def _study(corpus: Path, name: str, shift: float) -> tuple[dict, dict]:
    plan = {"name": name, "base": {"config": {"data": {"path": str(corpus)}}},
            "grid": {"placements": ["pre", "post", "span"], "depths": [4], "lrs": [1e-3, 3e-3, 1e-2],
                     "seeds": [0, 1, 2]},
            "protocol": {"kind": "lr_search", "shared_lr": 3e-3, "bracket": {"max_extensions": 1},
                         "preregistered": PRE}}
    losses = {("pre", 4, 1e-3): [2.0], ("pre", 4, 3e-3): [1.4 + shift, 1.5 + shift, 1.6 + shift],
              ("pre", 4, 1e-2): [1.9],
              ("span", 4, 1e-3): [2.0], ("span", 4, 3e-3): [1.8], ("span", 4, 1e-2): [1.5],
              ("span", 4, 3e-2): [1.2, 1.25, 1.3],  # the extension won: still at the edge, cap reached
              ("post", 4, 1e-3): [2.3], ("post", 4, 3e-3): [2.15, 2.16, 2.17], ("post", 4, 1e-2): [2.4]}
    return plan, losses


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("study")
    corpus_a, corpus_b = tmp / "letters.txt", tmp / "digits.txt"
    corpus_a.write_bytes(b"abcdefgh\n" * 400)  # entropy ln 9 = 2.197: post's 2.16 has not learned
    corpus_b.write_bytes(b"0123456789012345678\n" * 100)
    plan_a, losses_a = _study(corpus_a, "letters", 0.0)
    pre = PRE | {"ffn": "dense", "which": "best", "test": "welch", "alpha": 0.05}
    first = {**start_record(pre, "text", None, 0), "time": 1.0}
    _write_sweep(tmp / "a", plan_a, losses_a, [first, start_record(pre, "text", None, 5)])
    plan_b, losses_b = _study(corpus_b, "digits", -0.5)
    _write_sweep(tmp / "b", plan_b, losses_b)
    out = tmp / "report"
    build_report(load_results([tmp / "a", tmp / "b"]), out, title="Two corpora")
    return tmp, out, out / "report.md"


def _section(markdown: str, title: str) -> str:
    start = markdown.index(title)
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end != -1 else None]


def test_report_states_the_unigram_loss_and_flags_cells_that_did_not_learn(two_corpora):
    _, out, report = two_corpora
    md = report.read_text()
    section = _section(md, "## Unigram reference — letters.txt")
    assert f"**{math.log(9):.3f}** nats" in section  # the training split of abcdefgh\n repeated
    # pre is the best baseline: 2.197 - 1.5 = 0.70 < 1.2, so the criterion fails
    assert "| dense | 4 | `pre` @3e-3 | 1.500 | no (0.70 nats below) |" in section
    assert "Not learned at the best LR: `post` L=4 dense (2.160)." in section
    table = _section(md, "## Final val loss, dense, at each placement's best LR — letters.txt")
    assert "| `post` | 2.160 ± 0.010 @3e-3 (not learned) |" in table
    assert "| `pre` | 1.500 ± 0.100 @3e-3 |" in table
    data = json.loads((out / "results.json").read_text())
    assert data["corpora"]["letters.txt"]["unigram"]["loss"] == pytest.approx(math.log(9))
    assert data["corpora"]["letters.txt"]["cells"][1]["best_not_learned"] is True


def test_report_marks_a_best_lr_still_at_an_edge_after_the_cap(two_corpora):
    md = two_corpora[2].read_text()
    table = _section(md, "## Final val loss, dense, at each placement's best LR — letters.txt")
    assert "| `span` | 1.250 ± 0.050 @3e-2 (LR at edge) |" in table
    bracket = _section(md, "## LR bracketing — letters.txt")
    assert "| `span` | 4 | dense | 1e-3, 3e-3, 1e-2, 3e-2 | 1 | 3e-2 | **at the high edge** (cap reached) |" in bracket
    assert "| `pre` |" not in bracket  # interior at once: not listed
    # post's search runs all ended within 0.1 nats of the unigram loss (2.197): its "best" 3e-3 brackets nothing
    assert ("| `post` | 4 | dense | 1e-3, 3e-3, 1e-2 | 0 | 3e-3 | **no LR learned** (every search run diverged, "
            "or ended above the unigram loss less 0.1 nats: no LR learned more than byte frequencies) |") in bracket
    assert ("best LR inside the searched LRs: 1; no LR learned: 1; extended beyond the grid: 1 (cap: 1 "
            "extension(s)") in bracket


def test_preregistered_comparison_is_reported_with_its_outcome_and_declaration(two_corpora):
    md = two_corpora[2].read_text()
    section = _section(md, "## Pre-registered comparison — letters.txt")
    assert "Declared in plan `letters`: `span` against `pre`, L=4, dense" in section
    assert "Hypothesis: span ends below pre" in section
    assert "Fixed before the runs? yes: declared before any run" in section
    p = stats.ttest_ind([1.2, 1.25, 1.3], [1.4, 1.5, 1.6], equal_var=False).pvalue
    assert p < 0.05
    assert "| `span` | 3e-2 | 1.250 ± 0.050 | 3 |" in section and "| `pre` | 3e-3 | 1.500 ± 0.100 | 3 |" in section
    assert "Outcome: **span lower than pre (p < 0.05)**; Δ = -0.250 nats" in section and f"p = {p:.3f}." in section
    other = _section(md, "## Pre-registered comparison — digits.txt")
    assert "Fixed before the runs? NO: not shown: the sweep index records no sweep start" in other


def test_two_corpora_are_ranked_side_by_side(two_corpora):
    _, out, report = two_corpora
    md = report.read_text()
    section = _section(md, "## Ranking per corpus, side by side")
    assert "| placement | letters.txt: rank. final val loss | digits.txt: rank. final val loss |" in section
    # letters: span 1.25 < pre 1.50; digits: pre 1.00 < span 1.25; post last in both
    assert "| `pre` | 2. 1.500 ± 0.100 @3e-3 | 1. 1.000 ± 0.100 @3e-3 |" in section
    assert "| `span` | 1. 1.250 ± 0.050 @3e-2 | 2. 1.250 ± 0.050 @3e-2 |" in section
    assert "| `post` | 3. 2.160 ± 0.010 @3e-3 | 3. 2.160 ± 0.010 @3e-3 |" in section
    assert "# Corpus: letters.txt" in md and "# Corpus: digits.txt" in md
    for name in ("letters_txt", "digits_txt"):
        assert (out / f"val_vs_depth_dense_{name}.png").is_file()
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("run_id,corpus,") and sum(",digits.txt," in r for r in rows) == 16


# ---------------------------------------------------------------------- a micro sweep with bracketing
@pytest.mark.slow
def test_micro_sweep_brackets_records_its_start_and_resumes(tmp_path):
    plan_data = {
        "name": "micro-bracket",
        "base": {"config": {"model": {"d_model": 16, "n_heads": 2, "context_length": 16},
                            "data": {"embedded_max_bytes": 60000, "cache_dir": str(tmp_path / "cache")},
                            "optim": {"warmup_steps": 1},
                            "train": {"steps": 3, "batch_size": 2, "eval_every": 3, "eval_batches": 1,
                                      "tensorboard": False, "progress": "none", "checkpoint_every": 0,
                                      "device": "cpu"}}},
        # at 3 steps the larger LR learns more: the best is at the high edge, so bracketing adds 9e-4
        "grid": {"placements": ["pre"], "depths": [1], "lrs": [1e-4, 3e-4], "seeds": [0]},
        "protocol": {"kind": "lr_search", "bracket": {"max_extensions": 1},
                     "preregistered": {"a": "pre", "b": "pre2", "depth": 1}},
        "measure": {"layer_stats": False}}
    plan_data["grid"]["placements"].append({"name": "pre2", "placement": "pre", "lrs": [1e-4, 3e-4]})
    plan = parse_plan(plan_data)
    out = tmp_path / "sweep"
    outcome = run_sweep(plan, out, workers=0, log=lambda _: None, plan_text=yaml.safe_dump(plan_data))
    assert not outcome.failed
    index = load_index(out)
    assert {"pre-L1-dense-lr9e-4-s0", "pre2-L1-dense-lr9e-4-s0"} <= set(index)
    starts = json.loads((out / "index.json").read_text())["starts"]
    assert len(starts) == 1 and starts[0]["finished_before"] == 0
    again = run_sweep(plan, out, workers=0, log=lambda _: None, plan_text=yaml.safe_dump(plan_data))
    assert again.executed == [] and set(again.skipped) == set(index)  # the extension is worked out again
    starts = json.loads((out / "index.json").read_text())["starts"]
    assert [s["finished_before"] for s in starts] == [0, len(index)]
    results = load_results([out])
    pair = results.preregistered()[0]
    assert results.preregistered_outcome(*pair)["declared_first"] is True
    # a lost index loses the record: the runs on disk count, so the declaration is no longer shown to be first
    (out / "index.json").unlink()
    run_sweep(plan, out, workers=0, log=lambda _: None, plan_text=yaml.safe_dump(plan_data))
    starts = json.loads((out / "index.json").read_text())["starts"]
    assert [s["finished_before"] for s in starts] == [len(index)]
    results = load_results([out])
    assert results.preregistered_outcome(*results.preregistered()[0])["declared_first"] is False


# ---------------------------------------------------------------------- the study plans
def _parsable(data: dict) -> dict:
    """The plan with placements this branch may not have yet (span_clean, residual) run as ``pre`` for
    parsing (their names kept), so that everything else in the plan is validated."""
    data = json.loads(json.dumps(data))
    entries = []
    for item in data["grid"]["placements"]:
        entry = {"name": item, "placement": item} if isinstance(item, str) else item
        if entry["placement"] not in PLACEMENTS:
            entry["placement"] = "pre"
        entries.append(entry)
    data["grid"]["placements"] = entries
    return data


STUDY16_PLANS = sorted(p for p in STUDIES.glob("study16_*.yaml") if p.name != "study16_head_ablation.yaml")


def test_the_head_ablation_is_the_pilot_with_the_tied_head_of_before():
    """Issue 16 item 0: the pilot's placements and LRs at the study's depth-12 settings, the head tied."""
    data = yaml.safe_load((STUDIES / "study16_head_ablation.yaml").read_text())
    study = yaml.safe_load((STUDIES / "study16_shakespeare.yaml").read_text())
    plan = parse_plan(_parsable(data))
    assert data["base"]["config"]["model"].pop("tie_embeddings") is True
    assert data["base"]["config"] == study["base"]["config"]
    assert {v.name for v in plan.placements} == {"pre", "peri", "span", "span_clean"}
    assert plan.depths == [12] and sorted(plan.lrs) == [3e-3, 1e-2] and plan.seeds == [0]


@pytest.mark.parametrize("path", STUDY16_PLANS, ids=lambda p: p.name)
def test_study16_plans_are_valid_and_match_the_issue(path):
    data = yaml.safe_load(path.read_text())
    plan = parse_plan(_parsable(data))
    names = {v.name for v in plan.placements}
    assert {"pre", "post", "peri", "deepnorm", "mixln", "lns", "hybrid", "span", "span_b2t", "span_clean",
            "residual"} <= names
    assert plan.protocol == "lr_search" and plan.search_depths is None and plan.max_extensions >= 1
    assert sorted(plan.lrs) == [1e-3, 3e-3, 1e-2, 3e-2] and plan.seeds == [0, 1, 2]
    scaled = next(v for v in plan.placements if v.name == "peri-dt-sqrt2L")
    for depth in plan.depths:
        (override,) = scaled.overrides_at(depth)
        assert override.startswith("model.delta_t=")
        assert float(override.split("=")[1]) == pytest.approx(1 / math.sqrt(2 * depth), rel=1e-5)
    moe = [c for c in plan.cells() if c.ffn == "moe"]
    assert {c.depth for c in moe} <= {max(plan.depths)}
    if plan.preregistered is not None:
        assert (plan.preregistered.a, plan.preregistered.b) == ("span_clean", "pre")
        assert plan.preregistered.depth == max(plan.depths)


def test_ffn_depths_runs_an_ffn_kind_at_its_depths_only_and_searches_it_there():
    plan = parse_plan({"grid": {"placements": ["pre"], "depths": [12, 48], "lrs": [1e-3, 1e-2],
                                "ffn": {"dense": [], "moe": ["model.moe.n_experts=4"]}, "ffn_depths": {"moe": [48]}},
                       "protocol": {"kind": "lr_search", "search_depths": [12]}})
    assert [c.key for c in plan.cells()] == ["pre-L12-dense", "pre-L48-dense", "pre-L48-moe"]
    # MoE runs at no search depth: its cell searches itself; dense at 48 takes depth 12's best
    assert {s.run_id for s in plan.expand({})} == {"pre-L12-dense-lr1e-3-s0", "pre-L12-dense-lr1e-2-s0",
                                                   "pre-L48-moe-lr1e-3-s0", "pre-L48-moe-lr1e-2-s0"}
    for bad, message in (({"ffn_depths": {"moe": [24]}}, "ffn_depths.moe=[24] is invalid: must be among"),
                         ({"ffn_depths": {"sparse": [48]}}, "ffn_depths='sparse' is invalid")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_plan({"grid": {"placements": ["pre"], "depths": [12, 48],
                                 "ffn": {"dense": [], "moe": []}, **bad}})
    with pytest.raises(ConfigError, match="runs moe at depths 48 only"):
        parse_plan({"grid": {"placements": ["pre", "span"], "depths": [12, 48], "ffn": {"dense": [], "moe": []},
                             "ffn_depths": {"moe": [48]}},
                    "protocol": {"preregistered": {"a": "span", "b": "pre", "depth": 12, "ffn": "moe"}}})


def test_full_protocol_brackets_on_every_seed():
    plan = parse_plan({"grid": {"placements": ["pre"], "depths": [2], "lrs": [1e-3, 1e-2], "seeds": [0, 1]},
                       "protocol": {"kind": "full", "bracket": {"max_extensions": 1}}})
    results = {s.run_id: _done(2.0 if s.lr == 1e-3 else 1.5) for s in plan.expand({})}
    assert {s.run_id for s in plan.expand(results)} - set(results) == {"pre-L2-dense-lr1e-1-s0",
                                                                       "pre-L2-dense-lr1e-1-s1"}
    results["pre-L2-dense-lr1e-1-s0"] = _done(1.0)
    assert plan.best_lr(plan.cells()[0], results) is None  # seed 1 of the extension is still to run
    results["pre-L2-dense-lr1e-1-s1"] = _diverged()
    assert plan.best_lr(plan.cells()[0], results) == 1e-2  # a divergence ranks 1e-1 last


def test_unigram_table_lists_only_the_depths_an_ffn_kind_runs_at(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"abcdefgh\n" * 100)
    plan = {"name": "moe-deep", "base": {"config": {"data": {"path": str(corpus)}}},
            "grid": {"placements": ["pre", "post"], "depths": [2, 4], "lrs": [1e-3], "seeds": [0],
                     "ffn": {"dense": [], "moe": ["model.moe.n_experts=4"]}, "ffn_depths": {"moe": [4]}}}
    losses = {(p, d, 1e-3): [0.5 if p == "pre" else 2.15] for p in ("pre", "post") for d in (2, 4)}
    _write_sweep(tmp_path / "sweep", plan, losses)
    text = "\n".join(unigram_section(load_results([tmp_path / "sweep"])))
    assert "| dense | 2 | `pre` @1e-3 | 0.500 | yes (1.70 nats below) |" in text
    assert "| moe | 2 |" not in text and "| moe | 4 | — (a baseline is unfinished) |" in text
    assert "`post` L=2 dense (2.150), `post` L=4 dense (2.150)." in text


def test_the_plan_format_in_the_plan_modules_docstring_parses():
    doc = plan_module.__doc__
    block = doc[doc.index("::\n\n") + 4:doc.index("\n\nA *cell*")]
    plan = parse_plan(yaml.safe_load(textwrap.dedent(block)))
    assert plan.max_extensions == 2 and plan.preregistered.hypothesis == "span ends below pre"
    assert [c.key for c in plan.cells() if c.ffn == "moe"] == ["pre-L48-moe", "span-L48-moe", "post-lowlr-L48-moe",
                                                               "peri-dtL-L48-moe"]
