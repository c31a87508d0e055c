"""Verdicts of ``spannorm check``: the measurements of every depth turned into one line per question, each
``ok``, ``warn`` or ``unstable``. ``docs/stability.md`` explains every rule; the thresholds are below.

Architecture:
- ``forward``: the growth class of Var(x_l) over the layers of the deepest model (init and trained), and
  Var(x_L)/Var(x_0) in the label; the rule uses the largest growth max_l Var(x_l)/Var(x_0). Exponential growth
  beyond the band is unstable; polynomial growth beyond the band warns, unless a weight-free bound holds (Peri-LN,
  span). Where the bound holds, the stream's RMS grows at most linearly in l, so a profile the fit calls
  exponential is not compounding: beyond the band it warns instead.
  For ResiDual, x is the Post-LN stream; its dual stream d is described in the detail, not judged (it meets a
  norm before the head, and its size counts in the precision verdicts).
- ``gradient``: the first-to-last block gradient ratio r(L) across depths. Beyond the band at the deepest
  depth and exponential in L (a constant factor per block) is depth-unstable; a power law beyond the band
  warns; inside the band at every depth is ok ("depth-independent" when it moves by less than ×1.5).
- ``identity path``: ∏ α/σ over the norms on the skip path, measured beside the theory; below 1/band the clean
  path no longer carries the gradient (warn).
- ``peri bound``: Peri-LN's per-token bound on every sub-layer's update, and span's on every block's
  (the same argument with one norm per block; a violation would be a bug).
- ``collapse``: token uniformity of x_L (rank collapse) and whether per-block updates (angular distance)
  decay with depth.

Non-architectural causes:
- ``fp16`` / ``bf16``: headroom below the dtype's maximum of the largest |value| on the residual stream and
  inside the sub-layers (every linear layer's input and output, norm inputs, MoE expert hidden states, logits;
  ``Measurement.headroom_max_abs``), naming where it sits.
- ``attention logits``: the largest |q·k|/√d_head, and its growth over the training steps.
- ``clipping``: the fraction of training steps whose gradient norm exceeded the clip threshold (reported);
  a warning when norms reach 10× the threshold.
- ``training``: non-finite loss or gradient (divergence), loss spikes, and whether the loss went down.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from spannorm.diagnostics.check_results import DepthResult
from spannorm.theory.growth import depth_dependence, fit_growth

CHECKS = ("forward", "gradient", "identity path", "peri bound", "collapse", "fp16", "bf16", "attention logits",
          "clipping", "training")
"""Every check, in the order they are reported."""
STATUSES = ("ok", "warn", "unstable")
"""From good to bad; a target's overall status is its worst verdict."""

DEPTH_INDEPENDENT_SPREAD = 1.5
"""A ratio that moves by less than this factor across the depths is called depth-independent."""
COLLAPSE_UNIFORMITY = 0.9
"""Token uniformity of x_L at or above this: rank collapse."""
DECAYING_UPDATES = 0.5
"""Mean angular distance of the last quarter of blocks over the first quarter below this: updates decay."""
HEADROOM_WARN_LOG2 = -4.0
"""Fewer than 4 doublings (16×) of headroom below a dtype's maximum: warn. At or above 0: overflow."""
ATTN_LOGIT_WARN = 30.0
"""A |q·k|/√d_head above this makes softmax nearly one-hot (e^30 ≈ 1e13)."""
ATTN_LOGIT_GROWTH_WARN = 2.0
"""Attention logits that more than double over the short run: warn (logit growth)."""
CLIP_LOAD_BEARING = 10.0
"""A pre-clip gradient norm above this multiple of the clip threshold: clipping is load-bearing (warn). Early
steps of a fresh model routinely exceed a threshold of 1, so the fraction alone is reported, not judged."""
PERI_BOUND_SLACK = 1e-4
"""Relative slack on the Peri-LN bound for fp32 rounding."""


@dataclass
class Verdict:
    """One answer of ``check``."""

    check: str
    status: str
    """``ok``, ``warn`` or ``unstable``."""
    label: str
    """A few words, e.g. ``linear ×12.8``."""
    detail: str
    """One sentence with the numbers behind the label."""

    def to_dict(self) -> dict:
        return asdict(self)


