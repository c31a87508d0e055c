"""Measure a model on one batch: the statistics of SPEC §6 at every hook point, the gradient profile,
collapse, the identity path, the Peri-LN bound, the attention logits and the largest |value| inside the
sub-layers (for the fp16/bf16 headroom).

Everything is collected from outside the model: forward hooks on the residual hook points (through
:class:`~spannorm.diagnostics.recorder.ResidualRecorder`), forward pre-hooks on the norms that sit on the
identity path and on the attention modules, and forward (pre-)hooks on every linear layer, norm and MoE expert
stack (:class:`InternalMaxRecorder`). Gradients come from ``torch.autograd.grad``, so the model's own
``.grad`` fields are left untouched (a training run can measure between steps).

Usage::

    from spannorm import ModelConfig, DecoderLM
    from spannorm.diagnostics.measure import measure
    model = DecoderLM(ModelConfig(d_model=64, n_layers=8, placement="span"))
    tokens = torch.randint(0, 256, (4, 65))
    m = measure(model, tokens[:, :-1], tokens[:, 1:])
    m.variance_ratio, m.grad_ratio, m.identity_product
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.diagnostics import stats
from spannorm.diagnostics.recorder import ResidualRecorder
from spannorm.model.layers import CausalSelfAttention, RMSNorm
from spannorm.model.moe import Experts
from spannorm.model.placements import Block, SpanBlock
from spannorm.theory.bounds import peri_bound_ratios, peri_step_bound, span_step_bound
from spannorm.theory.meanfield import IDENTITY_PATH_NORMS


@dataclass
class Measurement:
    """Every measurement of one model on one batch. Per-point lists follow ``points`` (forward order);
    per-stream lists follow x_0 … x_L; per-block lists follow blocks 0 … L-1."""

    points: list[str]
    """Hook points: ``embed`` (x_0), ``block{l}.mid`` (after block l's attention, where the block has one),
    ``block{l}.out`` (x_{l+1}) and, for ResiDual, ``block{l}.dual`` (its dual stream d_{l+1}; d_0 = x_0)."""
    mean_abs: list[float]
    entry_variance: list[float]
    data_variance: list[float]
    rms: list[float]
    max_abs: list[float]
    act_grad_norm: list[float] | None
    """‖∂loss/∂H‖ at each point (None when measured without gradients)."""
    stream_points: list[str]
    """The points that are the residual stream x_0 … x_L."""
    block_param_grad_norm: list[float] | None
    """‖∂loss/∂θ‖ over each block's parameters."""
    adjacent_cosine: list[float]
    """cos(x_l, x_{l+1}) per token, averaged, for l = 0 … L-1."""
    angular_distance: list[float]
    """arccos of the same cosine over π, for l = 0 … L-1."""
    effective_rank: list[float]
    """Effective rank of x_0 … x_L."""
    token_uniformity: list[float]
    """Mean pairwise token cosine of x_0 … x_L."""
    attn_logit_max: list[float | None]
    """max |q·k|/√d_head over heads and causal pairs per block (None for a block without our attention)."""
    internal_max_abs: float | None = None
    """max |value| inside the model, off the residual stream: every ``nn.Linear``'s input and output, every
    norm's input, each MoE expert's gate and up projections and their SwiGLU product, and the logits (see
    :class:`InternalMaxRecorder`). None when not measured."""
    internal_max_where: str | None = None
    """Where ``internal_max_abs`` sits: a module name with `` (input)``, `` (output)`` or `` (hidden)``, or
    ``logits``."""
    identity_factor_names: list[str] = field(default_factory=list)
    """The norms on the identity path (``block{l}.{position}``)."""
    identity_factors: list[float] = field(default_factory=list)
    """α·RMS(skip input)/RMS(pre-norm sum) of each of them, from the norms' actual inputs."""
    peri_bound_ratio: dict[str, float] = field(default_factory=dict)
    """For Peri-LN blocks, per sub-layer (``block{l}.attn``/``.ffn``): max over tokens of
    ‖x_{k+1} − x_k‖₂ / (Δt·(√d‖γᵒ‖∞ + ‖βᵒ‖₂)); for span blocks, per block (``block{l}.block``), the same
    with the bound Δt·β·(√d‖γₒ‖∞ + ‖bₒ‖₂). The bound holds when every value is ≤ 1."""
    loss: float = math.nan

    # ---------------------------------------------------------------- views
    def at_stream(self, values: list[float]) -> list[float]:
        """The entries of a per-point list at x_0 … x_L."""
        index = {name: i for i, name in enumerate(self.points)}
        return [values[index[name]] for name in self.stream_points]

    @property
    def n_layers(self) -> int:
        return len(self.stream_points) - 1

    @property
    def stream_variance(self) -> list[float]:
        """Entry-wise variance of x_0 … x_L."""
        return self.at_stream(self.entry_variance)

    @property
    def variance_ratio(self) -> float:
        """Var(x_L)/Var(x_0), entry-wise."""
        v = self.stream_variance
        return v[-1] / v[0] if v[0] > 0 else math.inf

    @property
    def dual_variance(self) -> list[float] | None:
        """ResiDual: entry-wise variance of its dual stream d_0 … d_L (d_0 is the embedding output x_0); None for
        a model with one stream. The stream statistics above describe x, the stream its blocks normalize."""
        index = {name: i for i, name in enumerate(self.points)}
        dual = [name for name in self.points if name.endswith(".dual")]
        if not dual:
            return None
        return [self.entry_variance[index[name]] for name in ["embed", *dual]]

    @property
    def block_input_grad_norm(self) -> list[float] | None:
        """‖∂loss/∂x_l‖ for the block inputs x_0 … x_{L-1}. For ResiDual, x_0 (the embedding output) feeds both
        streams, so its gradient includes d's; at l ≥ 1 it is the gradient of the Post-LN stream x_l."""
        return None if self.act_grad_norm is None else self.at_stream(self.act_grad_norm)[:-1]

    @property
    def grad_ratio(self) -> float | None:
        """‖∂loss/∂x_0‖ / ‖∂loss/∂x_{L-1}‖: the first-to-last block gradient ratio."""
        g = self.block_input_grad_norm
        if g is None:
            return None
        return g[0] / g[-1] if g[-1] > 0 else math.inf

    @property
    def identity_product(self) -> float | None:
        """∏ α/σ over the norms on the identity path; 1.0 for placements without such norms, None for blocks
        this module does not know (a user's block)."""
        if self.identity_factors:
            return math.prod(self.identity_factors)
        return None if self.identity_factor_names is None else 1.0

    @property
    def max_abs_overall(self) -> float:
        """max |H| over the residual-stream hook points."""
        return max(self.max_abs)

    def _headroom_candidates(self) -> list[tuple[float, str]]:
        out = [(value, f"{point} ({'dual' if point.endswith('.dual') else 'residual'} stream)")
               for value, point in zip(self.max_abs, self.points)]
        if self.internal_max_abs is not None:
            out.append((self.internal_max_abs, self.internal_max_where or "inside the model"))
        return out

    @property
    def headroom_max_abs(self) -> float:
        """The largest |value| the headroom is measured on: the stream's max |H| or the internal max, whichever is
        larger (NaN counts as larger than anything)."""
        return _largest(self._headroom_candidates())[0]

    @property
    def headroom_where(self) -> str:
        """Where :attr:`headroom_max_abs` sits: a hook point (``block3.out (residual stream)``) or the module
        of :attr:`internal_max_where`."""
        return _largest(self._headroom_candidates())[1]

    @property
    def fp16_headroom_log2(self) -> float:
        """log2(max |value| / 65504) over every hook point and every internal activation: negative means room,
        ≥ 0 means fp16 overflows."""
        return stats.headroom_log2(self.headroom_max_abs, stats.FP16_MAX)

    @property
    def bf16_headroom_log2(self) -> float:
        """log2(max |value| / bf16 max) over every hook point and every internal activation."""
        return stats.headroom_log2(self.headroom_max_abs, stats.BF16_MAX)

    @property
    def attn_logit_max_overall(self) -> float | None:
        values = [v for v in self.attn_logit_max if v is not None]
        return max(values) if values else None

    def summary(self) -> dict[str, float]:
        """Scalar summaries (for metrics.jsonl and TensorBoard), keyed without a prefix."""
        out = {
            "loss": self.loss,
            "variance_ratio": self.variance_ratio,
            "rms_last": self.at_stream(self.rms)[-1],
            "max_abs": self.max_abs_overall,
            **({"internal_max_abs": self.internal_max_abs} if self.internal_max_abs is not None else {}),
            "fp16_headroom_log2": self.fp16_headroom_log2,
            "bf16_headroom_log2": self.bf16_headroom_log2,
            "cosine_last": self.adjacent_cosine[-1],
            "angular_distance_last": self.angular_distance[-1],
            "effective_rank_last": self.effective_rank[-1],
            "token_uniformity_last": self.token_uniformity[-1],
        }
        if self.grad_ratio is not None:
            out["grad_ratio"] = self.grad_ratio
        if self.block_param_grad_norm is not None:
            out["param_grad_norm_max_block"] = max(self.block_param_grad_norm)
        if self.attn_logit_max_overall is not None:
            out["attn_logit_max"] = self.attn_logit_max_overall
        if self.identity_factors:
            out["identity_product"] = math.prod(self.identity_factors)  # = self.identity_product
        if self.peri_bound_ratio:
            out["peri_bound_ratio_max"] = max(self.peri_bound_ratio.values())
        if self.dual_variance is not None:
            out["dual_variance_ratio"] = self.dual_variance[-1] / self.dual_variance[0]
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _largest(candidates: list[tuple[float, str]]) -> tuple[float, str]:
    """The (value, where) with the largest value; a NaN (an overflow gone bad) wins over every number."""
    return max(candidates, key=lambda c: math.inf if math.isnan(c[0]) else c[0])


# -------------------------------------------------------------------------------------------- internal max
NORMS: tuple[type[nn.Module], ...] = (RMSNorm, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
"""Norm modules whose input is recorded: pre-norm sums such as Post-LN's x + A(x) or SpanNorm's
α·x + β·(a + f) are formed outside any module and seen here."""


def _max_abs(t: torch.Tensor) -> torch.Tensor | None:
    """max |t| as a 0-dim tensor on t's device (one reduction, no copy, no sync); None for an empty tensor."""
    return torch.linalg.vector_norm(t.detach(), ord=math.inf) if t.numel() else None


@torch.no_grad()
def expert_hidden_max(experts: Experts, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """max |·| over every expert's gate projection, up projection and their product silu(gate)·up (the input
    of its down projection), recomputed in fp32 from the expert's stacked weights on the tokens it received,
    as :meth:`Experts.forward` computes them. The experts' matmuls use stacked weights, not ``nn.Linear``, so no
    hook sees these hidden states; the recomputation costs two of the three expert matmuls again."""
    x = x_sorted.detach().float()
    best = None
    with torch.autocast(x.device.type, enabled=False):  # fp32 even when the caller runs under autocast
        for xe, w_gate, w_up in zip(x.split(counts.tolist()), experts.w_gate.unbind(0), experts.w_up.unbind(0)):
            if not xe.numel():
                continue
            gate, up = xe @ w_gate.float(), xe @ w_up.float()
            for h in (gate, up, F.silu(gate) * up):
                value = _max_abs(h)
                assert value is not None  # xe has tokens, so h is not empty
                best = value if best is None else torch.maximum(best, value)
    return best


class InternalMaxRecorder:
    """Context manager that keeps max |value| of the activations inside a model's sub-layers, from outside the
    model: a forward hook on every ``nn.Linear`` (its input and output: the attention q/k/v/o projections, the
    FFN gate and up outputs, and the SwiGLU product as the down projection's input), a forward pre-hook on
    every norm in :data:`NORMS` (its input), and on every MoE :class:`~spannorm.model.moe.Experts` stack its
    input, its output and its hidden states (:func:`expert_hidden_max`). Each record is one reduction kept on
    the device; :meth:`largest` syncs once. Module names are ``model.named_modules()`` names; the logits are
    added by the caller with :meth:`add` (the LM head is ``F.linear`` on its weight, the embedding or
    ``lm_head.weight``, not a module call)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def add(self, where: str, t: torch.Tensor | None) -> None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return
        self._keep(where, _max_abs(t))

    def _keep(self, where: str, value: torch.Tensor | None) -> None:
        if value is None:
            return
        value = value.float()
        old = self.values.get(where)
        self.values[where] = value if old is None else torch.maximum(old, value)  # a module called twice

    def _io_hook(self, name: str):
        def hook(_module, args, output):
            if args:
                self.add(f"{name} (input)", args[0])
            self.add(f"{name} (output)", output)
        return hook

    def _input_hook(self, name: str):
        def hook(_module, args):
            if args:
                self.add(f"{name} (input)", args[0])
        return hook

    def _experts_hook(self, name: str):
        def hook(module, args):
            x_sorted, counts = args[0], args[1]
            self.add(f"{name} (input)", x_sorted)
            self._keep(f"{name} (hidden)", expert_hidden_max(module, x_sorted, counts))
        return hook

    def __enter__(self) -> InternalMaxRecorder:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._io_hook(name)))
            elif isinstance(module, NORMS):
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            elif isinstance(module, Experts):
                self._handles.append(module.register_forward_pre_hook(self._experts_hook(name)))
                self._handles.append(module.register_forward_hook(
                    lambda _m, _args, output, name=name: self.add(f"{name} (output)", output)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def largest(self) -> tuple[float | None, str | None]:
        """(max |value|, where) over everything recorded; (None, None) when nothing was."""
        if not self.values:
            return None, None
        names = list(self.values)
        values = torch.stack([self.values[n] for n in names]).cpu().tolist()
        return _largest(list(zip(values, names)))


# -------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def attention_logit_max(attn: CausalSelfAttention, x: torch.Tensor) -> float:
    """max |q·k|/√d_head over heads and causal (query, key) pairs, recomputed from the attention module's
    own projections (and per-head norms and rotary) on its input ``x``, exactly as its forward computes
    them before softmax."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim)
    if attn.qkv_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = attn.rotary(q.transpose(1, 2), k.transpose(1, 2))
    if attn.n_kv_heads != attn.n_heads:
        k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return logits.abs().masked_fill(~causal, 0.0).max().item()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def measure(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, *, grads: bool = True) -> Measurement:
    """Run ``model`` on (idx, targets) and measure it. ``model`` is a :class:`~spannorm.DecoderLM` or any
    module with ``blocks`` and the same hook points (e.g. :class:`~spannorm.diagnostics.custom.CustomBlockLM`)
    whose forward returns an object with ``loss``. With ``grads``, the loss is differentiated (without
    touching ``.grad``) for the activation- and parameter-gradient profiles."""
    model = _unwrap(model)
    blocks = list(cast(Iterable[nn.Module], model.blocks))  # nn.Module.__getattr__ is typed Tensor | Module
    norm_input_rms: dict[str, float] = {}
    attn_inputs: dict[int, list[tuple[CausalSelfAttention, torch.Tensor]]] = {}
    known_identity = True
    handles = []
    for layer, block in enumerate(blocks):
        placement = getattr(block, "placement", None)
        if placement is None:
            known_identity = False
        for position, _ in (IDENTITY_PATH_NORMS.get(placement, ()) if placement is not None else ()):
            key = f"block{layer}.{position}"
            handles.append(getattr(block, f"{position}_norm").register_forward_pre_hook(
                lambda _m, args, key=key: norm_input_rms.__setitem__(key, stats.rms(args[0].detach()))))
        for module in block.modules():
            if isinstance(module, CausalSelfAttention):
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, layer=layer: attn_inputs.setdefault(layer, []).append((m, args[0].detach()))))
    internal = InternalMaxRecorder(model)
    try:
        with torch.enable_grad(), ResidualRecorder(model, grads=False, detach=False) as rec, internal:
            out = model(idx, targets)
        internal.add("logits", getattr(out, "logits", None))
        activations = rec.activations
        points = list(activations)
        act_grads = param_grads = None
        if grads and out.loss is not None and out.loss.requires_grad:
            block_params = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
            flat_params = [p for params in block_params for p in params]
            inputs = [activations[name] for name in points] + flat_params
            grads_all = torch.autograd.grad(out.loss, inputs, allow_unused=True)
            act_grads = [0.0 if g is None else g.float().norm().item() for g in grads_all[:len(points)]]
            param_grads, offset = [], len(points)
            for params in block_params:
                chunk = grads_all[offset:offset + len(params)]
                offset += len(params)
                param_grads.append(math.sqrt(sum(0.0 if g is None else g.float().pow(2).sum().item()
                                                 for g in chunk)))
    finally:
        for handle in handles:
            handle.remove()

    internal_max_abs, internal_max_where = internal.largest()
    acts = {name: activations[name].detach() for name in points}
    stream_points = ["embed"] + [name for name in points if name.endswith(".out")]
    stream = [acts[name] for name in stream_points]
    m = Measurement(
        points=points,
        mean_abs=[stats.mean_abs(acts[n]) for n in points],
        entry_variance=[stats.entrywise_variance(acts[n]) for n in points],
        data_variance=[stats.datawise_variance(acts[n]) for n in points],
        rms=[stats.rms(acts[n]) for n in points],
        max_abs=[stats.max_abs(acts[n]) for n in points],
        act_grad_norm=act_grads,
        stream_points=stream_points,
        block_param_grad_norm=param_grads,
        adjacent_cosine=[stats.adjacent_cosine(a, b) for a, b in zip(stream, stream[1:])],
        angular_distance=[stats.angular_distance(a, b) for a, b in zip(stream, stream[1:])],
        effective_rank=[stats.effective_rank(h) for h in stream],
        token_uniformity=[stats.token_uniformity(h) for h in stream],
        attn_logit_max=[max((attention_logit_max(a, x) for a, x in attn_inputs[layer]), default=None)
                        if layer in attn_inputs else None for layer in range(len(blocks))],
        internal_max_abs=internal_max_abs,
        internal_max_where=internal_max_where,
        loss=out.loss.item() if out.loss is not None else math.nan,
    )
    if known_identity:
        _identity_path(m, blocks, acts, stream, norm_input_rms)
    else:
        m.identity_factor_names = None  # type: ignore[assignment]  # unknown blocks: not defined
    _peri_bound(m, blocks, acts, stream)
    return m


def _identity_path(m: Measurement, blocks: list[nn.Module], acts: dict[str, torch.Tensor],
                   stream: list[torch.Tensor], norm_input_rms: dict[str, float]) -> None:
    for layer, block in enumerate(blocks):
        alpha = float(getattr(block, "alpha", 1.0))
        # every block has a placement here (see measure); nn.Module.__getattr__ is typed Tensor | Module
        for position, source in IDENTITY_PATH_NORMS.get(cast(str, block.placement), ()):
            key = f"block{layer}.{position}"
            skip = stream[layer] if source == "in" else acts[f"block{layer}.mid"]
            m.identity_factor_names.append(key)
            m.identity_factors.append(alpha * stats.rms(skip) / norm_input_rms[key])


def _peri_bound(m: Measurement, blocks: list[nn.Module], acts: dict[str, torch.Tensor],
                stream: list[torch.Tensor]) -> None:
    for layer, block in enumerate(blocks):
        placement = getattr(block, "placement", None)
        if placement == "span":
            span = cast(SpanBlock, block)
            m.peri_bound_ratio[f"block{layer}.block"] = peri_bound_ratios(
                stream[layer + 1] - stream[layer],
                span_step_bound(span.block_out_norm, span.delta_t, span.beta))
        if placement != "peri":
            continue
        x_in, mid, x_out = stream[layer], acts[f"block{layer}.mid"], stream[layer + 1]
        peri = cast(Block, block)  # the peri placement's block
        m.peri_bound_ratio[f"block{layer}.attn"] = peri_bound_ratios(
            mid - x_in, peri_step_bound(peri.attn_out_norm, peri.delta_t))
        m.peri_bound_ratio[f"block{layer}.ffn"] = peri_bound_ratios(
            x_out - mid, peri_step_bound(peri.ffn_out_norm, peri.delta_t))
