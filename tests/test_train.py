"""The trainer: outputs, schedule, optimizer groups, MoE objective, spike score, exact resume, divergence."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import tiny_run_config
from spannorm.config import ModelConfig, MoEConfig
from spannorm.inference import generate
from spannorm.launch import train
from spannorm.model.transformer import SpanNormLM
from spannorm.train import checkpoint as ckpt_io
from spannorm.train import trainer as trainer_module
from spannorm.train.callbacks import SpikeScore
from spannorm.train.config import RunConfig
from spannorm.train.distributed import SingleProcess
from spannorm.train.progress import Progress
from spannorm.train.schedule import lr_at
from spannorm.train.trainer import Trainer, training_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(tmp_path, *overrides: str) -> RunConfig:
    return tiny_run_config(tmp_path, "train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", *overrides)


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_config_metrics_summary_and_checkpoints(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=8", "train.eval_every=4", "train.checkpoint_every=4",
                   "train.tensorboard=true", "optim.lr=1e-2")
    run = tmp_path / "run"
    summary = train(cfg, run)
    assert RunConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"train_loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(r)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    last = evals[-1]
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    assert last["val_bpb"] == pytest.approx(last["val_loss"] / math.log(2))  # byte tokenizer: 1 byte/token
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.5  # it learns
    saved = json.loads((run / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary.to_dict()))
    assert summary.status == "completed" and not summary.diverged and summary.steps == 8
    assert summary.final_val_loss == last["val_loss"] and summary.best_val_loss == min(r["val_loss"] for r in evals)
    assert summary.tokens == 8 * 4 * 32
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_00000004", "step_00000008"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["train_loss"] for r in records])
    assert [e.step for e in events.Scalars("val/loss")] == [4, 8]


def test_schedules():
    kw = dict(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, **kw) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, **kw) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, schedule="cosine", **kw) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), 100, 1.0, schedule="cosine", **kw) == pytest.approx(0.55, abs=0.02)
    wsd = [lr_at(s, 100, 1.0, schedule="wsd", decay_fraction=0.2, **kw) for s in range(100)]
    assert wsd[10:80] == [1.0] * 70 and wsd[99] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:]))
    assert lr_at(57, 100, 1.0, schedule="constant", **kw) == 1.0


def test_weight_decay_applies_to_matrices_only(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "optim.weight_decay=0.3"), tmp_path / "run")
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_params = sum(1 for _ in trainer.model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params and no_decay["params"]


def test_a_trainer_given_no_init_from_reader_refuses_train_init_from(tmp_path):
    # spannorm.launch.train hands in the reader (interop sits above train); a Trainer built directly has none.
    cfg = tiny_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(tmp_path / "model")))
    with pytest.raises(ValueError, match="no init_from reader"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_moe_objective_adds_aux_losses_with_coefficients_and_logs_load(tmp_path):
    moe = MoEConfig(n_experts=4, top_k=2, balance_coef=0.5, z_loss_coef=0.25)
    model = SpanNormLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, context_length=16, moe=moe))
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx, idx)
    expected = out.loss + 0.5 * out.balance_loss + 0.25 * out.z_loss
    assert torch.equal(training_objective(out, moe), expected)
    assert torch.equal(training_objective(out, None), out.loss)
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path, "model.moe.n_experts=4", "train.steps=2"), run)
    record = read_metrics(run)[-1]
    load = torch.tensor(record["expert_load"])
    assert load.shape == (2, 4) and torch.allclose(load.sum(dim=1), torch.ones(2))
    assert record["balance_loss"] >= 1.0 - 1e-4 and record["z_loss"] > 0


def test_spike_score_flags_values_above_mean_plus_six_sigma():
    score = SpikeScore(window=128, sigmas=6.0)
    assert score.update(1.0) == (None, False)  # too little history
    for i in range(200):
        z, spike = score.update(1.0 + 0.01 * (i % 2))
        assert not spike
    assert len(score.history) == 128
    z, spike = score.update(1.0 + 0.005 + 7 * 0.005)  # mean 1.005, std 0.005: z = 7
    assert spike and z == pytest.approx(7.0)
    z, spike = score.update(1.005 + 5 * 0.005)
    assert not spike and 4 < z < 6


def test_progress_bar_on_terminal_and_plain_lines_otherwise():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = Progress("auto", total_steps=10, log_every=5, stream=tty)
    bar.step(3, {"train_loss": 2.5, "tokens_per_s": 1500.0})
    assert tty.getvalue().startswith("\r[") and "3/10 loss 2.5000 1.5k tok/s ETA" in tty.getvalue()
    plain_stream = io.StringIO()
    plain = Progress("auto", total_steps=10, log_every=5, stream=plain_stream)
    for step in range(1, 11):
        plain.step(step, {"train_loss": 1.0, "tokens_per_s": 10.0, "lr": 1e-3, "grad_norm": 0.5})
    lines = plain_stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"] and "\r" not in plain_stream.getvalue()
    quiet = io.StringIO()
    Progress("none", total_steps=10, stream=quiet).step(10, {"train_loss": 1.0})
    assert quiet.getvalue() == ""


class StopAt:
    """Callback: request a stop after optimizer step ``step``, like an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, record):
        if step == self.step:
            trainer.request_stop("test stop")


