"""The Mixture-of-Experts FFN of SPEC §4: fp32 softmax router, top-k with renormalized gates, dropless
dispatch by sorting tokens per expert, an optional shared expert, and the auxiliary losses handed back.

Every shape in a forward pass is fixed by the batch, never by the routing, except in the ``loop`` dispatch
(one matmul per expert, split by the per-expert counts read on the host). So under ``torch.compile`` the
experts run as ``grouped`` (one ``torch._grouped_mm`` per weight, where that op is known right) or
``padded`` (each expert's tokens scattered into a (E, tokens, d) buffer and three batched matmuls: dropless,
at E/top_k times the expert FLOPs), and ``torch.compile(fullgraph=True)`` takes the whole layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.config import ModelConfig
from spannorm.model.layers import SwiGLU


@dataclass
class MoEAux:
    """What one MoE layer hands back to the caller after a forward pass."""

    balance_loss: torch.Tensor
    """Switch load-balancing loss E·Σ_e f_e·p_e; 1.0 at perfectly uniform routing."""
    z_loss: torch.Tensor
    """Router z-loss: mean over tokens of logsumexp(router logits)²."""
    load: torch.Tensor
    """Fraction of token-to-expert assignments each expert received, shape (E,), sums to 1 (no grad)."""


def switch_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E·Σ_e f_e·p_e, where f_e is the fraction of top-k assignments to expert e and p_e the mean router
    probability of e. Its minimum, 1, is reached when routing is uniform."""
    f = expert_counts(expert_idx, n_experts).float() / expert_idx.numel()
    p = probs.mean(dim=0)
    return n_experts * (f * p).sum()


