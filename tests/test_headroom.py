"""fp16/bf16 headroom inside the sub-layers: ``measure`` records max |value| of every linear layer's input and
output, every norm's input, the MoE experts' hidden states and the logits, from outside the model, and the
fp16/bf16 verdicts use the larger of that and the residual stream's max, naming where it sits. Each test
blows up one internal activation from outside (by scaling a weight) and compares the recorded maximum with a
hand-written reference of the sub-layer's equations."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spannorm import ModelConfig, SpanNormLM
from spannorm.diagnostics.check import CheckSettings, DepthResult, Target, run_check
from spannorm.diagnostics.custom import CustomBlockLM
from spannorm.diagnostics.measure import Measurement, measure
from spannorm.diagnostics.report import load_schema, write_report
from spannorm.diagnostics.stats import FP16_MAX
from spannorm.diagnostics.verdicts import HEADROOM_WARN_LOG2, precision_verdicts
from spannorm.model.layers import RMSNorm

BLOWUP = 1e4
"""Scales one weight matrix: the activation behind it grows ×1e4, into the fp16 warn range or beyond."""


def tiny(placement: str = "post", **overrides) -> SpanNormLM:
    torch.manual_seed(0)
    return SpanNormLM(ModelConfig.from_dict(dict(d_model=32, n_heads=2, n_layers=2, placement=placement,
                                                 context_length=16, vocab_size=256, **overrides)))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def capture_input(module: nn.Module) -> tuple[list[torch.Tensor], object]:
    """A test-side pre-hook that keeps the module's input (the reference needs it)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    return seen, handle


def verdicts_of(m: Measurement, n_layers: int = 2) -> dict:
    return {v.check: v for v in precision_verdicts([DepthResult(n_layers, init=m)])}


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("placement", ["post", "span"])
def test_ffn_hidden_blowup_is_flagged_although_the_stream_is_normalized(placement):
    model = tiny(placement)
    ffn = model.blocks[0].ffn
    with torch.no_grad():
        ffn.up_proj.weight.mul_(BLOWUP)
    seen, handle = capture_input(ffn)
    m = measure(model, *batch())
    handle.remove()
    assert no_hooks_left(model)  # every hook measure() registered is gone

    # reference: SwiGLU by hand on the FFN's input
    x = seen[0].float()
    gate, up = x @ ffn.gate_proj.weight.T, x @ ffn.up_proj.weight.T
    product = F.silu(gate) * up
    down = product @ ffn.down_proj.weight.T
    named = {"gate_proj (output)": gate, "up_proj (output)": up, "down_proj (input)": product,
             "down_proj (output)": down}
    where, expected = max(((k, v.abs().max().item()) for k, v in named.items()), key=lambda kv: kv[1])
    assert expected > FP16_MAX * 2.0 ** HEADROOM_WARN_LOG2  # in the warn range or beyond
    assert m.internal_max_abs == pytest.approx(expected, rel=1e-5)
    assert m.internal_max_where == f"blocks.0.ffn.{where}"

    assert m.max_abs_overall < FP16_MAX / 2 ** 8  # the residual stream alone would say "ok"
    assert m.headroom_max_abs == m.internal_max_abs and m.headroom_where == m.internal_max_where
    v = verdicts_of(m)
    assert v["fp16"].status in ("warn", "unstable") and m.internal_max_where in v["fp16"].detail
    assert v["bf16"].status == "ok"


def test_unmodified_tiny_model_is_ok_and_names_its_largest_value():
    model = tiny("post")
    m = measure(model, *batch())
    assert m.internal_max_abs is not None and 0 < m.internal_max_abs < FP16_MAX / 2 ** 8
    assert m.internal_max_where.startswith(("blocks.", "logits"))
    v = verdicts_of(m)
    assert v["fp16"].status == v["bf16"].status == "ok"
    assert m.headroom_where in v["fp16"].detail and "inside the sub-layers" in v["fp16"].detail