def worst(statuses) -> str:
    """The worst of some statuses (``ok`` when there are none)."""
    return max(statuses, key=STATUSES.index, default="ok")


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


def _phases(result: DepthResult):
    yield "init", result.init
    if result.trained is not None:
        yield "trained", result.trained


# -------------------------------------------------------------------------------------------- architecture
def forward_verdict(results: list[DepthResult], band: float) -> Verdict:
    deepest = results[-1]
    peri_bound_holds = bool(deepest.init.peri_bound_ratio) and all(
        r <= 1 + PERI_BOUND_SLACK for _, m in _phases(deepest) for r in m.peri_bound_ratio.values())
    parts, statuses = [], []
    for phase, m in _phases(deepest):
        growth = fit_growth(m.stream_variance)
        end_to_end = m.stream_variance[-1] / m.stream_variance[0] if m.stream_variance[0] > 0 else math.inf
        label = "non-finite" if growth.non_finite else f"{growth.growth_class} ×{_fmt(end_to_end)}"
        parts.append((phase, label))
        beyond = not growth.non_finite and growth.factor > band
        if growth.non_finite or (growth.growth_class == "exponential" and beyond and not peri_bound_holds):
            statuses.append("unstable")
        elif growth.growth_class != "constant" and beyond and (
                not peri_bound_holds or growth.growth_class == "exponential"):
            statuses.append("warn")
        else:
            statuses.append("ok")
    label = " → ".join(label for _, label in parts)
    detail = (f"Var(x_l) over the {deepest.n_layers} layers of the deepest model: "
              + "; ".join(f"{phase}: {label}" for phase, label in parts) + f" (band ×{_fmt(band)})")
    if peri_bound_holds:
        detail += "; growth is at most linear by the weight-free (Peri-LN-type) bound, which holds"
    if deepest.init.dual_variance is not None:
        detail += "; ResiDual's dual stream d, normalized only once before the head, " + ", ".join(
            f"{phase}: {_growth_label(m.dual_variance)}" for phase, m in _phases(deepest) if m.dual_variance)
        detail += " (not judged here: its size counts in the fp16/bf16 headroom)"
    return Verdict("forward", worst(statuses), label, detail + ".")


def _growth_label(variances: list[float]) -> str:
    growth = fit_growth(variances)
    ratio = variances[-1] / variances[0] if variances[0] > 0 else math.inf
    return "non-finite" if growth.non_finite else f"{growth.growth_class} ×{_fmt(ratio)}"


def gradient_verdict(results: list[DepthResult], band: float) -> Verdict:
    depths = [r.n_layers for r in results]
    ratios = [r.init.grad_ratio for r in results]
    listed = ", ".join(f"{_fmt(g)} (L={L})" for L, g in zip(depths, ratios))
    detail = f"‖∂L/∂x_0‖/‖∂L/∂x_(L-1)‖ at init: {listed}"
    if any(g is None for g in ratios):
        return Verdict("gradient", "ok", "n/a", "no gradients were measured.")
    measured = [g for g in ratios if g is not None]  # all of them (checked above)
    if any(not math.isfinite(g) or g <= 0 for g in measured):
        return Verdict("gradient", "unstable", "non-finite", detail + ".")
    last = measured[-1]
    outside = not (1 / band <= last <= band)
    logs = [math.log(g) for g in measured]
    dep = depth_dependence(depths, measured)
    if not outside and all(1 / band <= g <= band for g in measured):
        if max(logs) - min(logs) <= math.log(DEPTH_INDEPENDENT_SPREAD) and len(measured) > 1:
            return Verdict("gradient", "ok", "depth-independent", detail + ".")
        return Verdict("gradient", "ok", "within band", detail + f" (band ×{_fmt(band)}).")
    if dep is None:
        return Verdict("gradient", "warn", "outside band", detail + "; one depth cannot tell how it scales.")
    if not outside:  # only shallower depths leave the band: not the depth instability SPEC §5 describes
        return Verdict("gradient", "warn", "outside band",
                       detail + f"; outside the band ×{_fmt(band)} at a shallower depth only.")
    if dep.model == "exponential":
        return Verdict("gradient", "unstable", f"depth-unstable ×{dep.per_block:.3g}/block",
                       detail + f"; exponential in depth, a factor {dep.per_block:.3g} per block "
                       f"(fits ln r = b·(L-1) better than a power law).")
    return Verdict("gradient", "warn", f"grows ~L^{dep.exponent:.2g}",
                   detail + f"; a power law in depth (exponent {dep.exponent:.2g}), not exponential.")