def expert_counts(expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many assignments each expert received, shape (E,): ``torch.bincount`` with a shape that does not
    depend on the values (so ``torch.compile`` keeps it in the graph)."""
    flat = expert_idx.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def grouped_mm_supported(x: torch.Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` is known to run the expert matmuls of ``x`` (already in its compute
    dtype) right: the op exists; on CPU in fp32 or bf16 from torch 2.9 (2.8 has the op but no CPU kernel);
    on CUDA in bf16 on Hopper only (compute capability 9.x: Blackwell, 10.0 and newer, gives non-zero weight
    gradients to experts with no tokens, pytorch#172439, and NaN gradients on torch 2.13, pytorch#193633);
    and every row length (``widths``) is a multiple of 16 bytes, which the op requires. Under
    ``torch.compile`` only bf16 (the op's shape function rejects fp32 there). Where this says yes, the
    ``auto`` dispatch still runs :func:`grouped_mm_self_test` once before trusting the kernel."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok_dtype = TORCH_VERSION >= (2, 9) and (
            x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling()))
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and (9, 0) <= torch.cuda.get_device_capability(x.device) < (10, 0)
    else:
        ok_dtype = False
    return ok_dtype and all(w * x.element_size() % 16 == 0 for w in widths)


GROUPED_MM_VERDICTS: dict[tuple[str, int | None, torch.dtype], bool] = {}
"""Self-test verdicts of ``torch._grouped_mm`` by (device type, device index, dtype), for this process."""


def grouped_mm_self_test(device: torch.device, dtype: torch.dtype) -> bool:
    """Run ``torch._grouped_mm`` against the per-expert loop once per device and dtype (forward, and the
    gradients of the input and of every expert weight), with experts that receive no tokens first, in the
    middle and last; the weight gradients of those must be exactly zero and everything finite. The verdict
    is cached in :data:`GROUPED_MM_VERDICTS`; a failure warns once. Uses its own random generator, so the
    global random state is untouched."""
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    if key not in GROUPED_MM_VERDICTS:
        try:
            # wherever the first use happens (no_grad, inference mode, autocast, a checkpointed block whose
            # saved-tensor hooks would count the test's tensors), the test runs plainly, with gradients
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                problem = _grouped_mm_problem(device, dtype)
        except (RuntimeError, NotImplementedError) as err:  # no kernel for this device/dtype/shape
            problem = f"it raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if problem is not None:
            warnings.warn(f"torch._grouped_mm failed its self-test on {device.type} in {dtype} ({problem}); "
                          "the MoE experts use the loop dispatch (padded under torch.compile) instead",
                          RuntimeWarning, stacklevel=2)
        GROUPED_MM_VERDICTS[key] = problem is None
    return GROUPED_MM_VERDICTS[key]


def _grouped_mm_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """What is wrong with ``torch._grouped_mm`` against the loop on a small problem, or None."""
    counts = torch.tensor([0, 5, 0, 11, 3, 0], device=device)
    d, h = 32, 48
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(int(counts.sum()), d, generator=gen).to(device, dtype)
    w0 = [(torch.randn(len(counts), *shape, generator=gen) / shape[0] ** 0.5).to(device, dtype)
          for shape in ((d, h), (d, h), (h, d))]
    upstream = torch.randn(int(counts.sum()), d, generator=gen).to(device, dtype)
    results = []
    for run in (Experts._grouped, Experts._loop):
        x = x0.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in w0]
        out = run(x, counts, *ws)
        out.backward(upstream)
        results.append([out.detach(), x.grad] + [w.grad for w in ws])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, got, ref in zip(("output", "input grad", "w_gate grad", "w_up grad", "w_down grad"), *results):
        if got is None or not torch.isfinite(got).all():
            return f"{name} is missing or not finite"
        if (got.float() - ref.float()).abs().max() > tol * max(ref.float().abs().max().item(), 1.0):
            return f"{name} differs from the loop's"
    for name, grad in zip(("w_gate", "w_up", "w_down"), results[0][2:]):
        if grad[counts == 0].abs().max() != 0:
            return f"{name} grad of an expert with no tokens is not zero"
    return None


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: (E, d, h) for gate and up, (E, h, d) for down.

    ``dispatch`` picks how the tokens, sorted by expert, meet their expert's weights (the results are the
    same): ``grouped`` runs one grouped matmul per weight over all experts (``torch._grouped_mm``), ``loop``
    runs one matmul per expert (its split sizes are read on the host), ``padded`` scatters each expert's
    tokens into a (E, capacity, d) zero buffer and runs batched matmuls (static shapes, dropless when the
    capacity is the number of tokens), and ``auto`` (the default) takes ``grouped`` where it is supported
    (:func:`grouped_mm_supported`) and has passed :func:`grouped_mm_self_test`, else ``padded`` under
    ``torch.compile`` and ``loop`` in eager. A compiled forward cannot run the self-test: it uses
    ``grouped`` only after an eager forward or moving the module to its device has run it."""

    DISPATCHES = ("auto", "grouped", "loop", "padded")

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.dispatch = "auto"

    def _apply(self, fn, recurse=True):
        # Moving the experts to a device is the last eager moment before a compiled forward, which cannot
        # run the self-test: run it here for the dtypes the grouped dispatch would take on that device.
        out = super()._apply(fn, recurse)
        if not torch.compiler.is_compiling() and hasattr(torch, "_grouped_mm"):
            device = self.w_gate.device  # sharded (DTensor) weights: their local device; no data is read
            for dtype in (torch.float32, torch.bfloat16) if device.type == "cpu" else (torch.bfloat16,):
                if grouped_mm_supported(torch.empty(0, dtype=dtype, device=device), *self.w_gate.shape[1:]):
                    grouped_mm_self_test(device, dtype)
        return out

    def _resolve(self, x: torch.Tensor) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        if grouped_mm_supported(x, self.w_gate.shape[1], self.w_gate.shape[2]):
            key = (x.device.type, x.device.index, x.dtype)
            if GROUPED_MM_VERDICTS.get(key) if torch.compiler.is_compiling() else grouped_mm_self_test(
                    x.device, x.dtype):
                return "grouped"
        return "padded" if torch.compiler.is_compiling() else "loop"

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        """Apply expert e to its contiguous slice of ``x_sorted`` (tokens sorted by expert; ``counts[e]``
        tokens for expert e; ``capacity``, for the padded dispatch, bounds every count, default all rows).
        Under autocast the matmuls run in the autocast dtype; the result has the dtype of ``x_sorted``."""
        if self.dispatch not in self.DISPATCHES:
            raise ValueError(f"Experts.dispatch={self.dispatch!r} is invalid: "
                             f"allowed: {', '.join(self.DISPATCHES)}")
        device = x_sorted.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_sorted.dtype
        x = x_sorted.to(dtype)
        dispatch = self._resolve(x)
        with torch.autocast(device, enabled=False):
            w_gate, w_up, w_down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
            if dispatch == "grouped":
                out = self._grouped(x, counts, w_gate, w_up, w_down)
            elif dispatch == "padded":
                out = self._padded(x, counts, w_gate, w_up, w_down, capacity or x.shape[0])
            else:
                out = self._loop(x, counts, w_gate, w_up, w_down)
        return out.to(x_sorted.dtype)

    @staticmethod
    def _grouped(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x, w_gate, offs=offsets)) * torch._grouped_mm(x, w_up, offs=offsets)
        return torch._grouped_mm(h, w_down, offs=offsets)

    @staticmethod
    def _loop(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
              w_down: torch.Tensor) -> torch.Tensor:
        # split/unbind (not slicing and indexing) so that backward concatenates the gradients once instead of
        # materializing a full-size zero gradient per expert.
        outs = [(F.silu(xe @ g) * (xe @ u)) @ d
                for xe, g, u, d in zip(x.split(counts.tolist()), w_gate.unbind(0), w_up.unbind(0),
                                       w_down.unbind(0))]
        return torch.cat(outs)

    @staticmethod
    def _padded(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, capacity: int) -> torch.Tensor:
        ends = counts.cumsum(0)
        rows = torch.arange(x.shape[0], device=x.device)
        expert_of = torch.searchsorted(ends, rows, right=True)
        slot = rows - (ends - counts)[expert_of]
        buffer = x.new_zeros(counts.shape[0], capacity, x.shape[1]).index_put((expert_of, slot), x)
        h = F.silu(torch.bmm(buffer, w_gate)) * torch.bmm(buffer, w_up)
        return torch.bmm(h, w_down)[expert_of, slot]