@pytest.mark.parametrize("precision, accum", [("fp32", 1), ("bf16", 2)])
def test_resume_gives_identical_losses(tmp_path, precision, accum):
    extra = [f"train.precision={precision}", f"train.grad_accum={accum}", "train.checkpoint_every=100"]
    straight = tmp_path / "straight"
    full = train(tiny_cfg(tmp_path, *extra), straight)
    split = tmp_path / "split"
    first = train(tiny_cfg(tmp_path, *extra), split, callbacks=[StopAt(3)])
    assert first.status == "interrupted" and first.steps == 3
    assert ckpt_io.latest_checkpoint(split).name == "step_00000003"
    resumed = train(tiny_cfg(tmp_path, *extra), split, resume=True)
    assert resumed.status == "completed" and resumed.steps == 6
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("train_loss", "grad_norm", "lr", "loss_z", "grad_norm_z"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert [r["val_loss"] for r in a if "val_loss" in r] == [r["val_loss"] for r in b if "val_loss" in r]
    assert full.final_val_loss == resumed.final_val_loss and full.tokens == resumed.tokens
    wa = load_file(str(ckpt_io.latest_checkpoint(straight) / "model.safetensors"))
    wb = load_file(str(ckpt_io.latest_checkpoint(split) / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_optim_fused_trains_with_the_fused_adamw_on_cpu_and_unset_keeps_the_for_loop_kernel(tmp_path):
    """optim.fused unset: the CPU's for-loop AdamW, as before the switch (and no key in run_config.json);
    optim.fused=true: the fused kernel, which trains to nearly the same losses (its own rounding), resumes
    exactly, and is kept when a run saved with the for-loop kernel is resumed with the switch on."""
    def groups(run, step):
        return ckpt_io.read_json(run / "checkpoints" / f"step_{step:08d}" / "optimizer.json")["param_groups"]

    def saved_optim(run):
        return ckpt_io.read_json(run / "checkpoints" / "step_00000006" / "run_config.json")["optim"]

    plain, fused, split = tmp_path / "plain", tmp_path / "fused", tmp_path / "split"
    default = Trainer(tiny_cfg(tmp_path), plain)
    assert default.cfg.optim.fused is None and not default.skips_update_on_device()
    default.run()
    assert "fused" not in saved_optim(plain)
    assert {g["fused"] for g in groups(plain, 6)} == {None}
    train(tiny_cfg(tmp_path, "optim.fused=true"), fused)
    assert saved_optim(fused)["fused"] is True
    assert {g["fused"] for g in groups(fused, 6)} == {True}
    a, b = read_metrics(plain), read_metrics(fused)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a, b)) < 1e-4
    train(tiny_cfg(tmp_path, "optim.fused=true"), split, callbacks=[StopAt(3)])
    train(tiny_cfg(tmp_path, "optim.fused=true"), split, resume=True)
    assert [r["train_loss"] for r in read_metrics(split)] == [r["train_loss"] for r in b]
    switched = Trainer(tiny_cfg(tmp_path, "optim.fused=true", "train.steps=8"), plain, resume=True)
    switched.run()  # saved with the for-loop kernel at step 6; load_state_dict would have taken it back
    assert {g["fused"] for g in switched.optimizer.param_groups} == {True} and switched.skips_update_on_device()
    assert {g["fused"] for g in groups(plain, 8)} == {True}


def test_resume_drops_metrics_past_the_checkpoint_and_can_extend_the_run(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path, "train.steps=4", "train.checkpoint_every=2", "optim.schedule=constant"), run)
    # Pretend a kill after step 4's metrics but before its checkpoint: keep only checkpoint 2.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000004\n")  # stale pointer: falls back to step 2
    summary = train(tiny_cfg(tmp_path, "train.steps=7", "train.checkpoint_every=2", "optim.schedule=constant"),
                    run, resume=True)
    assert summary.steps == 7
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 8))


class NaNGradientAt:
    """Callback: after the backward pass of step ``step``, poison one gradient; remembers the weights."""

    def __init__(self, step: int):
        self.step = step
        self.weights_before = None

    def on_after_backward(self, trainer, step):
        if step == self.step:
            self.trainer = trainer
            self.weights_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            next(trainer.model.parameters()).grad[0, 0] = float("nan")


