"""Placement names 2 (issue 16, item 3): SpanNorm's clean reading is ``span`` (it was ``span_clean``), the reading
that normalizes the stream after every block is ``span_post`` (it was ``span``). Whatever was saved with the old
names (checkpoints, run folders, sweep ledgers and plans) still reads as what it was made as."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spannorm.config import PLACEMENT_NAMES, ConfigError, ModelConfig, upgrade_model_mapping, upgrade_override
from spannorm.experiments.ledger import read_ledger, run_line, start_line
from spannorm.experiments.plan import RunSpec, parse_plan, parse_plan_text
from spannorm.experiments.report import build_report
from spannorm.experiments.results import load_results
from spannorm.experiments.runner import check_ledger, ledger_line_from_folder, measure_run
from spannorm.model.checksums import write_manifest
from spannorm.model.io import load_model, save_model
from spannorm.model.transformer import DecoderLM
from spannorm.train.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(d_model=32, n_heads=2, n_layers=3, context_length=16)

# (version 1 mapping, the same model in version 2's names)
PAIRS = [
    (dict(placement="span"), dict(placement="span_post")),
    (dict(placement="span", span_scaling="skip", span_alpha=2.0, span_beta=0.5),
     dict(placement="span_post", span_post_scaling="skip", span_post_alpha=2.0, span_post_beta=0.5)),
    (dict(placement="span_b2t", span_scaling="both"), dict(placement="span_b2t", span_post_scaling="both")),
    (dict(placement="span_clean"), dict(placement="span")),
    (dict(placement="span_clean", span_clean_scaling="learnable", delta_t=0.5),
     dict(placement="span", span_scaling="learnable", delta_t=0.5)),
    (dict(placement="pre", placement_overrides={0: "span", 2: "span_clean"}),
     dict(placement="pre", placement_overrides={0: "span_post", 2: "span"})),
    (dict(placement="peri", delta_t=0.1), dict(placement="peri", delta_t=0.1)),
]


def _losses(cfg: ModelConfig) -> list[float]:
    """Three AdamW steps of a seeded model on seeded tokens: the losses, exactly."""
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length + 1), generator=gen)
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("old, new", PAIRS, ids=[f"{o['placement']}-{i}" for i, (o, _) in enumerate(PAIRS)])
def test_a_version_1_config_builds_the_model_it_named_bit_for_bit(old, new):
    from_old = ModelConfig.from_dict({**SMALL, **old, "placement_names": 1})
    assert from_old == ModelConfig.from_dict({**SMALL, **new})
    assert from_old.placement_names == PLACEMENT_NAMES
    assert _losses(from_old) == _losses(ModelConfig(**SMALL, **new))


def test_the_two_readings_differ_so_the_translation_is_not_a_no_op():
    clean, post = ModelConfig(**SMALL, placement="span"), ModelConfig(**SMALL, placement="span_post")
    assert _losses(clean) != _losses(post)


@pytest.mark.parametrize("old, new", PAIRS[:5], ids=[o["placement"] for o, _ in PAIRS[:5]])
def test_a_checkpoint_saved_before_the_rename_loads_as_the_model_it_was_trained_as(old, new, tmp_path):
    """An old checkpoint's ``model_config.json`` has no ``placement_names`` and version 1's names: it loads as
    the model it was saved from, weights and logits equal."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**SMALL, **new))
    save_model(model, tmp_path / "m")
    config_path = tmp_path / "m" / "model_config.json"
    saved = json.loads(config_path.read_text())
    assert saved["placement_names"] == PLACEMENT_NAMES
    old_style = {k: v for k, v in saved.items() if k not in ("placement_names", "span_scaling", "span_post_scaling",
                                                             "span_post_alpha", "span_post_beta")}
    config_path.write_text(json.dumps({**old_style, **old}))
    manifest = json.loads((tmp_path / "m" / "checksums.json").read_text())
    write_manifest(tmp_path / "m", list(manifest.get("files", manifest)))  # as the old code wrote it
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(idx).logits, model(idx).logits)


