"""The study report on a hand-made sweep directory with known numbers: tables, LR choice, tests, plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scipy import stats

from spannorm.experiments.report import build_report
from spannorm.experiments.results import load_results

PLAN = {
    "name": "fake",
    "grid": {"placements": ["pre", "post", "span", "span_b2t",
                            {"name": "peri-dt0.1", "placement": "peri", "overrides": ["model.delta_t=0.1"]},
                            "peri", "residual"],
             "depths": [2, 4], "ffn": {"dense": []}, "lrs": [1e-3, 1e-2], "seeds": [0, 1, 2]},
    "protocol": {"kind": "full", "shared_lr": 1e-3},
}

# final val losses by (placement, depth, lr): three seeds each; None marks a diverged run
LOSSES = {
    ("pre", 2, 1e-3): [2.30, 2.40, 2.50], ("pre", 2, 1e-2): [2.00, 2.10, 2.20],
    ("post", 2, 1e-3): [2.60, 2.70, 2.80], ("post", 2, 1e-2): [1.50, None, 1.50],  # lower, but diverged once
    ("span", 2, 1e-3): [2.20, 2.30, 2.40], ("span", 2, 1e-2): [1.90, 1.95, 2.00],
    ("span_b2t", 2, 1e-3): [2.50, 2.50, 2.60], ("span_b2t", 2, 1e-2): [2.10, 2.20, 2.30],
    ("pre", 4, 1e-3): [2.10, 2.20, 2.30], ("pre", 4, 1e-2): [2.50, 2.60, 2.70],
    ("post", 4, 1e-3): [None, None, None], ("post", 4, 1e-2): [None, None, None],
    ("span", 4, 1e-3): [2.00, 2.05, 2.10], ("span", 4, 1e-2): [1.80, 1.90, 2.00],
    ("span_b2t", 4, 1e-3): [2.40, 2.50, 2.60], ("span_b2t", 4, 1e-2): [3.00, 3.10, 3.20],
}


def _write_run(root: Path, placement: str, depth: int, lr: float, seed: int, loss: float | None) -> dict:
    from spannorm.experiments.plan import format_lr

    run_id = f"{placement}-L{depth}-dense-lr{format_lr(lr)}-s{seed}"
    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True)
    diverged = loss is None
    summary = {"final_val_loss": None if diverged else loss, "best_val_loss": None if diverged else loss - 0.05,
               "diverged": diverged, "diverged_step": 7 if diverged else None, "steps": 7 if diverged else 10,
               "tokens": 100, "wall_s": 900.0 * depth, "tokens_per_s": 100.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    curve = [{"step": s, "train_loss": 3.0 - 0.05 * s} for s in range(1, 11)]
    curve[4]["val_loss"] = 2.9
    if not diverged:
        curve[9]["val_loss"] = loss
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in curve) + "\n")
    if not diverged:
        growth = 1.5 if placement == "pre" else 1.1
        layer = {"n_layers": depth, "rms": [growth ** i for i in range(depth + 1)],
                 "mean_abs": [0.8 * growth ** i for i in range(depth + 1)],
                 "variance": [growth ** (2 * i) for i in range(depth + 1)],
                 "max_abs": [4.0 * growth ** i for i in range(depth + 1)],
                 "grad_norm": [0.1 * (depth + 1 - i) for i in range(depth + 1)],
                 "param_grad_norm": [0.2] * depth}
        if placement == "residual":  # ResiDual: x_l is Post-LN (flat), its dual stream d_l grows
            layer |= {"dual_mean_abs": [0.8 * 2.0 ** i for i in range(depth + 1)],
                      "dual_variance": [4.0 ** i for i in range(depth + 1)],
                      "dual_max_abs": [4.0 * 2.0 ** i for i in range(depth + 1)]}
        (run_dir / "layer_stats.json").write_text(json.dumps(layer))
    return {"run_id": run_id, "placement": placement, "depth": depth, "ffn": "dense", "lr": lr, "seed": seed,
            "stage": "grid", "preset": None, **summary, "status": "diverged" if diverged else "done"}


def make_fake_sweep(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "plan.yaml").write_text(yaml.safe_dump(PLAN))
    records = []
    losses = dict(LOSSES)
    for depth in (2, 4):  # Kan et al.'s placements: unremarkable losses
        for lr in (1e-3, 1e-2):
            losses[("peri", depth, lr)] = [2.9, 3.0, 3.1]
            losses[("peri-dt0.1", depth, lr)] = [2.95, 3.0, 3.05]
            losses[("residual", depth, lr)] = [2.9, 3.0, 3.1]
    for (placement, depth, lr), values in losses.items():
        for seed, loss in enumerate(values):
            records.append(_write_run(root, placement, depth, lr, seed, loss))
    (root / "index.json").write_text(json.dumps({"plan": "fake", "runs": records}))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake") / "sweep"
    make_fake_sweep(root)
    out = root.parent / "report"
    build_report(load_results([root]), out, title="Fake study")
    return out


def _section(markdown: str, title: str) -> str:
    start = markdown.index(title)
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end != -1 else None]


def test_best_lr_counts_divergence_as_worst():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sweep"
        make_fake_sweep(root)
        results = load_results([root])
        post2 = results.cell("post", 2, "dense")
        assert results.best_lr(post2) == 1e-3  # 1e-2 has the lower mean but a divergence
        assert results.best_lr(results.cell("pre", 4, "dense")) == 1e-3
        assert results.best_lr(results.cell("span", 4, "dense")) == 1e-2
        group = results.at(results.cell("post", 4, "dense"), "best")
        assert group.n == 3 and group.n_diverged == 3 and group.final == []


@pytest.mark.slow
def test_headline_table_holds_mean_and_std_at_the_best_and_shared_lr(report_dir):
    md = (report_dir / "report.md").read_text()
    best = _section(md, "## Final val loss, dense, at each placement's best LR")
    assert "| `pre` | 2.100 ± 0.100 @1e-2 | 2.200 ± 0.100 @1e-3 |" in best
    assert "| `post` | 2.700 ± 0.100 @1e-3 | diverged (3/3) @1e-3 |" in best
    assert "| `span` | 1.950 ± 0.050 @1e-2 | 1.900 ± 0.100 @1e-2 |" in best
    shared = _section(md, "## Final val loss, dense, at the shared LR")
    assert "| `span` | 2.300 ± 0.100 @1e-3 | 2.050 ± 0.050 @1e-3 |" in shared
    best_loss = _section(md, "## Best val loss")
    assert "| `pre` | 2.050 ± 0.100 @1e-2 |" in best_loss


@pytest.mark.slow
def test_welch_p_values_match_scipy_against_the_best_baseline(report_dir):
    md = (report_dir / "report.md").read_text()
    section = _section(md, "## SpanNorm against the best baseline at each placement's best LR")
    # depth 2: best baseline is pre @1e-2 (post @1e-2 diverged once, so post's best LR is 1e-3)
    p2 = stats.ttest_ind([1.90, 1.95, 2.00], [2.00, 2.10, 2.20], equal_var=False).pvalue
    row = next(line for line in section.splitlines() if line.startswith("| dense | 2 | `span` "))
    assert "`pre` @1e-2" in row and f"{p2:.3f}" in row and "-0.150" in row
    p4 = stats.ttest_ind([1.80, 1.90, 2.00], [2.10, 2.20, 2.30], equal_var=False).pvalue
    row = next(line for line in section.splitlines() if line.startswith("| dense | 4 | `span` "))
    assert "`pre` @1e-3" in row and f"{p4:.3f}" in row and "better" in row
    data = json.loads((report_dir / "results.json").read_text())
    entry = next(r for r in data["welch"]["best"] if r["placement"] == "span_b2t" and r["depth"] == 4)
    expected = stats.ttest_ind([2.40, 2.50, 2.60], [2.10, 2.20, 2.30], equal_var=False).pvalue
    assert entry["p"] == pytest.approx(expected) and entry["baseline"] == "pre"


@pytest.mark.slow
def test_divergence_table_and_csv_list_every_run(report_dir):
    md = (report_dir / "report.md").read_text()
    section = _section(md, "## Divergences")
    assert "| `post` | 2 | dense | 1e-2 | 1 / 3 | 7 |" in section
    assert "| `post` | 4 | dense | 1e-3 | 3 / 3 | 7, 7, 7 |" in section
    with open(report_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(LOSSES) * 3 + 3 * 2 * 2 * 3
    assert sum(r["status"] == "diverged" for r in rows) == 7


def test_compute_section_sums_each_depths_training_time(report_dir):
    section = _section((report_dir / "report.md").read_text(), "## Compute")
    runs = {depth: 3 * sum(d == depth for (_, d, _) in LOSSES) + 3 * 2 * 3 for depth in (2, 4)}
    # every fake run at depth L took 900·L seconds
    assert f"| 2 | dense | {runs[2]} | {runs[2] * 0.5:.2f} | 1800 |" in section
    assert f"| 4 | dense | {runs[4]} | {runs[4] * 1.0:.2f} | 3600 |" in section
    assert f"| all |  | {runs[2] + runs[4]} | {runs[2] * 0.5 + runs[4]:.2f} |" in section


@pytest.mark.slow
def test_plots_are_written_and_linked(report_dir):
    md = (report_dir / "report.md").read_text()
    names = ["val_vs_depth_dense.png", "curves_dense_L2.png", "curves_dense_L4.png", "layers_dense_L2.png",
             "layers_dense_L4.png", "kan_moments.png"]
    for name in names:
        data = (report_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in md
    kan = _section(md, "## Kan et al.'s picture")
    # pre grows by 1.5 per layer in the fake stats: mean|x_L|/mean|x_0| = 1.5**4 at the deepest depth
    assert "| `pre` | 1e-3 | 0.8 | 4.05 | 5.06 |" in kan
    assert "`peri-dt0.1`" in kan
    assert "| `span` | 1e-2 |" in kan  # issue 16 item 4: SpanNorm beside Peri-LN (span, span_clean, residual)
    # ResiDual: its Post-LN x_l and, on a row of its own, the dual stream d_l that grows (2x per layer)
    assert "| `residual` | 1e-3 | 0.8 | 1.17 | 1.46 |" in kan  # the fake x_l grows by 1.1 per layer
    assert "| `residual` dual stream d_l | 1e-3 | 0.8 | 12.8 | 16 | 256 | 64 | 3 |" in kan  # 3 runs averaged
    assert "L=4, dense; `runs`" in kan


@pytest.mark.slow
def test_report_cli_writes_the_report_and_rejects_a_non_sweep(tmp_path, report_dir):
    root = tmp_path / "sweep"
    make_fake_sweep(root)
    proc = subprocess.run([sys.executable, "-m", "spannorm", "report", str(root), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "report.md").read_text() == (report_dir / "report.md").read_text().replace(
        "Fake study", "Study report").replace(str(report_dir.parent / "sweep"), str(root))
    proc = subprocess.run([sys.executable, "-m", "spannorm", "report", str(tmp_path / "nothing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("spannorm: error:") and "not a sweep" in proc.stderr


def test_a_side_with_one_run_is_not_tested_not_called_equal():
    from spannorm.experiments.report import significance_table

    row = {"ffn": "dense", "depth": 24, "placement": "span", "lr": 1e-2, "mean": 3.4, "baseline": "pre",
           "baseline_lr": 1e-2, "baseline_mean": 2.3, "p": None, "n": 1, "n_diverged": 0, "baseline_n": 3}
    table = "\n".join(significance_table([row]))
    assert "not tested (fewer than 2 runs on a side)" in table and "no significant difference" not in table
    table = "\n".join(significance_table([{**row, "p": 0.5, "n": 3}]))
    assert "no significant difference" in table


def test_a_variant_is_tested_against_its_control(tmp_path):
    """``peri-dt0.1`` is tested against ``peri`` (the plan's plain variant of the same placement), in the report
    and in results.json; a placement without such a sibling has no control."""
    root = tmp_path / "sweep"
    make_fake_sweep(root)
    results = load_results([root])
    assert results.control_of("peri-dt0.1") == "peri"
    assert results.control_of("peri") is None and results.control_of("pre") is None
    test = results.welch_control("peri-dt0.1", 2, "dense")
    expected = stats.ttest_ind([2.95, 3.0, 3.05], [2.9, 3.0, 3.1], equal_var=False).pvalue
    assert test["baseline"] == "peri" and test["p"] == pytest.approx(expected)
    build_report(results, tmp_path / "report", title="Controls")
    md = (tmp_path / "report" / "report.md").read_text()
    section = _section(md, "## Variants against their control")
    assert "| dense | 2 | `peri-dt0.1` @" in section and "`peri` @" in section and f"{expected:.3f}" in section
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert {(r["placement"], r["depth"]) for r in data["welch_control"]["best"]} == {("peri-dt0.1", 2),
                                                                                      ("peri-dt0.1", 4)}