def identity_verdict(results: list[DepthResult], band: float) -> Verdict | None:
    if any(r.init.identity_product is None for r in results):
        return None
    if all(not r.init.identity_factors for r in results):
        return Verdict("identity path", "ok", "no norm on skip",
                       "no norm sits on the skip path: the identity path carries the gradient unscaled.")
    cells, statuses = [], []
    for r in results:
        measured = r.init.identity_product
        assert measured is not None  # checked above
        predicted = r.prediction.identity_product if r.prediction is not None else None
        cells.append(f"{_fmt(measured)} (theory {_fmt(predicted)}, L={r.n_layers})")
        statuses.append("warn" if measured < 1 / band else "ok")
    last = results[-1].init.identity_product
    return Verdict("identity path", worst(statuses), f"∏α/σ = {_fmt(last)}",
                   "∏ α/σ over the norms on the skip path at init: " + ", ".join(cells)
                   + (f"; below 1/{_fmt(band)} the clean path no longer carries the gradient."
                      if worst(statuses) != "ok" else "."))


def peri_bound_verdict(results: list[DepthResult]) -> Verdict | None:
    ratios = [v for r in results for _, m in _phases(r) for v in m.peri_bound_ratio.values()]
    if not ratios:
        return None
    worst_ratio = max(ratios)
    holds = worst_ratio <= 1 + PERI_BOUND_SLACK
    return Verdict("peri bound", "ok" if holds else "unstable", "holds" if holds else "violated",
                   f"max over tokens, sub-layers, depths and phases of ‖x_(k+1) − x_k‖ / "
                   f"(Δt(√d‖γ‖∞ + ‖β‖₂), times span's β for its blocks) = {worst_ratio:.3g} "
                   f"(≤ 1 when the bound holds).")