def test_a_saved_config_keeps_its_version_so_it_is_never_read_with_the_old_names_again():
    cfg = ModelConfig(**SMALL, placement="span")
    again = ModelConfig.from_saved(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.placement == "span"


@pytest.mark.parametrize("mapping, says", [
    (dict(placement="span_clean"), "version 1's span_clean is span since placement names 2"),
    (dict(placement="pre", placement_overrides={1: "span_clean"}), "version 1's span_clean is span"),
    (dict(span_scaling="init"), "init is a span_post_scaling since placement names 2"),
    (dict(span_clean_scaling="fixed"), "the field is span_scaling since placement names 2"),
    (dict(span_alpha=2.0), "the field is span_post_alpha"),
    (dict(span_beta=2.0), "the field is span_post_beta"),
    (dict(placement_names=3), "allowed: 2, or 1"),
])
def test_a_version_1_spelling_without_the_key_is_refused_with_what_it_is_now(mapping, says):
    with pytest.raises(ConfigError, match="placement_names") as err:
        ModelConfig.from_dict({**SMALL, **mapping})
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_cli_refuses_an_old_placement_name_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "spannorm", "train", "--preset", "tiny", "--out", str(out),
                           "--model.placement=span_clean", "--train.steps=1"], capture_output=True, text=True)
    assert proc.returncode == 2 and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1 and "span_clean is span" in proc.stderr


def test_old_overrides_are_rewritten_field_by_field():
    assert upgrade_override("model.placement=span") == "model.placement=span_post"
    assert upgrade_override("model.placement=span_clean") == "model.placement=span"
    assert upgrade_override("model.span_clean_scaling=learnable") == "model.span_scaling=learnable"
    assert upgrade_override("model.span_scaling=skip") == "model.span_post_scaling=skip"
    assert upgrade_override("model.span_alpha=2") == "model.span_post_alpha=2"
    assert yaml.safe_load(upgrade_override("model.placement_overrides={0: span, 2: span_clean}").partition("=")[2]) \
        == {0: "span_post", 2: "span"}
    for other in ("model.placement=pre", "optim.lr=1e-3", "train.seed=1", "model.moe.top_k=2"):
        assert upgrade_override(other) == other
    assert upgrade_model_mapping({"placement": "span_clean", "span_clean_scaling": "learnable",
                                  "placement_names": 1}) == {"placement": "span", "span_scaling": "learnable",
                                                             "placement_names": PLACEMENT_NAMES}
    assert upgrade_model_mapping({"span_clean_scaling": "fixed", "span_scaling": "init"}) == \
        {"span_scaling": "fixed", "span_post_scaling": "init"}  # version 1 had both fields
    with pytest.raises(ConfigError, match="names span_post_scaling twice"):
        upgrade_model_mapping({"span_scaling": "init", "span_post_scaling": "skip"})


def _plan(names: int | None) -> dict:
    data = {"name": "renamed",
            "base": {"config": {"model": {"d_model": 16, "n_heads": 2, "context_length": 16},
                                "train": {"steps": 3, "device": "cpu", "precision": "fp32"}}},
            "grid": {"placements": ["pre", "span", {"name": "clean-l", "placement": "span_clean",
                                                    "overrides": ["model.span_clean_scaling=learnable"]}],
                     "depths": [2], "lrs": [1e-3, 3e-3], "seeds": [0]},
            "protocol": {"kind": "lr_search", "preregistered": {"a": "clean-l", "b": "pre", "depth": 2}}}
    if names is not None:
        data["placement_names"] = names
    return data


def test_a_plan_in_version_1_names_runs_what_it_named_under_its_own_display_names():
    plan = parse_plan(_plan(1))
    assert plan.placement_names == 1
    assert [(v.name, v.placement, v.overrides) for v in plan.placements] == [
        ("pre", "pre", ()), ("span", "span_post", ()),
        ("clean-l", "span", ("model.span_scaling=learnable",))]
    specs = {s.run_id: s for s in plan.expand({})}
    assert "model.placement=span_post" in specs["span-L2-dense-lr1e-3-s0"].overrides
    with pytest.raises(ConfigError, match="span_clean"):  # the same plan read with today's names
        parse_plan(_plan(None))
    with pytest.raises(ConfigError, match="plan.placement_names"):
        parse_plan(_plan(3))