class MoEFFN(nn.Module):
    """Dropless top-k MoE. After each forward, ``last_aux`` holds the layer's :class:`MoEAux`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.moe is not None
        self.n_experts, self.top_k = cfg.moe.n_experts, cfg.moe.top_k
        self.router = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        self.experts = Experts(self.n_experts, cfg.d_model, cfg.expert_hidden)
        self.shared_expert = SwiGLU(cfg.d_model, cfg.expert_hidden, cfg.bias) if cfg.moe.shared_expert else None
        self.last_aux: MoEAux | None = None

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits and probabilities in fp32 (autocast off: it would run the router matmul in bf16),
        the top-k experts and their renormalized gates."""
        with torch.autocast(flat.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())
            probs = logits.softmax(dim=-1)
            top_p, expert_idx = probs.topk(self.top_k, dim=-1)
            gates = top_p / top_p.sum(dim=-1, keepdim=True)
        return logits, probs, expert_idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, probs, expert_idx, gates = self.route(flat)
        flat_expert = expert_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k
        counts_t = expert_counts(flat_expert, self.n_experts)
        # top-k picks distinct experts, so no expert gets more assignments than there are tokens
        expert_out = self.experts(flat[token_of], counts_t, capacity=flat.shape[0])
        weighted = expert_out * gates.reshape(-1)[order].unsqueeze(-1).to(expert_out.dtype)
        y = torch.zeros_like(flat).index_add_(0, token_of, weighted)
        if self.shared_expert is not None:
            y = y + self.shared_expert(flat)
        self.last_aux = MoEAux(
            balance_loss=switch_balance_loss(probs, expert_idx, self.n_experts),
            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
            load=(counts_t.float() / flat_expert.numel()).detach(),
        )
        return y.view(shape)