def test_non_finite_gradient_stops_before_the_optimizer_step(tmp_path):
    run = tmp_path / "run"
    poison = NaNGradientAt(5)
    summary = train(tiny_cfg(tmp_path, "train.steps=8", "train.checkpoint_every=2"), run, callbacks=[poison])
    assert summary.diverged and summary.status == "diverged" and summary.diverged_step == 5
    assert summary.steps == 4
    assert "step 5: non-finite gradient norm" in summary.message and "step_00000004" in summary.message
    # The last good checkpoint stays, and it holds exactly the weights the model had before step 5.
    latest = ckpt_io.latest_checkpoint(run)
    assert latest.name == "step_00000004"
    saved = load_file(str(latest / "model.safetensors"))
    assert all(torch.equal(saved[k], poison.weights_before[k]) for k in saved)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["diverged_step"] == 5
    # The optimizer never stepped on the poisoned gradient: the live weights are still the step-4 ones (an
    # AdamW step on a NaN gradient would have turned that weight NaN and moved every other one), and AdamW's
    # own step counter stopped at 4.
    live = poison.trainer.model.state_dict()
    assert all(torch.equal(live[k], poison.weights_before[k]) for k in live)
    counts = {int(s["step"]) for s in poison.trainer.optimizer.state_dict()["state"].values()}
    assert counts == {4}


def test_non_finite_loss_is_reported_with_its_step(tmp_path):
    class PoisonWeights:
        def on_train_start(self, trainer):
            with torch.no_grad():
                trainer.model.embed.weight[:] = float("inf")

    summary = train(tiny_cfg(tmp_path), tmp_path / "run", callbacks=[PoisonWeights()])
    assert summary.diverged and summary.diverged_step == 1 and summary.steps == 0
    assert "step 1: non-finite loss" in summary.message
    assert ckpt_io.latest_checkpoint(tmp_path / "run") is None


def test_keeps_the_last_k_checkpoints(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path, "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                   "train.eval_every=0"), run)
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_00000004", "step_00000005"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    state = json.loads((run / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["sampler"]["batches_drawn"] == 5
    assert "val_loss" in read_metrics(run)[-1]  # eval_every=0 still evaluates at the end


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path):
    import os
    import signal

    class PressCtrlC:
        def on_step_end(self, trainer, step, record):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN where a shell started this in the background
    summary = train(tiny_cfg(tmp_path, "train.checkpoint_every=100"), run, callbacks=[PressCtrlC()])
    assert summary.status == "interrupted" and summary.steps == 2 and "Ctrl-C" in summary.message
    assert ckpt_io.latest_checkpoint(run).name == "step_00000002"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


class GradientProbe:
    """Records, at every step, the gradient norm before clipping (after backward) and after (at step end)."""

    def __init__(self):
        self.before: list[float] = []
        self.after: list[float] = []
        self.logged: list[float] = []

    @staticmethod
    def _norm(model) -> float:
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        return float(torch.cat(grads).norm())

    def on_after_backward(self, trainer, step):
        self.before.append(self._norm(trainer.model))

    def on_step_end(self, trainer, step, record):
        self.after.append(self._norm(trainer.model))
        self.logged.append(record["grad_norm"])


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_gradient_clipping_scales_the_global_norm_and_logs_the_unclipped_one(tmp_path, clip):
    probe = GradientProbe()
    train(tiny_cfg(tmp_path, f"optim.grad_clip={clip}", "train.checkpoint_every=0"), tmp_path / "run",
          callbacks=[probe])
    assert len(probe.before) == 6 and min(probe.before) > 0.05  # every step's raw norm is above the clip
    assert probe.logged == pytest.approx(probe.before, rel=1e-5)  # metrics carry the pre-clip norm
    if clip > 0:
        assert probe.after == pytest.approx([clip] * 6, rel=1e-4)
    else:  # 0 turns clipping off
        assert probe.after == pytest.approx(probe.before, rel=1e-6)


