"""The speed paths of the model compute what the plain equations compute: grouped and looped MoE dispatch
against a per-token reference, SDPA with grouped KV heads against repeated heads, the rolled RoPE against
rotate_half, and RMSNorm (hand-written backward on CPU) against its formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spannorm import ModelConfig, MoEConfig, SpanNormLM
from spannorm.model.layers import CausalSelfAttention, RMSNorm, RotaryEmbedding, rotate_half
from spannorm.model.moe import Experts, MoEFFN, grouped_mm_supported


def _moe(n_experts: int, top_k: int, d: int = 32, d_expert: int = 48, shared: bool = False) -> MoEFFN:
    cfg = ModelConfig(d_model=d, n_heads=4, n_layers=1, context_length=8,
                      moe=MoEConfig(n_experts=n_experts, top_k=top_k, d_expert=d_expert, shared_expert=shared))
    torch.manual_seed(0)
    moe = MoEFFN(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


def naive_moe(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """SPEC §4 token by token: softmax router in fp32, top-k, renormalized gates, y = Σ_k g_k·E_k(x)."""
    flat = x.reshape(-1, x.shape[-1])
    ex = moe.experts
    rows = []
    for token in flat:
        probs = (moe.router.weight.float() @ token.float()).softmax(-1)
        top_p, top_e = probs.topk(moe.top_k)
        gates = top_p / top_p.sum()
        y = torch.zeros_like(token)
        for g, e in zip(gates, top_e.tolist()):
            y = y + g * ((F.silu(token @ ex.w_gate[e]) * (token @ ex.w_up[e])) @ ex.w_down[e])
        if moe.shared_expert is not None:
            y = y + moe.shared_expert(token)
        rows.append(y)
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
@pytest.mark.parametrize("n_experts,top_k,shared", [(4, 2, False), (16, 2, True), (8, 1, False)])
def test_moe_dispatch_equals_per_token_reference(dispatch, n_experts, top_k, shared):
    if dispatch == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    moe = _moe(n_experts, top_k, shared=shared)
    moe.experts.dispatch = dispatch
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe(x), naive_moe(moe, x), rtol=1e-5, atol=1e-5)


def test_grouped_and_loop_dispatch_give_the_same_gradients():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    x0 = torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(2))
    grads = {}
    for dispatch in ("grouped", "loop"):
        moe = _moe(16, 2)
        moe.experts.dispatch = dispatch
        x = x0.clone().requires_grad_()
        out = moe(x)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, 32))
        grads[dispatch] = [x.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(grads["grouped"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_experts_with_no_tokens_and_bf16_autocast():
    """An expert that gets no token contributes nothing; under bf16 autocast both dispatches agree."""
    experts = Experts(4, 32, 48)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    counts = torch.tensor([4, 0, 6, 0])
    expect = torch.cat([(F.silu(x[:4] @ experts.w_gate[0]) * (x[:4] @ experts.w_up[0])) @ experts.w_down[0],
                        (F.silu(x[4:] @ experts.w_gate[2]) * (x[4:] @ experts.w_up[2])) @ experts.w_down[2]])
    outs = {}
    for dispatch in ("loop", "grouped") if hasattr(torch, "_grouped_mm") else ("loop",):
        experts.dispatch = dispatch
        torch.testing.assert_close(experts(x, counts), expect, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[dispatch] = experts(x, counts)
        assert outs[dispatch].dtype == torch.float32
        torch.testing.assert_close(outs[dispatch], expect, rtol=0.05, atol=0.05)
    if len(outs) == 2:
        torch.testing.assert_close(outs["grouped"], outs["loop"], rtol=1e-2, atol=1e-2)


def test_grouped_mm_support_rules():
    if not hasattr(torch, "_grouped_mm"):
        assert not grouped_mm_supported(torch.zeros(2, 32), 32, 48)
        return
    assert grouped_mm_supported(torch.zeros(2, 32), 32, 48)
    assert not grouped_mm_supported(torch.zeros(2, 30), 30, 48)  # 30 floats = 120 bytes, not 16-aligned
    assert not grouped_mm_supported(torch.zeros(2, 32, dtype=torch.float64), 32, 48)


def test_unknown_dispatch_is_rejected():
    experts = Experts(2, 16, 16)
    experts.dispatch = "fast"
    with pytest.raises(ValueError, match="dispatch='fast'"):
        experts(torch.zeros(2, 16), torch.tensor([1, 1]))


def test_moe_model_trains_the_same_with_both_dispatches():
    """Three SGD steps of a whole MoE model give the same losses with grouped and looped dispatch."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, context_length=8, vocab_size=32,
                      moe=MoEConfig(n_experts=8, top_k=2, d_expert=16))
    idx = torch.randint(32, (2, 9), generator=torch.Generator().manual_seed(4))
    losses = {}
    for dispatch in ("grouped", "loop"):
        torch.manual_seed(0)
        model = SpanNormLM(cfg)
        for moe in model.moe_layers():
            moe.experts.dispatch = dispatch
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[dispatch] = []
        for _ in range(3):
            loss = model(idx[:, :-1], idx[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[dispatch].append(loss.item())
    assert losses["grouped"] == pytest.approx(losses["loop"], rel=1e-5)


def test_sdpa_with_grouped_kv_heads_equals_repeated_heads():
    cfg = ModelConfig(d_model=32, n_heads=8, n_kv_heads=2, n_layers=1, context_length=12)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    out = attn(x)
    # the same attention written with K and V repeated to every query head
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, 8, 4).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, 2, 4).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, 2, 4).transpose(1, 2)
    cos, sin = attn.rotary.cos[:T], attn.rotary.sin[:T]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 2.0 + torch.full((T, T), float("-inf")).triu(1)
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g_out, = torch.autograd.grad(out.sum(), x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-5)


def test_rolled_rope_is_bit_identical_to_rotate_half():
    rot = RotaryEmbedding(16, 20, 10000.0)
    q = torch.randn(2, 3, 20, 16, generator=torch.Generator().manual_seed(6))
    k = torch.randn(2, 1, 20, 16, generator=torch.Generator().manual_seed(7))
    q_rot, k_rot = rot(q, k)
    assert torch.equal(q_rot, q * rot.cos + rotate_half(q) * rot.sin)
    assert torch.equal(k_rot, k * rot.cos + rotate_half(k) * rot.sin)


def test_rms_norm_equals_its_formula_forward_and_backward():
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 24))
    x = (3 * torch.randn(5, 6, 24, generator=torch.Generator().manual_seed(8))).requires_grad_()
    out = norm(x)
    assert "_RMSNormFunction" in out.grad_fn.name()  # the CPU path with the hand-written backward
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(5, 6, 24, generator=torch.Generator().manual_seed(9))
    gx, gw = torch.autograd.grad(out, (x, norm.weight), g)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, norm.weight), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)
    # in bf16 the norm still computes in fp32 and returns bf16
    assert norm(x.detach().bfloat16()).dtype == torch.bfloat16



def test_router_stays_fp32_under_bf16_autocast():
    """SPEC §4: the router runs in fp32. Under bf16 autocast its matmul would otherwise run in bf16."""
    moe = _moe(4, 2)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(10))
    logits_fp32, probs_fp32, idx_fp32, _ = moe.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, idx, gates = moe.route(x)
    assert logits.dtype == probs.dtype == gates.dtype == torch.float32
    assert torch.equal(logits, logits_fp32) and torch.equal(idx, idx_fp32)
