"""Bad input through the command line, table-driven: every case must exit 2 with exactly one line on stderr,
no traceback, and leave the folder exactly as it was (a snapshot of every file before and after).

Cases run in-process through :func:`spannorm.cli.main.main` (fast); a few run as a real ``python -m
spannorm`` subprocess. Each case fails before any training starts.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spannorm.cli.main import main
from spannorm.config import ConfigError, ModelConfig
from spannorm.model.io import save_model
from spannorm.model.transformer import DecoderLM
from spannorm.train import checkpoint as ckpt_io
from spannorm.train.config import resolve_config

TEXT = (inspect.getsource(json.decoder) + inspect.getsource(textwrap)).encode()
SRC = str(Path(__file__).resolve().parents[1] / "src")
NEEDS: dict[str, str] = {}
"""Cases waiting for a change elsewhere (id: what they need), run as expected failures; empty since every
branch of issue 17 was merged."""


# ---------------------------------------------------------------------- the world the cases run in
def _tiny_cfg(**extra) -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, context_length=32, vocab_size=256, **extra)


def _write_run(run: Path, steps: tuple[int, ...], corpus: Path, cache: Path) -> None:
    """A run folder as ``spannorm train`` leaves it, written directly (no training)."""
    overrides = [f"data.path={corpus}", f"data.cache_dir={cache}", "model.d_model=32", "model.n_layers=2",
                 "model.n_heads=2", "model.context_length=32", "model.vocab_size=256", "train.steps=6",
                 "train.progress=none", "train.tensorboard=false"]
    cfg = resolve_config(None, None, overrides)
    model = DecoderLM(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, max(steps) + 1)))
    for step in steps:
        state = {"step": step, "tokens": 0, "sampler": {}, "spike_history": {"loss": [], "grad_norm": []},
                 "rng": ckpt_io.rng_states()}
        ckpt_io.save_checkpoint(run, step, model, optimizer, state, cfg.to_dict(), keep=5)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    cache = root.parent / "cache"  # outside the snapshot: the token cache may be filled
    cache.mkdir()
    (root / "corpus.txt").write_bytes(TEXT)
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "empty").mkdir()
    save_model(DecoderLM(_tiny_cfg()), root / "model")
    _write_run(root / "run", (2, 4), root / "corpus.txt", cache)
    shutil.copytree(root / "run", root / "corrupt_run")
    (root / "corrupt_run" / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"\x00" * 100)
    shutil.copytree(root / "model", root / "bad_json_model")
    (root / "bad_json_model" / "model_config.json").write_text("{not json")
    shutil.copytree(root / "model", root / "unknown_field_model")
    (root / "unknown_field_model" / "model_config.json").write_text(json.dumps({"d_model": 32, "bogus": 1}))
    # as a folder from before checksums: the field check speaks
    (root / "unknown_field_model" / "checksums.json").unlink()
    (root / "no_ckpt_run").mkdir()
    (root / "no_ckpt_run" / "config.yaml").write_text("model: {}\n")
    # HF-style folders for import-hf
    (root / "hf_noconfig").mkdir()
    (root / "hf_badjson").mkdir()
    (root / "hf_badjson" / "config.json").write_text("{")
    (root / "hf_zero").mkdir()
    (root / "hf_zero" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 0, "num_hidden_layers": 0, "num_attention_heads": 0,
        "intermediate_size": 0, "vocab_size": 0}))
    save_file({"model.embed_tokens.weight": torch.zeros(1, 1)}, str(root / "hf_zero" / "model.safetensors"))
    (root / "hf_list").mkdir()
    (root / "hf_list" / "config.json").write_text("[1, 2, 3]")
    # YAML configs
    (root / "bad.yaml").write_text("model: {d_model: [\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "unknown_section.yaml").write_text("modle: {d_model: 32}\n")
    # sweep plans
    base = {"name": "p", "base": {"config": {"model": {"d_model": 32, "n_heads": 2, "context_length": 32},
                                             "data": {"path": str(root / "corpus.txt"), "cache_dir": str(cache)},
                                             "train": {"steps": 2}}},
            "grid": {"placements": ["pre"], "depths": [2], "lrs": [1e-3], "seeds": [0]}}

    def plan(file_name: str, **changes) -> None:
        data = json.loads(json.dumps(base))
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split("__")
            for key in parents:
                node = node.setdefault(key, {})
            if value is DELETE:
                node.pop(last)
            else:
                node[last] = value
        (root / f"plan_{file_name}.yaml").write_text(json.dumps(data).replace('".nan"', ".nan"))

    plan("ok")
    plan("variant_placement", grid__placements=[{"name": "span", "placement": "span",
                                                  "overrides": ["model.placement=pre"]}])
    plan("variant_layers", grid__placements=[{"name": "span", "placement": "span",
                                               "overrides": ["model.n_layers=12"]}])
    plan("variant_seed", grid__placements=[{"name": "span", "placement": "span", "overrides": ["train.seed=7"]}])
    plan("variant_lr", grid__placements=[{"name": "span", "placement": "span", "overrides": ["optim.lr=1"]}])
    plan("ffn_layers", grid__ffn={"dense": ["model.n_layers=3"]})
    plan("base_seed", base__overrides=["train.seed=3"])
    plan("dup_lrs", grid__lrs=[1e-3, 1e-3])
    plan("dup_seeds", grid__seeds=[0, 0])
    plan("no_grid", grid=DELETE)
    plan("unknown_key", grids={})
    plan("bad_placement", grid__placements=["nope"])
    plan("neg_lr", grid__lrs=[-1e-3])
    plan("nan_lr", grid__lrs=[".nan"])
    plan("zero_depth", grid__depths=[0])
    plan("neg_seed", grid__seeds=[-1])
    plan("bad_override", base__overrides=["model.d_model=abc"])
    plan("unknown_override", base__overrides=["model.nope=1"])
    plan("bad_protocol", protocol={"kind": "magic"})
    plan("shared_lr_not_in_grid", protocol={"kind": "lr_search", "shared_lr": 5.0})
    plan("other_name", name="another")
    (root / "plan_bad_yaml.yaml").write_text("grid: [\n")
    (root / "plan_list.yaml").write_text("- a\n")
    # sweep folders for report and sweep
    sweep = root / "sweep"
    sweep.mkdir()
    shutil.copy(root / "plan_ok.yaml", sweep / "plan.yaml")
    record = {"run_id": "pre-L2-dense-lr1e-3-s0", "placement": "pre", "depth": 2, "ffn": "dense", "lr": 1e-3,
              "seed": 0, "stage": "grid", "preset": None, "status": "done", "final_val_loss": 5.0,
              "best_val_loss": 5.0, "diverged": False, "diverged_step": None, "steps": 2, "tokens": 1,
              "wall_s": 1.0, "tokens_per_s": 1.0}
    (sweep / "index.json").write_text(json.dumps({"plan": "p", "runs": [record]}))
    (sweep / "report").mkdir()
    (sweep / "report" / "report.md").write_text("# an earlier report\n")
    shutil.copytree(sweep, root / "sweep_corrupt_index")
    (root / "sweep_corrupt_index" / "index.json").write_text('{"runs": [')
    shutil.copytree(sweep, root / "sweep_bad_plan")
    (root / "sweep_bad_plan" / "plan.yaml").write_text("grid: [\n")
    shutil.copytree(sweep, root / "sweep_empty")
    (root / "sweep_empty" / "index.json").write_text(json.dumps({"plan": "p", "runs": []}))
    # check: user modules
    (root / "blocks").mkdir()
    (root / "blocks" / "raising_blocks.py").write_text(
        "def factory(d_model, n_heads, layer_index, n_layers):\n    raise RuntimeError('boom')\n")
    (root / "blocks" / "broken_blocks.py").write_text("def factory(:\n")
    (root / "blocks" / "shape_blocks.py").write_text(
        "import torch\n\ndef factory(d_model, n_heads, layer_index, n_layers):\n"
        "    return torch.nn.Linear(d_model, d_model + 1)\n")
    (root / "cwd_blocks.py").write_text("raise SystemExit(9)  # must never run: the working folder is not searched\n")
    (root / "existing_report").mkdir()
    (root / "existing_report" / "report.json").write_text("{}")
    (root / "hf_out_exists").mkdir()
    (root / "hf_out_exists" / "config.json").write_text("{}")
    (root / "bench_out").mkdir()
    return root


class _Delete:
    pass


DELETE = _Delete()


def tiny(w: str) -> list[str]:
    return [f"--data.path={w}/corpus.txt", "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2",
            "--model.context_length=32", "--train.steps=2", "--train.progress=none", "--train.tensorboard=false"]


# ---------------------------------------------------------------------- the cases
# (id, argv with {w} for the world folder, a piece the one line must contain, or None)
T = ("train --out {w}/new_run --data.path={w}/corpus.txt --data.cache_dir={c} --model.d_model=32 --model.n_layers=2 "
     "--model.n_heads=2 --model.context_length=32 --train.steps=1 --train.batch_size=2 --train.eval_batches=1 "
     "--train.progress=none --train.tensorboard=false")
"""Small enough that a case which is wrongly accepted trains for a second, not minutes."""
CASES: list[tuple[str, str, str | None]] = [
    # train: overrides and config files
    ("train-unknown-section", T + " --modle.d_model=32", "modle"),
    ("train-unknown-field", T + " --model.d_modle=32", "d_modle"),
    ("train-override-no-value", T + " --model.d_model", "no value"),
    ("train-positional-junk", T + " junk", "junk"),
    ("train-unknown-option", T + " --frobnicate", "frobnicate"),
    ("train-bad-int", T + " --model.d_model=abc", "d_model"),
    ("train-float-for-int", T + " --model.n_layers=2.5", "n_layers"),
    ("train-negative-layers", T + " --model.n_layers=-1", "n_layers"),
    ("train-zero-heads", T + " --model.n_heads=0", "n_heads"),
    ("train-heads-not-dividing", T + " --model.d_model=30 --model.n_heads=4", None),
    ("train-unknown-placement", T + " --model.placement=sideways", "placement"),
    ("train-lr-nan", T + " --optim.lr=nan", "lr"),
    ("train-lr-inf", T + " --optim.lr=inf", "lr"),
    ("train-lr-negative", T + " --optim.lr=-1e-3", "lr"),
    ("train-beta-above-one", T + " --optim.beta1=1.5", "beta1"),
    ("train-clip-nan", T + " --optim.grad_clip=nan", "grad_clip"),
    ("train-weight-decay-inf", T + " --optim.weight_decay=inf", "weight_decay"),
    ("train-span-alpha-inf", T + " --model.span_alpha=inf", "span_alpha"),
    ("train-span-beta-nan", T + " --model.span_beta=nan", "span_beta"),
    ("train-embed-scale-inf", T + " --model.embed_scale=inf", "embed_scale"),
    ("train-balance-coef-inf", T + " --model.moe.n_experts=4 --model.moe.balance_coef=inf", "balance_coef"),
    ("train-z-loss-coef-nan", T + " --model.moe.n_experts=4 --model.moe.z_loss_coef=nan", "z_loss_coef"),
    ("train-seed-2-63", T + " --train.seed=9223372036854775808", "seed"),
    ("train-seed-negative", T + " --train.seed=-1", "seed"),
    ("train-batch-size-zero", T + " --train.batch_size=0", "batch_size"),
    ("train-batch-size-1e8", T + " --train.batch_size=100000000", "batch_size"),
    ("train-steps-zero", T + " --train.steps=0", "steps"),
    ("train-grad-accum-zero", T + " --train.grad_accum=0", "grad_accum"),
    ("train-precision-bogus", T + " --train.precision=fp7", "precision"),
    ("train-progress-bogus", T + " --train.progress=loud", "progress"),
    ("train-device-bogus", T + " --train.device=tpu", "device"),
    ("train-missing-preset", T + " --preset no-such-preset", "no-such-preset"),
    ("train-missing-config", T + " --config {w}/nope.yaml", "nope.yaml"),
    ("train-bad-yaml-config", T + " --config {w}/bad.yaml", "bad.yaml"),
    ("train-list-config", T + " --config {w}/list.yaml", "list.yaml"),
    ("train-unknown-section-config", T + " --config {w}/unknown_section.yaml", "modle"),
    ("train-missing-data-path", T + " --data.path={w}/no_such_corpus.txt", "no_such_corpus"),
    ("train-cache-dir-is-file", T + " --data.cache_dir={w}/a_file.txt", "cache_dir"),
    ("train-context-too-long", T + " --model.context_length=100000", None),
    # train: the run folder
    ("train-out-is-file", "train --out {w}/a_file.txt", "a_file.txt"),
    ("train-existing-run", "train --out {w}/run", "already holds"),
    ("train-resume-and-overwrite", "train --out {w}/run --resume --overwrite", "exclude"),
    ("train-resume-empty-folder", "train --out {w}/empty --resume", "no run to continue"),
    ("train-resume-missing-folder", "train --out {w}/no_such_run --resume", "no run to continue"),
    ("train-use-intact-without-resume", "train --out {w}/new_run --use-intact", "--use-intact"),
    ("train-resume-corrupt", "train --out {w}/corrupt_run --resume", "step_00000002"),
    ("train-resume-changed-architecture", "train --out {w}/run --resume --model.n_layers=3", "n_layers"),
    ("train-init-from-missing", T + " --init-from {w}/no_such_model", "no_such_model"),
    ("train-init-from-corrupt", T + " --init-from {w}/corrupt_run", "step_00000002"),
    ("train-init-from-bad-json", T + " --init-from {w}/bad_json_model", "model_config.json"),
    ("train-init-from-file", T + " --init-from {w}/a_file.txt", "a_file.txt"),
    # eval
    ("eval-missing", "eval {w}/no_such_run", "no_such_run"),
    ("eval-empty-folder", "eval {w}/empty", "empty"),
    ("eval-no-checkpoint-run", "eval {w}/no_ckpt_run", "no_ckpt_run"),
    ("eval-corrupt", "eval {w}/corrupt_run", "step_00000002"),
    ("eval-corrupt-step-folder", "eval {w}/corrupt_run/checkpoints/step_00000004", "step_00000002"),
    ("eval-bad-model-json", "eval {w}/bad_json_model", "model_config.json"),
    ("eval-unknown-model-field", "eval {w}/unknown_field_model", "model_config.json' is corrupt: model.bogus"),
    ("eval-batch-size-zero", "eval {w}/model --batch-size 0", "batch-size"),
    ("eval-max-batches-negative", "eval {w}/model --max-batches -1", "max-batches"),
    ("eval-batch-size-not-int", "eval {w}/model --batch-size many", "batch-size"),
    ("eval-model-override", "eval {w}/model --model.n_layers=3", "data."),
    ("eval-unknown-split", "eval {w}/model --split test", "split"),
    ("eval-device-bogus", "eval {w}/model --device tpu", "device"),
    ("eval-missing-data", "eval {w}/model --data.path={w}/no_such_corpus.txt", "no_such_corpus"),
    ("eval-tasks-empty", "eval {w}/model --tasks ' , '", "--tasks"),
    ("eval-tasks-include-path-missing", "eval {w}/model --tasks t --include-path {w}/no_such_tasks", "include-path"),
    ("eval-tasks-fewshot-negative", "eval {w}/model --tasks t --num-fewshot -1", "num-fewshot"),
    ("eval-tasks-limit-zero", "eval {w}/model --tasks t --limit 0", "limit"),
    ("eval-tasks-with-override", "eval {w}/model --tasks t --data.path={w}/a_file.txt", "not allowed with --tasks"),
    # generate
    ("generate-missing", "generate {w}/no_such_run", "no_such_run"),
    ("generate-corrupt", "generate {w}/corrupt_run", "step_00000002"),
    ("generate-bad-model-json", "generate {w}/bad_json_model", "model_config.json"),
    ("generate-temperature-negative", "generate {w}/model --temperature -1", "temperature"),
    ("generate-temperature-nan", "generate {w}/model --temperature nan", "temperature"),
    ("generate-temperature-inf", "generate {w}/model --temperature inf", "temperature"),
    ("generate-top-k-negative", "generate {w}/model --top-k -1", "top-k"),
    ("generate-max-new-negative", "generate {w}/model --max-new-tokens -1", "max-new-tokens"),
    ("generate-empty-prompt", "generate {w}/model --prompt ''", "prompt"),
    ("generate-seed-not-int", "generate {w}/model --seed x", "seed"),
    ("generate-top-p-zero", "generate {w}/model --top-p 0", "top-p"),
    ("generate-top-p-above-1", "generate {w}/model --top-p 1.5", "top-p"),
    ("generate-num-samples-zero", "generate {w}/model -n 0", "num-samples"),
    ("generate-stop-token-out-of-vocab", "generate {w}/model --stop-token 999", "stop-token"),
    ("generate-batch-size-zero", "generate {w}/model --batch-size 0", "batch-size"),
    # check
    ("check-unknown-target", "check sideways --out {w}/chk", "sideways"),
    ("check-missing-module", "check no_such_module:factory --out {w}/chk", "no_such_module"),
    ("check-cwd-module-not-imported", "check cwd_blocks:factory --out {w}/chk", "cwd_blocks"),
    ("check-factory-raises", "check raising_blocks:factory --path {w}/blocks --out {w}/chk --steps 0", "boom"),
    ("check-module-syntax-error", "check broken_blocks:factory --path {w}/blocks --out {w}/chk", "broken_blocks"),
    ("check-block-wrong-shape", "check shape_blocks:factory --path {w}/blocks --out {w}/chk --steps 0", "block 0"),
    ("check-missing-attr", "check raising_blocks:nothing --path {w}/blocks --out {w}/chk", "nothing"),
    ("check-path-not-folder", "check span --path {w}/a_file.txt --out {w}/chk", "--path"),
    ("check-depths-zero", "check span --depths 0 --out {w}/chk", "depths"),
    ("check-depths-text", "check span --depths a,b --out {w}/chk", "depths"),
    ("check-out-is-file", "check span --out {w}/a_file.txt", "a_file.txt"),
    ("check-existing-report", "check span --out {w}/existing_report", "already holds a report"),
    ("check-threads-zero", "check span --threads 0 --out {w}/chk --steps 0 --depths 2", "threads"),
    ("check-weight-decay-inf", "check span --weight-decay inf --out {w}/chk --steps 0 --depths 2", "weight-decay"),
    ("check-seed-2-64", "check span --seed 18446744073709551616 --out {w}/chk --steps 0 --depths 2", "--seed"),
    ("check-lr-nan", "check span --lr nan --out {w}/chk --steps 0 --depths 2", "lr"),
    ("check-band-inf", "check span --band inf --out {w}/chk --steps 0 --depths 2", "band"),
    ("check-set-unknown-field", "check span --set bogus=1 --out {w}/chk --depths 2", "bogus"),
    ("check-set-no-equals", "check span --set bogus --out {w}/chk --depths 2", "KEY=VALUE"),
    ("check-set-malformed-yaml", "check span --set d_model=[ --out {w}/chk --depths 2", "d_model"),
    ("check-set-bad-type", "check span --set d_model=abc --out {w}/chk --depths 2", "d_model"),
    ("check-set-on-user-block", "check raising_blocks:factory --path {w}/blocks --set d_model=32 --out {w}/chk",
     None),
    ("check-device-bogus", "check span --device tpu --out {w}/chk", "device"),
    # profile
    ("profile-unknown-placement", "profile --placements sideways --depths 2", "sideways"),
    ("profile-depths-zero", "profile --depths 0", "depths"),
    ("profile-format-bogus", "profile --format xml", "format"),
    ("profile-set-unknown-field", "profile --placements span --depths 2 --set bogus=1", "bogus"),
    ("profile-set-malformed-yaml", "profile --placements span --depths 2 --set d_model=[", "d_model"),
    ("profile-set-bad-type", "profile --placements span --depths 2 --set d_model=abc", "d_model"),
    ("profile-d-model-text", "profile --d-model big", "d-model"),
    # sweep
    ("sweep-missing-plan", "sweep {w}/no_plan.yaml --out {w}/sw", "no_plan.yaml"),
    ("sweep-bad-yaml", "sweep {w}/plan_bad_yaml.yaml --out {w}/sw", "plan_bad_yaml.yaml"),
    ("sweep-plan-list", "sweep {w}/plan_list.yaml --out {w}/sw", "plan_list.yaml"),
    ("sweep-no-grid", "sweep {w}/plan_no_grid.yaml --out {w}/sw", "plan_no_grid.yaml"),
    ("sweep-unknown-key", "sweep {w}/plan_unknown_key.yaml --out {w}/sw", "grids"),
    ("sweep-bad-placement", "sweep {w}/plan_bad_placement.yaml --out {w}/sw", "nope"),
    ("sweep-variant-overrides-placement", "sweep {w}/plan_variant_placement.yaml --out {w}/sw", "model.placement"),
    ("sweep-variant-overrides-layers", "sweep {w}/plan_variant_layers.yaml --out {w}/sw", "model.n_layers"),
    ("sweep-variant-overrides-seed", "sweep {w}/plan_variant_seed.yaml --out {w}/sw", "train.seed"),
    ("sweep-variant-overrides-lr", "sweep {w}/plan_variant_lr.yaml --out {w}/sw", "optim.lr"),
    ("sweep-ffn-overrides-layers", "sweep {w}/plan_ffn_layers.yaml --out {w}/sw", "model.n_layers"),
    ("sweep-base-overrides-seed", "sweep {w}/plan_base_seed.yaml --out {w}/sw", "train.seed"),
    ("sweep-duplicate-lrs", "sweep {w}/plan_dup_lrs.yaml --out {w}/sw", "grid.lrs"),
    ("sweep-duplicate-seeds", "sweep {w}/plan_dup_seeds.yaml --out {w}/sw", "grid.seeds"),
    ("sweep-negative-lr", "sweep {w}/plan_neg_lr.yaml --out {w}/sw", "lrs"),
    ("sweep-nan-lr", "sweep {w}/plan_nan_lr.yaml --out {w}/sw", "lrs"),
    ("sweep-zero-depth", "sweep {w}/plan_zero_depth.yaml --out {w}/sw", "depths"),
    ("sweep-negative-seed", "sweep {w}/plan_neg_seed.yaml --out {w}/sw", "seeds"),
    ("sweep-bad-override", "sweep {w}/plan_bad_override.yaml --out {w}/sw", "d_model"),
    ("sweep-unknown-override", "sweep {w}/plan_unknown_override.yaml --out {w}/sw", "nope"),
    ("sweep-bad-protocol", "sweep {w}/plan_bad_protocol.yaml --out {w}/sw", "magic"),
    ("sweep-shared-lr-not-in-grid", "sweep {w}/plan_shared_lr_not_in_grid.yaml --out {w}/sw", "shared_lr"),
    ("sweep-workers-negative", "sweep {w}/plan_ok.yaml --out {w}/sw --workers -1", "workers"),
    ("sweep-workers-word", "sweep {w}/plan_ok.yaml --out {w}/sw --workers many", "allowed: auto"),
    ("sweep-threads-negative", "sweep {w}/plan_ok.yaml --out {w}/sw --threads -1", "threads"),
    ("sweep-max-runs-zero", "sweep {w}/plan_ok.yaml --out {w}/sw --max-runs 0", "max-runs"),
    ("sweep-order-bogus", "sweep {w}/plan_ok.yaml --out {w}/sw --order random", "order"),
    ("sweep-out-is-file", "sweep {w}/plan_ok.yaml --out {w}/a_file.txt", "a_file.txt"),
    ("sweep-corrupt-index", "sweep {w}/plan_ok.yaml --out {w}/sweep_corrupt_index", "index.json"),
    ("sweep-other-plan-into-folder", "sweep {w}/plan_other_name.yaml --out {w}/sweep", "belongs to plan"),
    ("sweep-dry-run-corrupt-index", "sweep {w}/plan_ok.yaml --out {w}/sweep_corrupt_index --dry-run",
     "index.json"),
    # report
    ("report-not-a-sweep", "report {w}/empty", "not a sweep directory"),
    ("report-missing", "report {w}/no_such_sweep", "no_such_sweep"),
    ("report-existing-report", "report {w}/sweep", "already holds a report"),
    ("report-out-is-file", "report {w}/sweep --out {w}/a_file.txt", "a_file.txt"),
    ("report-corrupt-index", "report {w}/sweep_corrupt_index --out {w}/rep", "index.json"),
    ("report-bad-plan", "report {w}/sweep_bad_plan --out {w}/rep", "plan.yaml"),
    ("report-no-finished-run", "report {w}/sweep_empty --out {w}/rep", "no finished run"),
    # bench
    ("bench-unknown-placement", "bench --placements sideways", "sideways"),
    ("bench-unknown-ffn", "bench --ffn sparse", "sparse"),
    ("bench-steps-zero", "bench --steps 0", "steps"),
    ("bench-rounds-above-steps", "bench --steps 2 --rounds 5", "rounds"),
    ("bench-threads-zero", "bench --threads 0", "threads"),
    ("bench-peak-negative", "bench --peak-tflops -1", "peak-tflops"),
    ("bench-device-bogus", "bench --device tpu", "device"),
    ("bench-size-bogus", "bench --size huge", "size"),
    ("bench-out-exists", "bench --out {w}/a_file.txt", "a_file.txt"),
    ("bench-out-parent-missing", "bench --out {w}/no_dir/report.json", "no_dir"),
    ("bench-out-is-dir-overwrite", "bench --out {w}/bench_out --overwrite --placements pre --d-model 16 --n-layers 1 "
     "--n-heads 2 --seq-len 8 --batch-size 1 --steps 1 --rounds 1 --warmup 1 --reference off", "bench_out"),
    # import-hf / export-hf
    ("import-hf-missing", "import-hf {w}/no_such_hf --out {w}/imp", "no_such_hf"),
    ("import-hf-no-config", "import-hf {w}/hf_noconfig --out {w}/imp", "config.json"),
    ("import-hf-bad-json", "import-hf {w}/hf_badjson --out {w}/imp", "config.json"),
    ("import-hf-config-list", "import-hf {w}/hf_list --out {w}/imp", "config.json"),
    ("import-hf-zero-config", "import-hf {w}/hf_zero --out {w}/imp", "config.json"),
    ("import-hf-out-is-file", "import-hf {w}/hf_zero --out {w}/a_file.txt", None),
    ("import-hf-context-zero", "import-hf {w}/hf_zero --out {w}/imp --context-length 0", None),
    ("export-hf-missing", "export-hf {w}/no_such_model --out {w}/exp", "no_such_model"),
    ("export-hf-corrupt", "export-hf {w}/corrupt_run --out {w}/exp", "step_00000002"),
    ("export-hf-bad-json", "export-hf {w}/bad_json_model --out {w}/exp", "model_config.json"),
    ("export-hf-out-exists", "export-hf {w}/model --out {w}/hf_out_exists", "hf_out_exists"),
    ("export-hf-bad-dtype", "export-hf {w}/model --out {w}/exp --dtype int8", "dtype"),
    ("export-hf-bad-shard-size", "export-hf {w}/model --out {w}/exp --max-shard-size lots", "shard"),
    # the top level
    ("unknown-command", "frobnicate", "frobnicate"),
    ("train-without-out", "train", "--out"),
]
SUBPROCESS_CASES = {"train-lr-nan", "eval-corrupt", "sweep-variant-overrides-placement",
                    "check-cwd-module-not-imported", "report-existing-report", "generate-prompt-not-utf8"}
"""Cases also run as a real ``python -m spannorm`` process (the working folder is the world folder)."""


def _refused_by_config(override: str):
    """For a case that would be expensive if accepted: fail at once, without running it, if the config
    accepts ``override``."""
    def check() -> None:
        try:
            resolve_config(None, None, [override]).validate()
        except ConfigError:
            return
        pytest.fail(f"the config accepts {override}; running it would allocate the batch")
    return check


PRECHECK = {"train-batch-size-1e8": _refused_by_config("train.batch_size=100000000")}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _params(cases):
    for case_id, argv, expect in cases:
        marks = [pytest.mark.xfail(reason=f"needs {NEEDS[case_id]}", strict=False)] if case_id in NEEDS else []
        yield pytest.param(case_id, argv, expect, id=case_id, marks=marks)


def _argv(template: str, world: Path) -> list[str]:
    return shlex.split(template.replace("{w}", str(world)).replace("{c}", str(world.parent / "cache")))


def _undo_new_files(root: Path, before: set[Path]) -> None:
    """Remove what a failing case wrote, so that it cannot change the cases after it."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts)):
        if path not in before and path.exists():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