def _v1_ledger(path, plan_v1: dict) -> None:
    """A ledger as the sweep wrote it before the rename: no ``placement_names`` anywhere, version 1's names in
    the stored specs and plan text."""
    plan = parse_plan(plan_v1)
    text = yaml.safe_dump({k: v for k, v in plan_v1.items() if k != "placement_names"})
    lines = [start_line(plan.name, text, {"time": 1.0, "finished_before": 0})]
    back = {"model.placement=span_post": "model.placement=span", "model.placement=span": "model.placement=span_clean",
            "model.span_scaling=learnable": "model.span_clean_scaling=learnable"}
    for spec in plan.expand({}):
        stored = spec.to_dict()
        del stored["placement_names"]
        stored["overrides"] = [back.get(o, o) for o in stored["overrides"]]
        summary = {"final_val_loss": 2.0 + spec.lr, "best_val_loss": 2.0, "diverged": False, "status": "completed"}
        lines.append(run_line(plan.name, stored, [], summary, [(3, 2.0)], [(1, 3.0)], None))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_ledger_written_before_the_rename_resumes_with_its_plan_and_refuses_a_reading_it_was_not(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    _v1_ledger(ledger, _plan(1))
    book = read_ledger(ledger)
    assert all("placement_names" not in line["spec"] for line in book.runs.values())
    check_ledger(parse_plan(_plan(1)), book, tmp_path / "out", None)  # the same runs: counted finished
    assert RunSpec.from_dict(book.runs["span-L2-dense-lr1e-3-s0"]["spec"]).overrides[-4:-3] == \
        ("model.placement=span_post",)
    # The plan edited to today's names, where its `span` means the clean reading: those runs were not that.
    today = _plan(2)
    today["grid"]["placements"][2] = {"name": "clean-l", "placement": "span",
                                      "overrides": ["model.span_scaling=learnable"]}
    with pytest.raises(ConfigError, match="span-L2-dense-lr.*other settings model.placement=span_post, now "
                                          "model.placement=span .*a plan written then says placement_names: 1"):
        check_ledger(parse_plan(today), book, tmp_path / "out", None)


def test_a_report_reads_a_plan_text_stored_before_the_rename_with_version_1_names(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    _v1_ledger(ledger, _plan(1))
    results = load_results([ledger])
    (sweep,) = results.sweeps
    assert sweep.plan.placement_names == 1 and results.base_placement("span") == "span_post"
    assert results.base_placement("clean-l") == "span"
    # A plan text stored at a start that records the key is read as it says.
    assert parse_plan_text(yaml.safe_dump(_plan(None) | {"grid": {**_plan(None)["grid"], "placements": ["pre"]},
                                                           "protocol": {"kind": "full"}}),
                           "text", 2).placement_names == PLACEMENT_NAMES


def test_a_report_header_names_each_plan_written_in_version_1_names(tmp_path):
    ledgers = []
    for name in ("first", "second"):
        ledgers.append(tmp_path / f"{name}.jsonl")
        _v1_ledger(ledgers[-1], _plan(1) | {"name": name})
    one = build_report(load_results(ledgers[:1]), tmp_path / "one").read_text()
    assert "Placement names: plan `first` is written in the names of before placement names 2." in one
    both = build_report(load_results(ledgers), tmp_path / "both").read_text()
    assert "Placement names: plans `first`, `second` are written in the names of before placement names 2." in both
    assert "a plan's `span` is today's `span_post`" in both


V1_BACK = {"placement": {"span_post": "span", "span": "span_clean"},
           "fields": {"span_post_scaling": "span_scaling", "span_post_alpha": "span_alpha",
                      "span_post_beta": "span_beta", "span_scaling": "span_clean_scaling"}}


def _as_version_1(model: dict) -> dict:
    """A model section as spannorm wrote it before placement names 2."""
    out = {}
    for key, value in model.items():
        if key == "placement_names":
            continue
        if key == "placement":
            value = V1_BACK["placement"].get(value, value)
        out[V1_BACK["fields"].get(key, key)] = value
    return out


def _rewrite_run_as_version_1(run) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": _as_version_1(config["model"])},
                                                    sort_keys=False))
    for ckpt in (run / "checkpoints").glob("step_*"):
        model_cfg = ckpt / "model_config.json"
        model_cfg.write_text(json.dumps(_as_version_1(json.loads(model_cfg.read_text()))))
        run_cfg = ckpt / "run_config.json"
        data = json.loads(run_cfg.read_text())
        run_cfg.write_text(json.dumps({**data, "model": _as_version_1(data["model"])}))
        names = json.loads((ckpt / "checksums.json").read_text())["files"]
        write_manifest(ckpt, list(names))