def test_moe_expert_hidden_states_are_recomputed_exactly():
    """Experts use stacked weights, not nn.Linear. With top_k = n_experts every expert sees every token in
    order, so the reference is each expert's SwiGLU by hand on the MoE input."""
    model = tiny("post", moe={"n_experts": 2, "top_k": 2})
    experts = model.blocks[1].ffn.experts
    with torch.no_grad():
        experts.w_up[1].mul_(BLOWUP)
    seen, handle = capture_input(model.blocks[1].ffn)
    m = measure(model, *batch())
    handle.remove()
    assert no_hooks_left(model)
    x = seen[0].reshape(-1, 32).float()
    hidden = []
    for e in range(2):
        gate, up = x @ experts.w_gate[e], x @ experts.w_up[e]
        hidden += [gate, up, F.silu(gate) * up]
    expected = max(h.abs().max().item() for h in hidden)
    assert expected > FP16_MAX * 2.0 ** HEADROOM_WARN_LOG2  # in the warn range or beyond
    assert m.internal_max_where == "blocks.1.ffn.experts (hidden)"
    assert m.internal_max_abs == pytest.approx(expected, rel=1e-5)
    assert m.max_abs_overall < FP16_MAX / 2 ** 8
    v = verdicts_of(m)
    assert v["fp16"].status in ("warn", "unstable") and "blocks.1.ffn.experts (hidden)" in v["fp16"].detail


def test_logits_are_covered():
    """The LM head is F.linear on a weight (no module to hook): the logits are recorded from the output."""
    model = tiny("post", tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(BLOWUP * 10)
    idx, targets = batch()
    m = measure(model, idx, targets)
    with torch.no_grad():
        expected = model(idx).logits.abs().max().item()
    assert m.internal_max_where == "logits" and m.internal_max_abs == pytest.approx(expected, rel=1e-5)
    assert verdicts_of(m)["fp16"].status in ("warn", "unstable")


def test_pre_norm_sum_of_a_user_block_is_covered():
    """A user block with no linear layer at all: x -> N(c·x), c = 1e6 in block 0 and 1 after it. Its output
    (the stream) has unit RMS; the norm's input is what would overflow."""

    class Amplify(nn.Module):
        def __init__(self, d, gain):
            super().__init__()
            self.norm, self.gain = RMSNorm(d), gain

        def forward(self, x):
            return self.norm(self.gain * x)

    torch.manual_seed(0)
    model = CustomBlockLM(lambda d, h, layer, n: Amplify(d, 1e6 if layer == 0 else 1.0), n_layers=2, d_model=32,
                          n_heads=2)
    idx, targets = batch()
    m = measure(model, idx, targets)
    x0 = model.embed(idx) * 32 ** 0.5
    assert m.internal_max_where == "blocks.0.block.norm (input)"
    assert m.internal_max_abs == pytest.approx(1e6 * x0.abs().max().item(), rel=1e-5)
    assert verdicts_of(m)["fp16"].status == "unstable"


def test_verdict_takes_the_larger_of_stream_and_internal():
    model = tiny("post")
    m = measure(model, *batch())
    m.internal_max_abs, m.internal_max_where = FP16_MAX * 2, "blocks.1.attn.q_proj (output)"
    v = verdicts_of(m)["fp16"]
    assert v.status == "unstable" and "blocks.1.attn.q_proj (output)" in v.detail
    m.internal_max_abs = 1e-6  # smaller than the stream: the stream's hook point is named
    v = verdicts_of(m)["fp16"]
    assert m.headroom_max_abs == m.max_abs_overall and "(residual stream)" in v.detail
    m.internal_max_abs = float("nan")  # a NaN inside the model counts as an overflow
    assert verdicts_of(m)["fp16"].status == "unstable"


def _scaled_build(original):
    def build(self, settings, n_layers):
        model = original(self, settings, n_layers)
        with torch.no_grad():
            model.blocks[-1].ffn.up_proj.weight.mul_(BLOWUP)
        return model
    return build


@pytest.mark.parametrize("blowup", [False, True])
def test_check_report_carries_internal_headroom_and_validates(blowup, tmp_path, monkeypatch):
    if blowup:
        monkeypatch.setattr(Target, "build", _scaled_build(Target.build))
    settings = CheckSettings(depths=[2], steps=0, suggest=False, d_model=32, n_heads=2, seq_len=16, batch_size=2)
    run = run_check(["span"], settings)
    report = write_report(run, tmp_path)
    jsonschema.validate(json.loads((tmp_path / "report.json").read_text()), load_schema())
    init = report["targets"][0]["depths"][0]["init"]
    fp16 = {v["check"]: v for v in report["targets"][0]["verdicts"]}["fp16"]
    assert init["internal_max_abs"] > 0 and "inside the sub-layers" in fp16["detail"]
    if blowup:
        assert init["internal_max_where"].startswith("blocks.1.ffn.") and init["internal_max_where"] in fp16["detail"]
        assert fp16["status"] in ("warn", "unstable") and max(init["max_abs"]) < FP16_MAX / 2 ** 8
    else:
        assert fp16["status"] == "ok" and init["internal_max_abs"] < FP16_MAX / 2 ** 8