@pytest.mark.parametrize("case_id,argv,expect", list(_params(CASES)))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(world, capsys, monkeypatch, case_id, argv, expect):
    monkeypatch.chdir(world)  # the check case proves the working folder is not imported from
    monkeypatch.setattr(sys, "path", list(sys.path))  # --path entries do not leak into later cases
    torch.set_num_threads(1)
    if case_id in PRECHECK:
        PRECHECK[case_id]()
    before = snapshot(world)
    paths_before = set(world.rglob("*"))
    try:
        code = main(_argv(argv, world))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    finally:
        after = snapshot(world)
        _undo_new_files(world, paths_before)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err[-2000:])
    assert "Traceback" not in captured.err
    assert len(lines) == 1, captured.err
    if expect is not None:
        assert expect in lines[0], lines[0]
    assert after == before, "the command wrote or removed files"


def test_the_suite_covers_every_command_with_100_cases():
    commands = {_argv(argv, Path("/w"))[0] for _, argv, _ in CASES}
    assert {"train", "eval", "generate", "check", "profile", "sweep", "report", "bench", "import-hf",
            "export-hf"} <= commands
    assert len(CASES) >= 100 and len({c for c, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id", sorted(SUBPROCESS_CASES))
def test_bad_input_through_a_real_process(world, case_id):
    if case_id == "generate-prompt-not-utf8":
        argv = ["generate", str(world / "model"), "--prompt", os.fsdecode(b"abc\xff")]
    else:
        argv = next(_argv(a, world) for c, a, _ in CASES if c == case_id)
    if case_id in NEEDS:
        pytest.xfail(f"needs {NEEDS[case_id]}")
    before = snapshot(world)
    proc = subprocess.run([sys.executable, "-m", "spannorm", *argv], cwd=world, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, timeout=300,
                          errors="replace")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert snapshot(world) == before
