"""The MoE layer under ``torch.compile(fullgraph=True)``, the padded (static-shape, dropless) dispatch, and
the rules and self-test that decide when ``torch._grouped_mm`` is trusted."""

from __future__ import annotations

import types

import pytest
import torch

from spannorm.config import ModelConfig, MoEConfig
from spannorm.model import moe as moe_module
from spannorm.model.moe import GROUPED_MM_VERDICTS, Experts, expert_counts, grouped_mm_self_test, grouped_mm_supported
from spannorm.model.transformer import DecoderLM

HAS_GROUPED = hasattr(torch, "_grouped_mm")


def _experts(seed=0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(5, 32, 48)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    return experts


def _run(experts: Experts, x0: torch.Tensor, counts: torch.Tensor, capacity=None):
    x = x0.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = experts(x, counts, capacity=capacity)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out.detach(), x.grad] + [p.grad for p in experts.parameters()]


@pytest.mark.parametrize("capacity", [None, 9])
def test_padded_dispatch_equals_loop_with_empty_experts(capacity):
    """Experts 0, 2 and 4 get no token. Padded and loop agree in fp32 to 1e-6 (output and every gradient),
    and the empty experts' weight gradients are exactly zero."""
    counts = torch.tensor([0, 7, 0, 9, 0])
    x0 = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    experts = _experts()
    results = {}
    for dispatch in ("loop", "padded"):
        experts.dispatch = dispatch
        results[dispatch] = _run(experts, x0, counts, capacity)
    for a, b in zip(results["padded"], results["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for grad in results["padded"][2:]:
        assert grad[counts == 0].abs().max() == 0


def test_expert_counts_equals_bincount():
    idx = torch.randint(0, 7, (50, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(expert_counts(idx, 9), torch.bincount(idx.reshape(-1), minlength=9))


def _moe_model(seed=0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, context_length=16,
                                 placement="span", moe=MoEConfig(n_experts=4, top_k=2, shared_expert=True)))


def _train_losses(model, forward, steps=3, autocast=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (2, 17), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(idx[:, :-1], idx[:, 1:])
            loss = out.loss + 0.01 * out.balance_loss + 0.001 * out.z_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


def _recording_backend(ops: set):
    """A torch.compile backend that records the ops of every captured graph, then runs it through
    aot_eager (AOT autograd traces the backward too)."""
    def backend(gm, example_inputs):
        ops.update(getattr(node.target, "__name__", str(node.target)) for node in gm.graph.nodes)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def test_moe_model_compiles_with_fullgraph_and_trains_like_eager():
    """fp32 on CPU: the compiled model (fullgraph=True: a graph break is an error) takes the padded
    dispatch (batched matmuls, no bincount); three SGD steps with different routings compile once (a
    recompile is an error) and give the eager losses (loop or grouped dispatch) to 1e-5 relative."""
    model = _moe_model()
    eager = _train_losses(model, model)
    model = _moe_model()
    ops: set = set()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(ops))
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = _train_losses(model, compiled)
    torch._dynamo.reset()
    assert "bmm" in ops and "bincount" not in ops and "_grouped_mm" not in ops, sorted(ops)
    assert losses == pytest.approx(eager, rel=1e-5)
    assert len(set(losses)) == 3


def test_moe_layer_compiles_with_inductor_to_the_eager_result():
    """The default backend (inductor, C++ on CPU), fullgraph=True, one MoE layer: output and every gradient
    within 1e-5 of eager (the whole model under inductor takes minutes to build on a shared 2-core CPU; the
    aot_eager test above covers the model)."""
    layer = _moe_model().blocks[0].ffn
    x0 = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(6))
    results = []
    for wrap in (lambda m: m, lambda m: torch.compile(m, fullgraph=True)):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = wrap(layer)(x)
        (out.square().mean() + 0.01 * layer.last_aux.balance_loss).backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_GROUPED or moe_module.TORCH_VERSION < (2, 9), reason="no CPU grouped_mm kernel")
def test_bf16_compiled_moe_uses_the_self_tested_grouped_mm():
    """bf16 autocast on CPU: the compiled model takes torch._grouped_mm (its self-test ran when the model was
    moved to its device) and its losses equal eager bf16 to 2e-2 relative."""
    model = _moe_model().to("cpu")
    assert GROUPED_MM_VERDICTS[("cpu", None, torch.bfloat16)]
    eager = _train_losses(model, model, autocast=True)
    model = _moe_model().to("cpu")
    ops: set = set()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(ops))
    losses = _train_losses(model, compiled, autocast=True)
    torch._dynamo.reset()
    assert "_grouped_mm" in ops and "bmm" not in ops, sorted(ops)
    assert losses == pytest.approx(eager, rel=2e-2)


