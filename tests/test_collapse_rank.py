"""``protocol.collapse_margin``: a search run that ended at the byte-unigram loss ranks like a diverged run, in
the sweep's LR search and in the report alike, so a grid where no LR learned extends downward."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from helpers import refused_sweep_line
from spannorm.config import ConfigError
from spannorm.experiments import plan as plan_module
from spannorm.experiments.lr_search import bracket_search, is_collapsed, rank_key, select_best_lr
from spannorm.experiments.plan import format_lr, parse_plan
from spannorm.experiments.report import bracketing_section, corpus_json
from spannorm.experiments.results import load_results
from spannorm.experiments.runner import load_index

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GRID = [1e-3, 3e-3, 1e-2, 3e-2]
UNIGRAM = math.log(9)  # the corpus below: abcdefgh\n repeated, nine bytes equally often


def _done(loss: float) -> dict:
    return {"status": "done", "final_val_loss": loss}


def _diverged() -> dict:
    return {"status": "diverged", "final_val_loss": None}


def _reference_rank_key(records) -> tuple[int, float]:
    """rank_key as it was before collapse_margin: (diverged runs, mean final val loss of the others)."""
    records = list(records)
    diverged = sum(1 for r in records if r.get("status") == "diverged" or r.get("diverged"))
    losses = [float(r["final_val_loss"]) for r in records
              if not (r.get("status") == "diverged" or r.get("diverged"))
              and r.get("final_val_loss") is not None and math.isfinite(float(r["final_val_loss"]))]
    return diverged, (sum(losses) / len(losses) if losses else math.inf)


# ---------------------------------------------------------------------- the ranking rule
def test_a_run_above_the_threshold_ranks_like_a_diverged_run():
    above = UNIGRAM - 0.1
    assert rank_key([_done(2.19)], above) == (1, math.inf) == rank_key([_diverged()])
    assert rank_key([_done(1.5), _done(2.19), _diverged()], above) == (2, 1.5)
    assert rank_key([_done(1.5), _done(2.19), _diverged()]) == (1, pytest.approx(1.845))  # off: it averages
    assert rank_key([_done(above)], above) == (0, above)  # at the threshold exactly: learned
    assert not is_collapsed(_diverged(), above) and not is_collapsed(_done(2.19), None)
    assert not is_collapsed({"status": "done", "final_val_loss": None}, above)
    # every LR collapsed: a tie, which goes to the smallest LR
    assert select_best_lr({3e-2: [_done(3.3489)], 1e-3: [_done(3.3482)], 3e-3: [_done(3.3485)]}, 3.2) == 1e-3
    assert select_best_lr({1e-3: [_done(3.3489)], 3e-2: [_done(3.3482)]}, 3.2) == 1e-3
    assert select_best_lr({1e-3: [_done(3.3489)], 3e-2: [_done(3.3482)]}) == 3e-2  # off: noise decides


def test_off_is_the_old_rule_bit_for_bit():
    rng = random.Random(0)
    for _ in range(500):
        records = [rng.choice([_diverged(), {"diverged": True, "final_val_loss": 2.0},
                               {"status": "done", "final_val_loss": None}, _done(float("nan")),
                               _done(rng.uniform(1.0, 4.0))]) for _ in range(rng.randint(0, 4))]
        assert rank_key(records) == rank_key(records, None) == _reference_rank_key(records)


def _search(losses: dict, cap: int = 2, above: float | None = 3.2):
    """bracket_search over one-seed records (lr -> loss; a missing LR has not run)."""
    return bracket_search(GRID, lambda lr: [_done(losses[lr]) if lr in losses else None], cap, None, above)


# the depth-48 `post` cell of the Shakespeare sweep: every LR at the unigram loss (3.309 there)
POST_L48 = {1e-3: 3.34817, 3e-3: 3.34846, 1e-2: 3.34894, 3e-2: 3.34889}


def test_an_all_collapsed_grid_extends_downward():
    assert _search(POST_L48, above=None).lrs[-1] == 3e-4  # the old rule: 1e-3 by noise, at the low edge
    assert _search({**POST_L48, 3e-2: 3.34800}, above=None).lrs[-1] == 0.1  # ... or upward, by noise
    assert _search({**POST_L48, 1e-3: 3.34900}, above=None).best == 3e-3  # ... or 'bracketed', by noise
    state = _search({**POST_L48, 3e-2: 3.34800})
    assert state.lrs[-1] == 3e-4 and state.best is None  # the rule: a tie, the smallest LR, downward
    # the extension collapsed too: still tied, still the smallest, extend again
    state = _search({**POST_L48, 3e-4: 3.3622})
    assert state.lrs[-1] == 1e-4 and state.best is None and state.extensions == 2
    assert _search({**POST_L48, 3e-4: 3.3622}, above=None).best == 1e-3  # the old rule called 1e-3 bracketed
    # the cap reached with nothing learned: the smallest LR, at the low edge
    state = _search({**POST_L48, 3e-4: 3.3622, 1e-4: 3.37})
    assert state.best == 1e-4 and state.edge == "low" and state.extensions == 2
    # an extension that learned wins, and is still at the edge when the cap is reached
    assert _search({**POST_L48, 3e-4: 3.3622, 1e-4: 2.9}).best == 1e-4


def test_a_grid_where_some_lr_learned_chooses_exactly_as_before():
    post_l12 = {1e-3: 2.8016, 3e-3: 3.3486, 1e-2: 3.3489, 3e-2: 3.3489, 3e-4: 2.8038}
    assert _search(post_l12) == _search(post_l12, above=None)
    assert _search(post_l12).best == 1e-3 and _search(post_l12).edge is None
    rng = random.Random(1)
    for _ in range(300):
        losses = {lr: rng.choice([rng.uniform(1.5, 3.0), rng.uniform(3.21, 3.4)]) for lr in GRID}
        if min(losses.values()) > 3.2:
            continue
        extended = {3e-4: rng.uniform(1.5, 3.4), 1e-4: rng.uniform(1.5, 3.4), 0.1: rng.uniform(1.5, 3.4),
                    0.3: rng.uniform(1.5, 3.4)}
        assert _search({**losses, **extended}) == _search({**losses, **extended}, above=None)


# ---------------------------------------------------------------------- the plan option
@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "letters.txt"
    path.write_bytes(b"abcdefgh\n" * 400)
    return path


def _plan(corpus: Path | str, margin: float | None = 0.1, **data) -> dict:
    protocol: dict = {"kind": "lr_search", "shared_lr": 3e-3, "bracket": {"max_extensions": 2}}
    if margin is not None:
        protocol["collapse_margin"] = margin
    return {"name": "collapse", "base": {"config": {"data": {"path": str(corpus), **data}}},
            "grid": {"placements": ["pre", "post"], "depths": [4], "lrs": GRID, "seeds": [0, 1, 2]},
            "protocol": protocol}


def _search_results(losses: dict[str, dict[float, float]]) -> dict:
    """Index records of seed-0 search runs: placement -> (lr -> loss)."""
    return {f"{p}-L4-dense-lr{format_lr(lr)}-s0": {"status": "done", "final_val_loss": loss}
            for p, by_lr in losses.items() for lr, loss in by_lr.items()}


COLLAPSED = {1e-3: 2.1901, 3e-3: 2.1904, 1e-2: 2.1909, 3e-2: 2.1908}  # ln 9 = 2.1972: every LR collapsed
LEARNED = {1e-3: 1.9, 3e-3: 1.5, 1e-2: 1.6, 3e-2: 2.1905}


def test_the_plan_ranks_by_the_corpus_unigram_loss_and_extends_the_collapsed_cell_downward(corpus):
    plan, old = parse_plan(_plan(corpus)), parse_plan(_plan(corpus, None))
    assert plan.collapse_margin == 0.1 and old.collapse_margin is None and old.collapsed_above() is None
    assert plan.collapsed_above() == pytest.approx(UNIGRAM - 0.1)
    results = _search_results({"pre": LEARNED, "post": COLLAPSED})
    pre, post = plan.cells()
    assert plan.search_state(pre, results) == old.search_state(pre, results)
    assert plan.best_lr(pre, results) == 3e-3
    assert old.search_state(post, results).lrs[-1] == 3e-4  # 1e-3 by 3e-4 nats: the low edge by chance
    assert plan.search_state(post, results).lrs[-1] == 3e-4
    results.update(_search_results({"post": {3e-4: 2.1930}}))
    assert old.best_lr(post, results) == 1e-3  # the old rule: 1e-3 'bracketed', its seeds run
    assert plan.best_lr(post, results) is None and plan.search_state(post, results).lrs[-1] == 1e-4
    new_ids = {s.run_id for s in plan.expand(results)} - {s.run_id for s in old.expand(results)}
    assert new_ids == {"post-L4-dense-lr1e-4-s0"}


def test_the_unigram_loss_is_computed_once_per_plan(corpus, monkeypatch):
    calls = []
    real = plan_module.unigram_reference
    monkeypatch.setattr(plan_module, "unigram_reference", lambda data: calls.append(1) or real(data))
    plan = parse_plan(_plan(corpus))
    results = _search_results({"pre": LEARNED, "post": COLLAPSED})
    for _ in range(3):
        plan.expand(results)
    assert len(calls) == 1
    parse_plan(_plan(corpus, None)).expand(results)  # off: the corpus is never read
    assert len(calls) == 1


@pytest.mark.parametrize("margin, message", [
    (0, r"collapse_margin=0.0 is invalid: must be > 0 \(nats below the byte-unigram loss\), or null for off"),
    (-0.1, "collapse_margin=-0.1 is invalid: must be > 0"),
    ("wide", "collapse_margin"),
    (float("nan"), "collapse_margin"),
])
def test_bad_collapse_margins_fail_in_one_line_naming_the_field(corpus, margin, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_plan(_plan(corpus, margin))
    assert "\n" not in str(err.value)


def test_a_corpus_without_a_unigram_loss_is_refused_when_the_plan_is_read_or_the_sweep_starts(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"collapse_margin=0.1 needs the byte-unigram loss .*tokenizer 'bpe'.*"
                                          r"allowed: a byte-level text corpus") as err:
        parse_plan(_plan(corpus, tokenizer="bpe"))
    assert "\n" not in str(err.value)
    parse_plan(_plan(corpus, None, tokenizer="bpe"))  # off: no unigram loss needed
    plan = parse_plan(_plan(tmp_path / "missing.txt"))  # the corpus is read at the first ranking
    with pytest.raises(ConfigError, match="needs the byte-unigram loss of the corpus .*cannot be read"):
        plan.expand({})


def test_sweep_cli_refuses_an_unreadable_corpus_under_collapse_margin_in_one_line(tmp_path):
    line = refused_sweep_line(tmp_path, _plan(tmp_path / "missing.txt"))
    assert "collapse_margin=0.1 needs the byte-unigram loss" in line


# ---------------------------------------------------------------------- the report
def _write_sweep(root: Path, plan: dict, losses: dict) -> None:
    """A sweep folder: ``losses`` maps (placement, lr) to {seed: final loss} at depth 4, dense."""
    root.mkdir(parents=True)
    (root / "plan.yaml").write_text(yaml.safe_dump(plan))
    records = []
    for (placement, lr), by_seed in losses.items():
        for seed, loss in by_seed.items():
            run_id = f"{placement}-L4-dense-lr{format_lr(lr)}-s{seed}"
            summary = {"final_val_loss": loss, "best_val_loss": loss, "diverged": False, "steps": 10}
            (root / "runs" / run_id).mkdir(parents=True)
            (root / "runs" / run_id / "summary.json").write_text(json.dumps(summary))
            records.append({"run_id": run_id, "placement": placement, "depth": 4, "ffn": "dense", "lr": lr,
                            "seed": seed, "stage": "search" if seed == 0 else "best", **summary, "status": "done"})
    (root / "index.json").write_text(json.dumps({"plan": plan["name"], "starts": [], "runs": records}))


def _sweep_losses() -> dict:
    """pre learned (best 3e-3, every seed run); post collapsed at every LR, 3e-4 and 1e-4 too; every seed at
    the shared LR 3e-3, and at 1e-3 (the old rule's best) and 1e-4 (the new rule's)."""
    losses = {("pre", lr): {0: loss} for lr, loss in LEARNED.items()}
    losses[("pre", 3e-3)] = {0: 1.5, 1: 1.55, 2: 1.45}
    losses |= {("post", lr): {0: loss} for lr, loss in COLLAPSED.items()}
    losses[("post", 3e-4)] = {0: 2.1930}
    losses[("post", 1e-4)] = {0: 2.1950, 1: 2.1951, 2: 2.1952}
    losses[("post", 1e-3)] = {0: COLLAPSED[1e-3], 1: 2.1902, 2: 2.1903}
    losses[("post", 3e-3)] = {0: COLLAPSED[3e-3], 1: 2.1905, 2: 2.1906}
    return losses


@pytest.mark.parametrize("margin", [0.1, None])
def test_the_report_chooses_the_best_lr_the_sweep_ran_seeds_at(corpus, tmp_path, margin):
    root = tmp_path / "sweep"
    _write_sweep(root, _plan(corpus, margin), _sweep_losses())
    results = load_results([root])
    plan, index = results.sweeps[0].plan, load_index(root)
    for cell in plan.cells():
        assert results.best_lr(cell) == plan.best_lr(cell, index)
        assert results.search_state(cell) == plan.search_state(cell, index)
    post = plan.cells()[1]
    assert results.best_lr(post) == (1e-4 if margin else 1e-3)
    assert results.unigram.loss == pytest.approx(UNIGRAM)
    text = "\n".join(bracketing_section(results))
    if margin:
        assert "Collapse rule (protocol.collapse_margin 0.1)" in text and "It applied in 2 cell(s)" in text
        assert "| `post` | 4 | dense | 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2 | 2 | 1e-4 | 6/6 | **no LR learned**" in text
        assert "| `pre` | 4 | dense | 1e-3, 3e-3, 1e-2, 3e-2 | 0 | 3e-3 | 1/4 | bracketed |" in text  # 3e-2 collapsed
        cells = corpus_json(results)["cells"]
        assert [(c["placement"], c["search_runs_collapsed"], c["collapse_margin"]) for c in cells] == \
            [("pre", 1, 0.1), ("post", 6, 0.1)]
    else:
        assert "Collapse rule" not in text and "ranked as collapsed" not in text and "| `pre` |" not in text
        assert not any("search_runs_collapsed" in c for c in corpus_json(results)["cells"])
        assert "| `post` | 4 | dense | 3e-4, 1e-3, 3e-3, 1e-2, 3e-2 | 1 | 1e-3 | **no LR learned**" in text


def test_the_best_baseline_ranks_a_collapsed_baseline_like_a_diverged_one(corpus, tmp_path):
    # post beats pre on the mean at the shared LR, but two of its three seeds collapsed
    losses = {("pre", lr): {0: loss} for lr, loss in LEARNED.items()}
    losses[("pre", 3e-3)] = {0: 1.5, 1: 2.0, 2: 2.05}
    losses |= {("post", lr): {0: loss} for lr, loss in LEARNED.items()}
    losses[("post", 3e-3)] = {0: 0.5, 1: 2.19, 2: 2.19}
    for margin, best in ((None, "post"), (0.1, "pre")):
        root = tmp_path / f"sweep-{margin}"
        _write_sweep(root, _plan(corpus, margin), losses)
        assert load_results([root]).best_baseline(4, "dense", "shared")[0] == best
