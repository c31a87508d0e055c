"""``spannorm check``: the verdicts at init match SPEC §5, user blocks load by module path and run end to end,
report.json validates against its schema, and bad input fails cleanly."""

from __future__ import annotations

import json
import textwrap

import jsonschema
import pytest

from spannorm.cli.main import main
from spannorm.diagnostics.check import CheckSettings, run_check
from spannorm.diagnostics.report import load_schema

SMALL = dict(steps=0, suggest=False, seq_len=32, batch_size=4)  # init only: SPEC §5 is about init


def _verdicts(target: str, depths: list[int], **overrides) -> dict:
    run = run_check([target], CheckSettings(depths=depths, model_overrides=overrides, **SMALL))
    return {v.check: v for v in run.results[0].verdicts}


def test_pre_with_unscaled_output_projections_grows_linearly_or_faster():
    v = _verdicts("pre", [4, 8, 16], scale_out_proj=False)["forward"]
    assert v.label.split()[0] in ("linear", "quadratic", "exponential")
    assert v.status == "warn"  # Var(x_L)/Var(x_0) ≈ 15 at L = 16, beyond the band, and no weight-free bound


def test_post_gradient_profile_is_depth_unstable():
    verdicts = _verdicts("post", [4, 8, 16, 32])
    assert verdicts["gradient"].status == "unstable"
    assert verdicts["gradient"].label.startswith("depth-unstable")
    assert verdicts["forward"].label.startswith("constant")  # every stream has unit RMS
    assert verdicts["identity path"].status == "warn"


def test_residual_x_stream_is_post_ln_and_its_dual_stream_grows_like_pre():
    """ResiDual at init: its x stream is Post-LN's (unit RMS, and the gradient at x grows toward the input as
    post's does, by at least as much: d's gradient joins at every branch); d carries no norm until the head
    (identity path unscaled) and grows about linearly, which the forward verdict reports without judging."""
    verdicts = _verdicts("residual", [4, 8, 16, 32])
    assert verdicts["forward"].status == "ok" and verdicts["forward"].label.startswith("constant")
    assert "dual stream d" in verdicts["forward"].detail and "init: linear" in verdicts["forward"].detail
    assert verdicts["gradient"].status == "unstable" and verdicts["gradient"].label.startswith("depth-unstable")
    assert verdicts["identity path"].status == "ok" and verdicts["identity path"].label == "no norm on skip"
    post = _verdicts("post", [4, 8, 16, 32])
    per_block = [float(v["gradient"].label.split("×")[1].split("/")[0]) for v in (verdicts, post)]
    assert per_block[0] >= per_block[1]


def test_peri_bound_holds():
    verdicts = _verdicts("peri", [4, 8])
    assert verdicts["peri bound"].status == "ok" and verdicts["peri bound"].label == "holds"
    assert verdicts["forward"].status == "ok"  # grows, but within the weight-free bound


def test_span_is_bounded_forward_with_a_depth_independent_gradient_ratio():
    verdicts = _verdicts("span_post", [4, 8, 16])
    assert verdicts["forward"].status == "ok" and verdicts["forward"].label.startswith("constant")
    assert verdicts["gradient"].status == "ok" and verdicts["gradient"].label == "depth-independent"


@pytest.mark.parametrize("scaling", ["fixed", "learnable"])
def test_span_clean_is_bounded_with_a_clean_skip_and_a_depth_independent_gradient_ratio(scaling):
    """SPEC §9 at init: Var(x_L)/Var(x_0) ≈ 2 at every depth, no norm on the skip, its weight-free bound holds."""
    verdicts = _verdicts("span", [4, 8, 16], span_scaling=scaling)
    assert verdicts["forward"].status == "ok"
    assert float(verdicts["forward"].label.split()[1].lstrip("×")) == pytest.approx(2.0, rel=0.1)  # 1 + Δt²
    assert verdicts["gradient"].status == "ok" and verdicts["gradient"].label == "depth-independent"
    assert verdicts["identity path"].label == "no norm on skip"
    assert verdicts["peri bound"].status == "ok" and verdicts["peri bound"].label == "holds"


BLOCKS_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class Doubling(nn.Module):
        """No normalization; the residual doubles at every block: x -> 2x + 0.1·tanh(Wx)."""

        def __init__(self, d_model):
            super().__init__()
            self.lin = nn.Linear(d_model, d_model)

        def forward(self, x):
            return 2 * x + 0.1 * torch.tanh(self.lin(x))


    class Overflowing(nn.Module):
        def forward(self, x):
            return x * float("inf")


    def doubling(d_model, n_heads, layer_index, n_layers):
        return Doubling(d_model)


    def overflowing(d_model, n_heads, layer_index, n_layers):
        return Overflowing()


    def wrong_shape(d_model, n_heads, layer_index, n_layers):
        return nn.Linear(d_model, 2 * d_model)