# ---------------------------------------------------------------- when grouped_mm is trusted

def _fake_cuda(dtype=torch.bfloat16):
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype,
                                 element_size=lambda: torch.empty(0, dtype=dtype).element_size())


@pytest.mark.skipif(not HAS_GROUPED, reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("capability,expected", [((8, 0), False), ((9, 0), True), ((10, 0), False),
                                                 ((10, 3), False), ((12, 0), False)])
def test_grouped_mm_only_on_hopper_in_bf16(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert grouped_mm_supported(_fake_cuda(), 32, 48) is expected
    assert not grouped_mm_supported(_fake_cuda(torch.float32), 32, 48)


@pytest.mark.skipif(not HAS_GROUPED, reason="this torch has no torch._grouped_mm")
def test_grouped_mm_not_on_cpu_before_torch_2_9(monkeypatch):
    monkeypatch.setattr(moe_module, "TORCH_VERSION", (2, 8))
    assert not grouped_mm_supported(torch.zeros(2, 32), 32, 48)
    monkeypatch.setattr(moe_module, "TORCH_VERSION", (2, 9))
    assert grouped_mm_supported(torch.zeros(2, 32), 32, 48)


def _empty_expert_leak(x, counts, w_gate, w_up, w_down):
    """A 'kernel' with the Blackwell bug's signature: right outputs, non-zero gradient for an empty expert."""
    out = Experts._loop(x, counts, w_gate, w_up, w_down)
    return out + 1e-12 * w_down[counts == 0].sum()


def _raises(*args):
    raise NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'CPU' backend")


@pytest.mark.parametrize("bad_kernel,reason", [
    (lambda x, c, g, u, d: Experts._loop(x, c, g, u, d) * 1.01, "output differs"),
    (_empty_expert_leak, "no tokens is not zero"),
    (_raises, "NotImplementedError"),
])
def test_self_test_catches_a_wrong_kernel_and_falls_back(monkeypatch, bad_kernel, reason):
    monkeypatch.setattr(Experts, "_grouped", staticmethod(bad_kernel))
    monkeypatch.setattr(moe_module, "TORCH_VERSION", (2, 13))
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(moe_module, "GROUPED_MM_VERDICTS", {})
    experts = _experts()
    counts = torch.tensor([3, 0, 4, 0, 5])
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match=f"failed its self-test.*{reason}"):
        out = experts(x, counts)
    assert moe_module.GROUPED_MM_VERDICTS == {("cpu", None, torch.float32): False}
    experts.dispatch = "loop"
    assert torch.equal(out, experts(x, counts))


@pytest.mark.skipif(not HAS_GROUPED or moe_module.TORCH_VERSION < (2, 9), reason="no CPU grouped_mm kernel")
def test_self_test_passes_for_this_torch_on_cpu(recwarn):
    for dtype in (torch.float32, torch.bfloat16):
        assert grouped_mm_self_test(torch.device("cpu"), dtype)
    assert not [w for w in recwarn if "self-test" in str(w.message)]


def test_self_test_leaves_the_global_random_state_alone(monkeypatch):
    monkeypatch.setattr(moe_module, "GROUPED_MM_VERDICTS", {})
    state = torch.get_rng_state()
    if HAS_GROUPED:
        grouped_mm_self_test(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(not HAS_GROUPED or moe_module.TORCH_VERSION < (2, 9), reason="no CPU grouped_mm kernel")
@pytest.mark.parametrize("first_use", ["no_grad", "inference_mode", "bf16_autocast", "checkpointed_block"])
def test_self_test_gives_the_same_verdict_wherever_it_first_runs(monkeypatch, first_use):
    """The self-test's first run may happen inside no_grad, inference mode, autocast or a checkpointed block
    (whose saved-tensor hooks would otherwise count its tensors and fail the recomputation): it passes
    there too, and the checkpointed model's backward works."""
    monkeypatch.setattr(moe_module, "GROUPED_MM_VERDICTS", {})
    model = _moe_model()  # built, not moved: the first forward runs the self-test
    idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(7))
    if first_use == "checkpointed_block":
        model.activation_checkpointing = 1
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + 0.01 * out.balance_loss).backward()
    else:
        context = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
                   "bf16_autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[first_use]
        with context:
            model(idx[:, :-1], idx[:, 1:])
    dtype = torch.bfloat16 if first_use == "bf16_autocast" else torch.float32  # the dtype the experts ran in
    assert moe_module.GROUPED_MM_VERDICTS == {("cpu", None, dtype): True}
