"""MoE routing and losses, analytic counts, and config validation."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from spannorm import ConfigError, ModelConfig, MoEConfig, SpanNormLM, flops_per_token, param_counts
from spannorm.model.moe import MoEFFN, switch_balance_loss


def _moe(shared=False, n_experts=6, top_k=2) -> tuple[ModelConfig, MoEFFN]:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=1, context_length=16,
                      moe=MoEConfig(n_experts=n_experts, top_k=top_k, shared_expert=shared))
    return cfg, SpanNormLM(cfg).blocks[0].ffn


def test_routing_picks_top_k_by_probability_and_gates_sum_to_one():
    _, moe = _moe()
    x = torch.randn(40, 32)
    logits, probs, expert_idx, gates = moe.route(x)
    assert logits.dtype == torch.float32 and probs.dtype == torch.float32
    expected = probs.argsort(dim=-1, descending=True)[:, :2]
    assert torch.equal(expert_idx.sort(-1).values, expected.sort(-1).values)
    torch.testing.assert_close(gates.sum(-1), torch.ones(40))
    torch.testing.assert_close(gates, probs.gather(-1, expert_idx) / probs.gather(-1, expert_idx).sum(-1, True))


@pytest.mark.parametrize("shared", [False, True])
def test_moe_output_equals_per_token_reference(shared):
    _, moe = _moe(shared=shared)
    x = torch.randn(2, 10, 32)
    out = moe(x)
    flat = x.reshape(-1, 32)
    _, _, expert_idx, gates = moe.route(flat)
    ex = moe.experts
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(moe.top_k):
            e = expert_idx[t, slot]
            h = F.silu(flat[t] @ ex.w_gate[e]) * (flat[t] @ ex.w_up[e])
            ref[t] += gates[t, slot] * (h @ ex.w_down[e])
    if shared:
        ref += moe.shared_expert(flat)
    torch.testing.assert_close(out.reshape(-1, 32), ref, rtol=0, atol=1e-5)


def test_balance_loss_is_minimal_for_uniform_routing():
    E, N = 4, 64
    uniform_probs = torch.full((N, E), 1 / E)
    uniform_idx = torch.arange(N).remainder(E).unsqueeze(-1)
    uniform = switch_balance_loss(uniform_probs, uniform_idx, E)
    assert uniform.item() == pytest.approx(1.0)
    skew_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(N, 1)
    skewed = switch_balance_loss(skew_probs, torch.zeros(N, 1, dtype=torch.long), E)
    assert skewed.item() == pytest.approx(E * 0.7)
    assert skewed > uniform


def test_every_expert_with_tokens_gets_gradient_and_aux_is_handed_back():
    cfg, _ = _moe(n_experts=8, top_k=1)
    model = SpanNormLM(cfg)
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx, idx)
    assert out.balance_loss is not None and out.z_loss is not None
    assert out.balance_loss.item() >= 1.0 - 1e-6  # E·Σ f·p >= 1 ... at least near 1 at init
    load = out.expert_load[0]
    assert load.sum().item() == pytest.approx(1.0)
    (out.loss + 0.01 * out.balance_loss + 0.001 * out.z_loss).backward()
    experts = model.blocks[0].ffn.experts
    for e in range(8):
        grad = experts.w_down.grad[e].abs().sum().item()
        assert (grad > 0) == (load[e].item() > 0), (e, grad, load[e].item())
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(n_kv_heads=2, bias=True, norm="layer", tie_embeddings=True),
    dict(placement="peri", embed_norm=True, tie_embeddings=False),
    dict(placement="hybrid", norm="layer"),
    dict(placement="mixln", n_layers=4, placement_overrides={3: "span"}),
    dict(moe=MoEConfig(n_experts=4, top_k=2, shared_expert=True, d_expert=24)),
    dict(placement="deepnorm", moe=MoEConfig(n_experts=3, top_k=3)),
])
def test_analytic_parameter_counts_equal_real(kwargs):
    base = dict(d_model=32, n_heads=4, n_layers=3, context_length=16)
    base.update(kwargs)
    cfg = ModelConfig(**base)
    model = SpanNormLM(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    if cfg.moe is None:
        assert counts.active == counts.total
    else:
        experts = model.blocks[0].ffn.experts
        per_expert = sum(p[0].numel() for p in experts.parameters())
        unused = (cfg.moe.n_experts - cfg.moe.top_k) * per_expert * cfg.n_layers
        assert counts.active == counts.total - unused


def test_flops_per_token_formula():
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=2, d_ff=128, vocab_size=100, context_length=32)
    matmul = 2 * (4 * 64 * 64 + 3 * 64 * 128) + 100 * 64
    assert flops_per_token(cfg) == 6 * matmul + 12 * 2 * 64 * 32
    moe = ModelConfig(d_model=64, n_heads=4, n_layers=2, d_ff=128, vocab_size=100, context_length=32,
                      moe=MoEConfig(n_experts=8, top_k=2, d_expert=64))
    matmul = 2 * (4 * 64 * 64 + 64 * 8 + 2 * 3 * 64 * 64) + 100 * 64
    assert flops_per_token(moe, seq_len=16) == 6 * matmul + 12 * 2 * 64 * 16


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(placement="span", n_kv_heads=2, bias=True, tie_embeddings=False),
    dict(moe=MoEConfig(n_experts=4, top_k=2)),
    dict(placement="hybrid", moe=MoEConfig(n_experts=3, top_k=1, shared_expert=True, d_expert=24)),
], ids=["dense", "dense-gqa-bias-untied", "moe", "moe-shared"])
def test_flops_per_token_equals_torch_flop_counter(kwargs):
    """Count the matmuls torch actually runs. ``FlopCounterMode`` counts 2·m·n·k per (b)mm/addmm and nothing for
    norms, activations, softmax, RoPE, gating or the embedding lookup, which is counting.py's convention. Two
    things it cannot see are routed around: CPU's fused flash SDPA kernel has no FLOP formula in the counter,
    so attention runs on the math backend, whose two bmms (Q·Kᵀ and P·V) cover the full T×T matrix, causal
    mask or not; and ``torch._grouped_mm`` has none either, so the experts run their per-expert loop. Then
    forward attention is exactly 4·T·d per token per layer, i.e. 12·L·d·T for forward + backward, and the
    forward matmuls are exactly 2 per active weight (router and LM head included, biases not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    base = dict(d_model=32, n_heads=4, n_layers=3, vocab_size=64, context_length=16)
    base.update(kwargs)
    cfg = ModelConfig(**base)
    torch.manual_seed(0)
    model = SpanNormLM(cfg)
    for moe in model.moe_layers():
        moe.experts.dispatch = "loop"
    B, seq = 3, 12  # shorter than the context: the attention term must use the batch's length
    idx = torch.randint(0, cfg.vocab_size, (B, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        model(idx)
    counts = {str(op): n for op, n in forward.get_flop_counts()["Global"].items()}
    tokens = B * seq
    L, d = cfg.n_layers, cfg.d_model
    assert counts.pop("aten.bmm") == 4 * L * d * seq * tokens  # Q·Kᵀ and P·V over the full T×T
    # Active matmul weights, read off the model itself: every Linear (projections, router, shared expert, an
    # untied head), top_k/E of the routed experts, and the embedding when it doubles as the tied head.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    routed = sum(sum(p.numel() for p in moe.experts.parameters()) * moe.top_k // moe.n_experts
                 for moe in model.moe_layers())
    tied_head = model.embed.weight.numel() if cfg.tie_embeddings else 0
    assert sum(counts.values()) == 2 * (linear + routed + tied_head) * tokens
    assert 3 * forward.get_total_flops() == flops_per_token(cfg, seq_len=seq) * tokens
    # Backward costs exactly twice the forward (a gradient for the input and one for the weight of every
    # matmul, two more bmms per attention bmm), so a counted training step equals the analytic total too.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        model(idx, idx).loss.backward()
    assert step.get_total_flops() == flops_per_token(cfg, seq_len=seq) * tokens


@pytest.mark.parametrize("kwargs,field", [
    (dict(placement="sandwich"), "model.placement"),
    (dict(d_model=30, n_heads=4), "model.d_model"),
    (dict(n_kv_heads=3), "model.n_kv_heads"),
    (dict(norm="batch"), "model.norm"),
    (dict(span_scaling="magic"), "model.span_scaling"),
    (dict(delta_t=-0.1), "model.delta_t"),
    (dict(n_layers=0), "model.n_layers"),
    (dict(placement_overrides={9: "pre"}), "model.placement_overrides"),
    (dict(placement_overrides={0: "mixln"}), "model.placement_overrides[0]"),
    (dict(mixln_ratio=1.5), "model.mixln_ratio"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    message = str(err.value)
    assert message.startswith(field + "=") and "\n" not in message
    assert "allowed" in message or "must" in message


def test_top_k_above_experts_is_rejected():
    with pytest.raises(ConfigError, match=r"^model\.moe\.top_k=3 is invalid: must be between 1 and n_experts=2"):
        ModelConfig(moe=dict(n_experts=2, top_k=3))


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match=r"model\.n_layer is not a known config key \(did you mean 'n_layers'\?\); "
                                          "allowed: .*n_layers"):
        ModelConfig.from_dict({"n_layer": 3})
    with pytest.raises(ConfigError, match=r"model\.moe\.experts is not a known config key.*; allowed: .*n_experts"):
        ModelConfig(moe={"experts": 3})


def test_derived_widths():
    cfg = ModelConfig(d_model=96, n_heads=4)
    assert cfg.ffn_hidden == 256 and cfg.ffn_hidden % 16 == 0 and cfg.ffn_hidden >= 8 * 96 / 3
    assert cfg.embedding_multiplier == pytest.approx(math.sqrt(96))
    assert ModelConfig(init="fixed", init_std=0.02).embedding_multiplier == 1.0


@pytest.mark.slow
def test_console_script_version_help_and_profile():
    def run(*a):
        return subprocess.run([sys.executable, "-m", "spannorm", *a], capture_output=True, text=True)

    assert run("--version").stdout.startswith("spannorm 0.")
    assert "profile" in run("--help").stdout
    prof = run("profile", "--placements", "pre,span", "--depths", "4", "--format", "json")
    assert prof.returncode == 0 and prof.stdout.count("variance_ratio") == 2
    bad = run("profile", "--placements", "sandwich", "--depths", "4")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "model.placement='sandwich'" in bad.stderr and "allowed: pre" in bad.stderr