''')


@pytest.fixture
def user_blocks(tmp_path, monkeypatch):
    """A module of test blocks, importable as ``user_blocks_for_check``."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "user_blocks_for_check.py").write_text(BLOCKS_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(__import__("sys").modules, "user_blocks_for_check", raising=False)
    return "user_blocks_for_check"


CLI_SMALL = ["--d-model", "32", "--n-heads", "2", "--seq-len", "16", "--batch-size", "2", "--quiet"]


def test_user_block_with_doubled_residual_is_flagged_exponential(user_blocks):
    run = run_check([f"{user_blocks}:doubling"], CheckSettings(depths=[4, 8], **SMALL))
    verdicts = {v.check: v for v in run.results[0].verdicts}
    assert verdicts["forward"].label.startswith("exponential") and verdicts["forward"].status == "unstable"
    assert run.results[0].overall == "unstable"


def test_user_block_by_module_path_end_to_end(user_blocks, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["check", f"{user_blocks}:doubling", "--depths", "2,4", "--steps", "3", "--out", str(out),
               "--strict", *CLI_SMALL])
    assert rc == 1  # --strict: the exponential growth is unstable
    printed = capsys.readouterr().out
    assert "forward" in printed and "UNSTABLE" in printed and f"{user_blocks}:doubling" in printed
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    target = report["targets"][0]
    assert target["kind"] == "custom" and [d["n_layers"] for d in target["depths"]] == [2, 4]
    trained = target["depths"][1]
    assert trained["training"]["steps"] == 3 and trained["trained"] is not None
    assert trained["prediction"] is None and trained["init"]["identity_product"] is None
    for name in target["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(target["plots"]) == 3
    assert "| forward | unstable |" in (out / "report.md").read_text()


def test_placement_report_validates_and_carries_theory_and_training(tmp_path, capsys):
    out = tmp_path / "span_post"
    rc = main(["check", "span_post", "peri", "--depths", "2,4", "--steps", "4", "--out", str(out), "--strict",
               *CLI_SMALL])
    assert rc == 0  # span and peri have no unstable verdict at these depths
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    span, peri = report["targets"]
    depth = span["depths"][1]
    assert depth["prediction"]["identity_product"] == pytest.approx(depth["init"]["identity_product"], rel=0.2)
    assert depth["suggestion"]["knob"] == "alpha" and depth["model_config"]["n_layers"] == 4
    training = depth["training"]
    clip = report["settings"]["clip"]
    assert training["clip_fraction"] == pytest.approx(sum(g > clip for g in training["grad_norms"]) / 4)
    assert {v["check"] for v in peri["verdicts"]} >= {"peri bound", "fp16", "bf16", "attention logits",
                                                      "clipping", "training"}
    assert "summary" in capsys.readouterr().out  # two targets: a summary table


def test_schema_rejects_a_malformed_report(tmp_path):
    out = tmp_path / "r"
    assert main(["check", "pre", "--depths", "2", "--steps", "0", "--out", str(out), "--no-suggest",
                 *CLI_SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    report["targets"][0]["verdicts"][0]["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, load_schema())


def test_overflowing_block_is_reported_not_crashed(user_blocks, tmp_path):
    out = tmp_path / "inf"
    rc = main(["check", f"{user_blocks}:overflowing", "--depths", "2", "--steps", "2", "--out", str(out),
               "--strict", *CLI_SMALL])
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    verdicts = {v["check"]: v for v in report["targets"][0]["verdicts"]}
    assert verdicts["training"]["label"] == "diverged" and verdicts["fp16"]["label"] == "overflow"
    assert report["targets"][0]["depths"][0]["training"]["diverged_step"] == 1


@pytest.mark.parametrize("args,message", [
    (["nonsense"], "neither a placement"),
    (["pre", "--set", "bogus_field=1"], "bogus_field"),
    (["pre", "--set", "n_heads=5"], "n_heads"),
    (["{blocks}:wrong_shape"], "must map (B, T, d)"),
    (["{blocks}:missing"], "no attribute"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, user_blocks, tmp_path, capsys):
    out = tmp_path / "never"
    args = [a.format(blocks=user_blocks) for a in args]
    rc = main(["check", *args, "--depths", "2", "--steps", "0", "--out", str(out), *CLI_SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("spannorm: error:") and message in err[0]
    assert not out.exists()


def test_existing_report_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text("{}")
    rc = main(["check", "pre", "--depths", "2", "--steps", "0", "--out", str(out), *CLI_SMALL])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "report.json").read_text() == "{}"
