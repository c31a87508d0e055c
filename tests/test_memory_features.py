"""Activation checkpointing and the chunked cross-entropy: the same loss and gradients as the plain path
(same seed; tolerances stated per test), and a lower peak of the CPU allocator (measured with the torch
profiler's allocation events, which carry the allocator's running total; ``tracemalloc`` does not see torch
tensors, whose memory comes from c10's allocator and not Python's)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from spannorm.cli.main import main
from spannorm.config import PLACEMENTS, ModelConfig, MoEConfig
from spannorm.model.loss import chunked_cross_entropy
from spannorm.model.transformer import DecoderLM
from spannorm.train.config import ConfigError, TrainConfig


def peak_cpu_bytes(fn) -> int:
    """Peak bytes held by the CPU allocator while ``fn()`` runs, above what was held when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.total_allocated,
                           event.extra_fields.alloc_size))
    events.sort()
    first_total, first_size = events[0][1], events[0][2]
    return max(total for _, total, _ in events) - (first_total - first_size)


def _model(placement="pre", moe=None, n_layers=4, vocab=64, d=32, seed=0, **kw) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=4, context_length=32,
                      placement=placement, moe=moe, **kw)
    return DecoderLM(cfg)


def _loss_and_grads(model: DecoderLM, idx, targets, objective=False):
    model.zero_grad(set_to_none=True)
    out = model(idx, targets)
    loss = out.loss
    if objective and out.balance_loss is not None:  # the trainer's objective: aux losses backpropagate too
        loss = loss + 0.01 * out.balance_loss + 0.001 * out.z_loss
    loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(vocab=64, batch=2, t=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (batch, t), generator=g)
    return idx, torch.randint(0, vocab, (batch, t), generator=g)


# ---------------------------------------------------------------- chunked cross-entropy

@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_plain_loss_and_grads(chunk):
    """fp32: loss within 1e-6 relative, every gradient within atol 1e-6 + rtol 1e-5 of the plain path."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (3, 20), generator=g)
    targets[0, :5] = -100  # ignored positions leave the mean, as in F.cross_entropy
    plain = F.cross_entropy(F.linear(hidden, weight).float().view(-1, 50), targets.reshape(-1))
    gh, gw = torch.autograd.grad(2.5 * plain, (hidden, weight))
    chunked = chunked_cross_entropy(hidden, weight, targets, chunk)
    ch, cw = torch.autograd.grad(2.5 * chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ch, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cw, gw, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_under_bf16_autocast_is_close_to_plain():
    """bf16 autocast: both paths run the head matmul in bf16 and the softmax in fp32; loss within 1e-3
    relative and gradients within 2e-2 (bf16 rounding of the matmul inputs and of dlogits)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = (0.2 * torch.randn(100, 32, generator=g)).requires_grad_()
    targets = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(hidden, weight.to(hidden.dtype)).float(), targets)
        chunked = chunked_cross_entropy(hidden, weight, targets, 16)
    grads_plain = torch.autograd.grad(plain, (hidden, weight))
    grads_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads_chunked, grads_plain):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_chunked_cross_entropy_without_grad_keeps_nothing_for_backward():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (40,), generator=g)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, targets, 9)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("moe", [None, MoEConfig(n_experts=4, top_k=2)], ids=["dense", "moe"])
def test_model_loss_chunks_equal_plain_model(moe):
    """Whole model, fp32, same seed: loss within 1e-6 and every parameter gradient within atol 1e-6 + rtol
    1e-5; the output then carries no logits."""
    idx, targets = _batch()
    plain = _model(moe=moe)
    chunked = _model(moe=moe)
    chunked.loss_chunk_tokens = 13
    loss_a, grads_a = _loss_and_grads(plain, idx, targets, objective=True)
    loss_b, grads_b = _loss_and_grads(chunked, idx, targets, objective=True)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert chunked(idx, targets).logits is None
    assert chunked(idx).logits.shape == (2, 32, 64)  # no targets: logits as before


def test_chunked_loss_lowers_peak_memory():
    """A large vocabulary against a small width: the plain path holds (tokens, vocab) logits in the model
    dtype and in fp32 plus their gradient; 64-token chunks hold one chunk of them."""
    idx, targets = _batch(vocab=4096, batch=4, t=32)
    plain = _model(vocab=4096, n_layers=1)
    chunked = _model(vocab=4096, n_layers=1)
    chunked.loss_chunk_tokens = 16

    def step(model):
        return lambda: model(idx, targets).loss.backward()

    peak_plain, peak_chunked = peak_cpu_bytes(step(plain)), peak_cpu_bytes(step(chunked))
    logits_bytes = 4 * 32 * 4096 * 4
    assert peak_plain - peak_chunked > 2 * logits_bytes, (peak_plain, peak_chunked)