@pytest.mark.parametrize("placement", ["span", "span_post"])
def test_a_run_folder_written_before_the_rename_resumes_as_the_model_it_trained(placement, tmp_path):
    """``spannorm train --resume`` on a run whose config.yaml and checkpoints carry version 1's names continues
    the same model: the losses after resuming equal those of a run that never had the old names."""
    args = ["--preset", "tiny", f"--model.placement={placement}", "--model.n_layers=2", "--model.d_model=32",
            "--model.n_heads=2", "--model.context_length=16", "--train.batch_size=2", "--train.eval_every=2",
            "--train.eval_batches=1", "--train.progress=none", "--train.tensorboard=false",
            "--data.embedded_max_bytes=60000", f"--data.cache_dir={tmp_path / 'cache'}"]

    def train(out, *extra):
        proc = subprocess.run([sys.executable, "-m", "spannorm", "train", "--out", str(out), *args, *extra],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    def losses(out):
        return [json.loads(line).get("train_loss") for line in (out / "metrics.jsonl").read_text().splitlines()]

    for name in ("old", "new"):
        train(tmp_path / name, "--train.steps=2")
    _rewrite_run_as_version_1(tmp_path / "old")
    assert "placement_names" not in (tmp_path / "old" / "config.yaml").read_text()
    assert measure_run(tmp_path / "old", 2) == measure_run(tmp_path / "new", 2)  # the sweep's measuring reads it too
    for name in ("old", "new"):
        proc = subprocess.run([sys.executable, "-m", "spannorm", "train", "--resume", "--out", str(tmp_path / name),
                               "--train.steps=3"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert losses(tmp_path / "old") == losses(tmp_path / "new") and len(losses(tmp_path / "new")) >= 3
    assert yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())["model"]["placement"] == placement


def test_the_command_line_and_a_config_file_may_say_placement_names_1(tmp_path):
    """``--model.placement_names=1`` reads that command line's overrides with version 1's names; a config file
    that says it is read so, and the layers above it (overrides) use today's names."""
    cfg = resolve_config(None, None, ["model.placement_names=1", "model.placement=span_clean",
                                      "model.span_clean_scaling=learnable"])
    assert (cfg.model.placement, cfg.model.span_scaling) == ("span", "learnable")
    assert resolve_config(None, None, ["--model.placement_names=1", "model.placement=span"]).model.placement \
        == "span_post"
    path = tmp_path / "old.yaml"
    path.write_text("model: {placement_names: 1, placement: span, span_scaling: skip, span_alpha: 2.0}\n")
    cfg = resolve_config(None, path, ["model.span_scaling=learnable"]).model
    assert (cfg.placement, cfg.span_post_scaling, cfg.span_post_alpha, cfg.span_scaling) == \
        ("span_post", "skip", 2.0, "learnable")
    with pytest.raises(ConfigError, match="version 1's span_clean is span"):
        parse_plan({"grid": {"placements": [{"name": "x", "placement": "span_clean"}], "depths": [2]}})


def test_an_old_folder_run_copied_into_a_ledger_is_stored_in_todays_names(tmp_path):
    """A sweep folder from before the rename given a ledger: the line it copies from a run's ``run.json``
    carries that run's overrides in today's names, so the plan that made it still resumes from the ledger."""
    plan = parse_plan(_plan(1))
    spec = next(s for s in plan.expand({}) if s.run_id == "span-L2-dense-lr1e-3-s0")
    run_dir = tmp_path / "runs" / spec.run_id
    run_dir.mkdir(parents=True)
    old = spec.to_dict()
    del old["placement_names"]
    old["overrides"] = ["model.placement=span" if o == "model.placement=span_post" else o for o in old["overrides"]]
    (run_dir / "run.json").write_text(json.dumps(old))
    line = ledger_line_from_folder(spec, run_dir, plan.name, {"final_val_loss": 2.0, "diverged": False}, ())
    assert line["spec"]["placement_names"] == PLACEMENT_NAMES
    assert "model.placement=span_post" in line["spec"]["overrides"]
    assert "model.placement=span" not in line["spec"]["overrides"]


@pytest.mark.parametrize("where", ["config", "overrides", "variant"])
def test_a_plan_may_not_set_model_placement_names_below_its_top_level(where):
    data = _plan(None)
    data["grid"]["placements"][2] = {"name": "clean-l", "placement": "span",
                                     "overrides": ["model.span_scaling=learnable"]}
    if where == "config":
        data["base"]["config"]["model"]["placement_names"] = 1
    elif where == "overrides":
        data["base"]["overrides"] = ["model.placement_names=1"]
    else:
        data["grid"]["placements"][2]["overrides"].append("model.placement_names=1")
    with pytest.raises(ConfigError, match="the plan's top-level placement_names"):
        parse_plan(data)
    v1 = _plan(1)  # in a plan that says 1 at the top, the same key in its base config is dropped
    v1["base"]["config"]["model"]["placement_names"] = 1
    assert parse_plan(v1).placements[1].placement == "span_post"


def test_a_report_refuses_to_average_two_readings_under_one_name(tmp_path):
    old = tmp_path / "old.jsonl"
    _v1_ledger(old, _plan(1))
    new_plan = _plan(2)
    new_plan["grid"]["placements"] = ["pre", "span"]
    new_plan["protocol"] = {"kind": "full"}
    new = tmp_path / "new.jsonl"
    plan = parse_plan(new_plan)
    lines = [start_line(plan.name, yaml.safe_dump(new_plan), {"time": 2.0, "finished_before": 0,
                                                              "placement_names": 2})]
    new.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ConfigError, match="'span' runs span_post in .* and span in .*average two models"):
        load_results([old, new])


def test_the_tools_that_name_their_own_placements_refuse_a_placement_names_setting():
    for argv in (["profile", "--placements", "span", "--depths", "2", "--set", "placement_names=1"],
                 ["check", "span", "--depths", "2", "--steps", "0", "--set", "placement_names=1",
                  "--out", "unused"]):
        proc = subprocess.run([sys.executable, "-m", "spannorm", *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and "take today's placement names only" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_hand_written_config_folder_is_read_with_todays_names(tmp_path):
    """Only a run folder (checkpoints, a summary or metrics) is read as a saved config; a folder that just
    holds a config.yaml is a config file like any other."""
    (tmp_path / "config.yaml").write_text("model: {placement: span}\n")
    assert resolve_config(None, tmp_path).model.placement == "span"
    (tmp_path / "summary.json").write_text("{}")
    assert resolve_config(None, tmp_path).model.placement == "span_post"


def test_an_old_bench_report_renders_in_todays_names():
    spec = importlib.util.spec_from_file_location("bench_to_markdown", ROOT / "benchmarks" / "bench_to_markdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = {"meta": {"command": "spannorm bench --placements pre,span,span_clean --ffn dense"},
              "results": [{"name": "span/dense/eager/fp32", "placement": "span"},
                          {"name": "span_clean/dense/eager/fp32", "placement": "span_clean"}]}
    out = module.in_todays_names(report)
    assert [r["name"] for r in out["results"]] == ["span_post/dense/eager/fp32", "span/dense/eager/fp32"]
    assert out["meta"]["command"] == "spannorm bench --placements pre,span_post,span --ffn dense"
    new = {"meta": {"command": "spannorm bench --placements span", "placement_names": 2},
           "results": [{"name": "span/dense/eager/fp32", "placement": "span"}]}
    assert module.in_todays_names(json.loads(json.dumps(new))) == new