def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    """Two micro-batches of 4 draw the same 8 windows as one batch of 8 (the sampler's stream), so the
    accumulated update equals the large-batch one up to float summation order."""
    big = train(tiny_cfg(tmp_path, "train.batch_size=8", "train.grad_accum=1"), tmp_path / "big")
    accum = train(tiny_cfg(tmp_path, "train.batch_size=4", "train.grad_accum=2"), tmp_path / "accum")
    assert big.tokens == accum.tokens
    big_losses = [r["train_loss"] for r in read_metrics(tmp_path / "big")]
    accum_losses = [r["train_loss"] for r in read_metrics(tmp_path / "accum")]
    assert accum_losses == pytest.approx(big_losses, rel=1e-5)
    assert accum_losses[-1] < accum_losses[0]  # and the run learns, so the comparison is not vacuous
    a = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "big") / "model.safetensors"))
    b = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "accum") / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_top_k_sampling_only_draws_among_the_k_most_likely_tokens():
    torch.manual_seed(0)
    model = SpanNormLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, context_length=16))
    prompt = [65, 66, 67]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    drawn = {generate(model, prompt, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(s))[0]
             for s in range(60)}
    assert drawn <= top3 and len(drawn) > 1  # a hot temperature spreads draws, top-k still confines them
    unrestricted = {generate(model, prompt, 1, temperature=5.0, generator=torch.Generator().manual_seed(s))[0]
                    for s in range(60)}
    assert not unrestricted <= top3
    greedy = generate(model, prompt, 1, temperature=0.0)[0]
    assert greedy == int(logits.argmax())


class ScrambleAfterFirstEval:
    """Scrambles the weights after the step-3 evaluation: the run falls back with finite losses."""

    def on_evaluation(self, trainer, step, record):
        if step == 3:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn_like(p) * 3)


def test_a_validation_loss_above_the_best_is_logged_and_warned(tmp_path, capsys):
    """A run that falls back (here: its weights scrambled after the first evaluation) has finite losses and no
    spike; ``val_above_best`` and a warning line show it."""

    run = tmp_path / "run"
    summary = train(tiny_cfg(tmp_path, "train.progress=plain", "train.checkpoint_every=0"), run,
                    callbacks=[ScrambleAfterFirstEval()])
    assert summary.status == "completed" and not summary.diverged
    evals = [r for r in read_metrics(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[0]["val_above_best"] == 0.0
    assert evals[1]["val_above_best"] == pytest.approx(evals[1]["val_loss"] - evals[0]["val_loss"])
    assert evals[1]["val_above_best"] > 0.1
    out = capsys.readouterr().out
    assert "warning: step 6: val_loss" in out and "nats above the run's best" in out
    assert out.count("warning:") == 1


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_follows_the_switch_on_cuda_and_is_left_alone_on_cpu(tmp_path, monkeypatch, tf32):
    """``train.tf32`` (on by default) sets TF32 for fp32 matmuls and convolutions on a CUDA device, both ways,
    and changes nothing on the CPU. The device is faked: ``_build_device`` is called on a stand-in trainer."""
    assert RunConfig().train.tf32 is True
    modules = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [module.allow_tf32 for module in modules]
    try:
        for module in modules:
            module.allow_tf32 = not tf32
        cfg = tiny_cfg(tmp_path, f"train.tf32={str(tf32).lower()}")
        stand_in = type("StandIn", (), {"cfg": cfg, "parallel": SingleProcess()})()
        assert Trainer._build_device(stand_in) == torch.device("cpu")
        assert [module.allow_tf32 for module in modules] == [not tf32, not tf32]
        monkeypatch.setattr(trainer_module, "resolve_device", lambda name: torch.device("cuda"))
        assert Trainer._build_device(stand_in) == torch.device("cuda")
        assert [module.allow_tf32 for module in modules] == [tf32, tf32]
    finally:
        for module, value in zip(modules, before):
            module.allow_tf32 = value


def test_a_field_the_checkpoint_predates_is_not_reported_as_a_changed_setting():
    from spannorm.train.config import RunConfig
    from spannorm.train.trainer import _changed_settings

    new = RunConfig().to_dict()
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in new.items()}
    del old["train"]["tf32"]  # a run config written before train.tf32 existed
    assert _changed_settings(old, new) == []
    old["train"]["steps"] = 5
    assert _changed_settings(old, new) == [f"train.steps 5 -> {new['train']['steps']}"]


def test_progress_none_silences_progress_but_not_warnings(tmp_path, capsys):
    """``train.progress=none`` (the studies use it) hides the progress lines, not the collapse warning: that
    goes to stderr."""
    train(tiny_cfg(tmp_path, "train.progress=none", "train.checkpoint_every=0"), tmp_path / "run",
          callbacks=[ScrambleAfterFirstEval()])
    captured = capsys.readouterr()
    assert "val_loss" not in captured.out  # no progress or evaluation lines
    assert captured.err.count("warning:") == 1 and "warning: step 6: val_loss" in captured.err

    run = tmp_path / "short"  # a resume with changed settings warns on stderr too
    train(tiny_cfg(tmp_path, "train.progress=none", "train.steps=2"), run)
    capsys.readouterr()
    train(tiny_cfg(tmp_path, "train.progress=none", "train.steps=3"), run, resume=True)
    captured = capsys.readouterr()
    assert "resumed with changed settings" in captured.err and "train.steps 2 -> 3" in captured.err
    assert "resumed" not in captured.out