def collapse_verdict(results: list[DepthResult]) -> Verdict:
    deepest = results[-1]
    m = deepest.init
    L = deepest.n_layers
    uniformity = m.token_uniformity[-1]
    quarter = max(1, L // 4)
    first = sum(m.angular_distance[:quarter]) / quarter
    last = sum(m.angular_distance[-quarter:]) / quarter
    update_ratio = last / first if first > 0 else math.nan
    problems = []
    if uniformity >= COLLAPSE_UNIFORMITY:
        problems.append("rank collapse")
    if L >= 8 and update_ratio < DECAYING_UPDATES:
        problems.append("updates decay with depth")
    detail = (f"at init, L={L}: token uniformity of x_L {uniformity:.3g}, effective rank of x_L "
              f"{m.effective_rank[-1]:.3g} (x_0: {m.effective_rank[0]:.3g}), angular distance per block "
              f"{first:.3g} (first quarter) → {last:.3g} (last quarter)")
    return Verdict("collapse", "warn" if problems else "ok", ", ".join(problems) or "none", detail + ".")


# -------------------------------------------------------------------------------------------- other causes
def precision_verdicts(results: list[DepthResult]) -> list[Verdict]:
    out = []
    measured = [m for r in results for _, m in _phases(r)]
    internal = all(m.internal_max_abs is not None for m in measured)
    scope = "on the residual stream and inside the sub-layers" if internal else "at the residual-stream hook points"
    for name, attr in (("fp16", "fp16_headroom_log2"), ("bf16", "bf16_headroom_log2")):
        values = [(getattr(m, attr), r.n_layers, phase, m.headroom_where) for r in results for phase, m in _phases(r)]
        value, L, phase, where = max(values, key=lambda v: v[0])
        status = "unstable" if value >= 0 else "warn" if value > HEADROOM_WARN_LOG2 else "ok"
        label = "overflow" if value >= 0 else f"2^{value:.1f} of max"
        out.append(Verdict(name, status, label,
                           f"largest |value| {scope}, over every depth and phase, is "
                           f"{_fmt(2 ** value if math.isfinite(value) else value)}× the {name} maximum, at {where} "
                           f"(L={L}, {phase}); warn above 2^{HEADROOM_WARN_LOG2:.0f}."))
    return out


def attention_verdict(results: list[DepthResult]) -> Verdict | None:
    cells, statuses, growths = [], [], []
    for r in results:
        before = r.init.attn_logit_max_overall
        after = r.trained.attn_logit_max_overall if r.trained is not None else None
        if before is None:
            continue
        growth = after / before if after is not None and before > 0 else None
        growths.append(growth)
        cells.append(f"{_fmt(before)} → {_fmt(after)} (L={r.n_layers})")
        peak = max(v for v in (before, after) if v is not None)
        if (not math.isfinite(peak) or peak > ATTN_LOGIT_WARN
                or (growth is not None and growth > ATTN_LOGIT_GROWTH_WARN)):
            statuses.append("warn")
        else:
            statuses.append("ok")
    if not cells:
        return None
    finite = [g for g in growths if g is not None and math.isfinite(g)]
    label = f"max ×{max(finite):.3g} in training" if finite else "init only"
    return Verdict("attention logits", worst(statuses), label,
                   "max |q·k|/√d_head, init → after training: " + ", ".join(cells)
                   + f"; warn above {ATTN_LOGIT_WARN:g} or on growth beyond ×{ATTN_LOGIT_GROWTH_WARN:g}.")


def clipping_verdict(results: list[DepthResult]) -> Verdict | None:
    traces = [(r.n_layers, r.training) for r in results if r.training is not None and r.training.grad_norms]
    if not traces:
        return None
    clip = traces[0][1].clip
    cells = [f"{t.clip_fraction:.0%}, max norm {max(t.grad_norms):.3g} (L={L})" for L, t in traces]
    top = max(t.clip_fraction for _, t in traces)
    peak = max(max(t.grad_norms) for _, t in traces)
    load_bearing = clip > 0 and peak > CLIP_LOAD_BEARING * clip
    return Verdict("clipping", "warn" if load_bearing else "ok", f"engaged {top:.0%} of steps",
                   f"fraction of steps whose gradient norm exceeded the clip threshold {clip:g}: " + ", ".join(cells)
                   + (f"; norms beyond ×{CLIP_LOAD_BEARING:g} the threshold: without clipping this run would "
                      "take much larger steps (clipping is load-bearing)." if load_bearing else "."))


def training_verdict(results: list[DepthResult]) -> Verdict | None:
    traces = [(r.n_layers, r.training) for r in results if r.training is not None]
    if not traces:
        return None
    cells, statuses = [], []
    for L, t in traces:
        if t.diverged:
            cells.append(f"diverged at step {t.diverged_step} (L={L})")
            statuses.append("unstable")
            continue
        first, last = t.losses[0], t.final_loss
        cells.append(f"{first:.3g} → {last:.3g}" + (f", {t.loss_spikes} spike(s)" if t.loss_spikes else "")
                     + f" (L={L})")
        statuses.append("warn" if t.loss_spikes or not last < first else "ok")
    status = worst(statuses)
    label = {"ok": "loss decreases", "warn": "spikes or no progress", "unstable": "diverged"}[status]
    return Verdict("training", status, label, "training loss, first → mean of the last 10% of steps: "
                   + ", ".join(cells) + ".")


def judge(results: list[DepthResult], band: float) -> list[Verdict]:
    """Every verdict for one target, from its per-depth results (sorted by depth)."""
    verdicts = [forward_verdict(results, band), gradient_verdict(results, band),
                identity_verdict(results, band), peri_bound_verdict(results), collapse_verdict(results),
                *precision_verdicts(results), attention_verdict(results), clipping_verdict(results),
                training_verdict(results)]
    return [v for v in verdicts if v is not None]