# ---------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("moe", [None, MoEConfig(n_experts=4, top_k=2)], ids=["dense", "moe"])
def test_activation_checkpointing_gives_the_plain_loss_and_grads(placement, moe):
    """Every placement, dense and MoE, every block and every 2nd/3rd block: recomputation replays the same
    ops in the same order on CPU, so the loss and every gradient (aux losses included) are bit-equal."""
    idx, targets = _batch()
    plain = _model(placement, moe=moe)
    loss_a, grads_a = _loss_and_grads(plain, idx, targets, objective=True)
    for every in (1, 2, 3):
        model = _model(placement, moe=moe)
        model.activation_checkpointing = every
        loss_b, grads_b = _loss_and_grads(model, idx, targets, objective=True)
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=f"{every} {name}")


def test_activation_checkpointing_lowers_peak_memory_in_order():
    """8 blocks: checkpointing every block keeps less than every 2nd block, which keeps less than none."""
    idx, targets = _batch(vocab=64, batch=8, t=32)
    peaks = {}
    for every in (0, 2, 1):
        model = _model(n_layers=8, d=64)
        model.activation_checkpointing = every
        peaks[every] = peak_cpu_bytes(lambda model=model: model(idx, targets).loss.backward())
    assert peaks[1] < peaks[2] < peaks[0], peaks
    assert peaks[1] < 0.6 * peaks[0], peaks


def test_activation_checkpointing_is_off_in_eval_and_without_grad():
    idx, targets = _batch()
    model = _model()
    model.activation_checkpointing = 1
    reference = _model()
    with torch.no_grad():
        assert torch.equal(model(idx, targets).loss, reference(idx, targets).loss)
    model.eval()
    out = model(idx, targets)
    assert torch.equal(out.loss, reference.eval()(idx, targets).loss)


@pytest.mark.parametrize("field", ["activation_checkpointing", "loss_chunk_tokens"])
def test_memory_fields_are_validated(field):
    assert getattr(TrainConfig(), field) == 0  # off by default: the CPU default path is unchanged
    with pytest.raises(ConfigError, match=rf"train\.{field}=-1 is invalid"):
        TrainConfig(**{field: -1}).validate()


# ---------------------------------------------------------------- through the trainer

def _train_run(tmp_path, name, *extra) -> list[dict]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_bytes(inspect.getsource(json.decoder).encode())
    out = tmp_path / name
    args = ["train", "--out", str(out), "--model.d_model=32", "--model.n_layers=3", "--model.n_heads=2",
            "--model.context_length=32", "--model.moe.n_experts=4", "--model.moe.top_k=2",
            f"--data.path={corpus}", f"--data.cache_dir={tmp_path / 'cache'}", "--train.batch_size=4",
            "--train.steps=3", "--train.eval_every=3", "--train.eval_batches=2", "--train.checkpoint_every=0",
            "--train.log_every=1", "--train.tensorboard=false", "--train.device=cpu", "--train.progress=none",
            *extra]
    assert main(args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_train_section_switches_both_features_on(tmp_path):
    """``spannorm train`` with an MoE model: activation checkpointing every 2nd block gives the plain run's
    training and validation losses bit for bit; 16-token loss chunks give them within 1e-5 relative."""
    torch.set_num_threads(1)
    plain = _train_run(tmp_path, "plain")
    checkpointed = _train_run(tmp_path, "ac", "--train.activation_checkpointing=2")
    chunked = _train_run(tmp_path, "chunked", "--train.loss_chunk_tokens=16")
    key = lambda rows, k: [r[k] for r in rows if k in r]  # noqa: E731
    for k in ("train_loss", "val_loss"):
        assert key(plain, k) and key(checkpointed, k) == key(plain, k)
        assert key(chunked, k) == pytest.approx(key(plain, k), rel=1e-5)


def test_bad_memory_setting_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--train.loss_chunk_tokens=-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.loss_chunk_tokens=-4 is invalid" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_and_loss_chunks_compile_with_fullgraph(every):
    """torch.compile(fullgraph=True) of an MoE model with checkpointed blocks (their aux-loss attribute is
    set in forward, not replayed in the recomputation) and chunked loss: loss and every gradient within
    1e-5 of the eager plain model."""
    idx, targets = _batch()
    moe = MoEConfig(n_experts=4, top_k=2)
    loss_a, grads_a = _loss_and_grads(_model(moe=moe, n_layers=3), idx, targets, objective=True)
    model = _model(moe=moe, n_layers=3)
    model.activation_checkpointing, model.loss_chunk_tokens = every, 24
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    out = compiled(idx, targets)
    (out.loss + 0.01 * out.balance_loss + 0.001 * out.z_loss).backward()
    torch._dynamo.reset()
    torch.testing.assert_close(out.loss.detach(), loss_a, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_a[name], rtol=1e-5, atol=1e-5, msg=name)
