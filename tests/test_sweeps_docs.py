"""docs/sweeps.md runs: every YAML plan on the page parses, the quick start's commands run in order (on the
page's plan shrunk to a few steps of a 16-wide model, trained in-process), the refusals the page quotes are
the ones the sweep prints, the plan reference table lists exactly the keys the parser accepts, and the page's
links resolve."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
import yaml

from spannorm.cli.main import main
from spannorm.experiments import plan as plan_module
from spannorm.experiments.plan import parse_plan

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "sweeps.md"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def text() -> str:
    return DOC.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The body of the ``## title`` section."""
    return text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def plans() -> dict[str, str]:
    """Every YAML block, by the file name on its first line (``# quick.yaml``)."""
    blocks = re.findall(r"```yaml\n(.*?)```", text(), re.S)
    return {block.splitlines()[0].lstrip("# ").strip(): block for block in blocks}


def shrunk(plan_text: str, cache_dir: Path) -> str:
    """The plan with a 16-wide model, 2 steps of 2 sequences, a small slice of the embedded corpus, its first
    two seeds and the pre-registered depth only."""
    data = yaml.safe_load(plan_text)
    config = data["base"]["config"]
    config["model"].update(d_model=16, context_length=16)
    config["data"].update(embedded_max_bytes=60000, cache_dir=str(cache_dir))
    config["optim"].update(warmup_steps=1)
    config["train"].update(steps=2, batch_size=2, eval_every=2, eval_batches=1, precision="fp32")
    data["grid"]["seeds"] = data["grid"]["seeds"][:2]  # two seeds still make a Welch test
    data["grid"]["depths"] = [data["protocol"]["preregistered"]["depth"]]
    return yaml.safe_dump(data, sort_keys=False)


def test_every_plan_on_the_page_parses():
    found = plans()
    assert {"quick.yaml", "variants.yaml"} <= set(found)
    for name, block in found.items():
        plan = parse_plan(yaml.safe_load(block), name)
        assert plan.name == name.removesuffix(".yaml")
    variants = parse_plan(yaml.safe_load(found["variants.yaml"]))
    cells = {c.key for c in variants.cells()}
    assert "peri-dt0.1-L24-dense" in cells and "peri-dt0.1-L24-moe" not in cells and "pre-L6-moe" not in cells


def test_quick_start_runs_resumes_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("quick.yaml").write_text(shrunk(plans()["quick.yaml"], tmp_path / "cache"))
    block = re.search(r"```bash\n(.*?)```", section("Quick start"), re.S).group(1)
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["spannorm", "sweep"]] * 3 + [["spannorm", "report"]]
    outputs = []
    for argv in commands:
        args = argv[1:] + (["--workers", "0"] if argv[1] == "sweep" else [])  # in-process: no spawn start-up
        assert main(args) == 0, " ".join(argv)
        outputs.append(capsys.readouterr().out)
        if "--dry-run" in argv:
            assert not Path("sweeps").exists()  # a dry run writes nothing
    dry, first, again, report = outputs
    assert dry.count(" search  pending") == 4 and "4 runs now (lr_search protocol" in dry
    searched = parse_plan(yaml.safe_load(plans()["quick.yaml"])).expand()  # the page's plan, unshrunk
    assert len(searched) == 8 and {s.stage for s in searched} == {"search"}  # "it lists the 8 search runs"
    index = json.loads(Path("sweeps/quick/index.json").read_text())
    n_runs = len(index["runs"])
    assert 6 <= n_runs <= 8 and index["counts"] == {"done": n_runs}
    assert f"{n_runs} runs trained" in first
    assert f"0 runs trained (0 diverged, 0 failed), {n_runs} already finished" in again
    assert "0 runs trained" in again
    out = Path("reports/quick")
    assert {"report.md", "results.csv", "results.json", "val_vs_depth_dense.png", "curves_dense_L4.png",
            "layers_dense_L4.png"} <= {p.name for p in out.iterdir()}
    md = (out / "report.md").read_text()
    assert "Fixed before the runs? yes" in md and "Hypothesis: span_post ends below pre at depth 4" in md
    for title in ("## Unigram reference", "## Pre-registered comparison", "## Final val loss, dense",
                  "## SpanNorm against the best baseline", "## Divergences", "## LR search (dense)",
                  "## LR bracketing", "## Plots", "## Per-layer moments"):
        assert title in md, title
    assert len((out / "results.csv").read_text().splitlines()) == n_runs + 1

    # The refusals the page quotes, on the folder just made; each is refused before anything is written.
    before = Path("sweeps/quick/index.json").read_text()
    quick = yaml.safe_load(Path("quick.yaml").read_text())
    cases = {
        "renamed": ({**quick, "name": "other"}, "sweep folder 'sweeps/quick' belongs to plan 'quick', not 'other'"),
        "cut": ({**quick, "grid": {**quick["grid"], "seeds": [0]}},
                "plan 'quick' no longer asks for"),
    }
    steps = json.loads(json.dumps(quick))
    steps["base"]["config"]["train"]["steps"] = 3
    cases["steps"] = (steps, "was made with other settings train.steps=2, now train.steps=3; allowed: the plan "
                             "that made it, or a new --out directory")
    table = section("Running a sweep")
    for name, (data, message) in cases.items():
        Path(f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        assert main(["sweep", f"{name}.yaml", "--out", "sweeps/quick", "--workers", "0"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (name, err)
        assert "; allowed: " + err.split("; allowed: ", 1)[1] in table, name  # the page quotes it
    assert Path("sweeps/quick/index.json").read_text() == before


def _field_type(cls, name: str):
    hint = typing.get_type_hints(cls, vars(plan_module))[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    return args[0] if optional else hint


def parser_keys(cls=plan_module.PlanFile, prefix: str = "") -> set[str]:
    """Every leaf key of the plan file's dataclasses, dotted; items of ``grid.placements`` as ``[]``."""
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        kind = _field_type(cls, f.name)
        if dataclasses.is_dataclass(kind):
            keys |= parser_keys(kind, path + ".")
        else:
            keys.add(path)
            if path == "grid.placements":
                keys |= parser_keys(plan_module.PlanVariantEntry, path + "[].")
    return keys


def test_reference_table_lists_exactly_the_keys_the_parser_accepts():
    rows = re.findall(r"^\| `([^`]+)` \|", section("The plan format"), re.M)
    assert len(rows) == len(set(rows)), "a key is listed twice"
    assert set(rows) == parser_keys()
    # and the parser really accepts each of them: an unknown key is refused
    with pytest.raises(Exception, match="measure.batch_sise"):
        parse_plan({"grid": {"placements": ["pre"], "depths": [1]}, "measure": {"batch_sise": 2}})


def test_synopsis_options_exist(capsys):
    for command in ("sweep", "report"):
        synopsis = re.search(rf"```text\nspannorm {command} (.*?)```", text(), re.S).group(1)
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = capsys.readouterr().out
        for option in re.findall(r"--[a-z-]+", synopsis):
            assert option in help_text, (command, option)


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["docs/sweeps.md", "README.md", "docs/results.md"])
def test_links_to_and_from_the_page_resolve(page):
    path = REPO / page
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
    if page != "docs/sweeps.md":  # the pointers to this page
        links = [link for link in links if "sweeps.md" in link]
        assert links, f"{page} does not link docs/sweeps.md"
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), (page, link)
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, (page, link)
