"""What ``spannorm check`` writes and prints: ``report.json`` (schema: ``spannorm/schemas/report.schema.json``),
``report.md``, PNG plots per target (moments against layer, the gradient profile, collapse) and the verdict
tables printed to the terminal."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np
import torch

import spannorm
from spannorm.diagnostics.check import CheckRun, TargetResult
from spannorm.diagnostics.check_results import DepthResult
from spannorm.diagnostics.measure import Measurement
from spannorm.diagnostics.verdicts import CHECKS
from spannorm.theory.criterion import ScalingSuggestion
from spannorm.theory.growth import fit_growth
from spannorm.theory.meanfield import InitPrediction

SCHEMA_VERSION = 1
REPORT_JSON, REPORT_MD = "report.json", "report.md"
PLOT_KINDS = ("moments", "gradients", "collapse")


def load_schema() -> dict:
    """The JSON Schema of ``report.json``, shipped as package data."""
    return json.loads(resources.files("spannorm.schemas").joinpath("report.schema.json").read_text())


def slug(name: str) -> str:
    """A file-name-safe form of a target name (``pkg.mod:factory`` -> ``pkg_mod_factory``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "target"


def _clean(value):
    """JSON-safe: non-finite floats become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ JSON
def measurement_json(m: Measurement) -> dict:
    out = m.to_dict()
    out.update(variance_ratio=m.variance_ratio, grad_ratio=m.grad_ratio, identity_product=m.identity_product,
               fp16_headroom_log2=m.fp16_headroom_log2, bf16_headroom_log2=m.bf16_headroom_log2,
               stream_variance=m.stream_variance, block_input_grad_norm=m.block_input_grad_norm,
               attn_logit_max_overall=m.attn_logit_max_overall,
               variance_growth=fit_growth(m.stream_variance).to_dict())
    return out


def prediction_json(p: InitPrediction) -> dict:
    return {"stream_mean_square": p.stream_mean_square, "token_correlation": p.token_correlation,
            "branch_variance": p.branch_variance, "identity_factor_names": p.identity_factor_names,
            "identity_factors": p.identity_factors, "identity_product": p.identity_product,
            "variance_ratio": p.variance_ratio, "grad_norm": p.grad_norm, "grad_ratio": p.grad_ratio}


def suggestion_json(s: ScalingSuggestion) -> dict:
    def band(b):
        return None if b is None else {"value": b.value, "variance_ratio": b.variance_ratio,
                                       "grad_ratio": b.grad_ratio, "identity_product": b.identity_product}
    return {"knob": s.knob, "config_field": s.config_field, "band": s.band, "configured": band(s.configured),
            "configured_within_band": s.configured_within_band, "boundary": band(s.boundary),
            "recommended": s.recommended, "peri_rms_growth_bound": s.peri_rms_growth_bound}


def depth_json(d: DepthResult) -> dict:
    return {"n_layers": d.n_layers, "model_config": d.model_config, "init": measurement_json(d.init),
            "trained": measurement_json(d.trained) if d.trained is not None else None,
            "training": d.training.to_dict() if d.training is not None else None,
            "prediction": prediction_json(d.prediction) if d.prediction is not None else None,
            "suggestion": suggestion_json(d.suggestion) if d.suggestion is not None else None}


def report_json(run: CheckRun, plots: dict[str, list[str]]) -> dict:
    s = run.settings
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "tool": "spannorm check",
        "spannorm_version": spannorm.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"depths": s.depths, "steps": s.steps, "d_model": s.d_model, "n_heads": s.n_heads,
                     "seq_len": s.seq_len, "batch_size": s.batch_size, "lr": s.lr, "warmup_steps": s.warmup,
                     "clip": s.clip, "weight_decay": s.weight_decay, "seed": s.seed, "band": s.band,
                     "model_overrides": s.model_overrides, "device": s.device, "data": "embedded corpus, bytes"},
        "overall": run.overall,
        "targets": [{"target": r.target, "kind": r.kind, "overall": r.overall,
                     "verdicts": [v.to_dict() for v in r.verdicts],
                     "depths": [depth_json(d) for d in r.depths], "plots": plots.get(r.target, [])}
                    for r in run.results],
    })


# ------------------------------------------------------------------------------------------------ tables
def _g(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def depth_rows(result: TargetResult) -> list[list[str]]:
    """One row per depth: the headline numbers, measured [theory]."""
    rows = []
    for d in result.depths:
        p, init, trained, t = d.prediction, d.init, d.trained, d.training
        var = _g(init.variance_ratio) + (f" [{_g(p.variance_ratio)}]" if p else "")
        var += f" → {_g(trained.variance_ratio)}" if trained else ""
        grad = _g(init.grad_ratio) + (f" [{_g(p.grad_ratio)}]" if p else "")
        grad += f" → {_g(trained.grad_ratio)}" if trained else ""
        ident = "–" if init.identity_product is None else _g(init.identity_product) + (
            f" [{_g(p.identity_product)}]" if p else "")
        fp16 = max(m.fp16_headroom_log2 for m in (init, trained) if m is not None)
        attn = _g(init.attn_logit_max_overall) + (f" → {_g(trained.attn_logit_max_overall)}" if trained else "")
        clip = f"{t.clip_fraction:.0%}" if t and t.grad_norms else "–"
        if t is None:
            loss = _g(init.loss)
        elif t.diverged:
            loss = f"diverged @{t.diverged_step}"
        else:
            loss = f"{_g(t.losses[0])} → {_g(t.final_loss)}"
        rows.append([str(d.n_layers), var, grad, ident, f"{fp16:.1f}", attn, clip, loss])
    return rows


DEPTH_HEADER = ["L", "Var(x_L)/Var(x_0)", "grad ratio x_0/x_(L-1)", "∏α/σ", "fp16 log2", "attn logit max",
                "clip", "loss"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def format_target(result: TargetResult, run: CheckRun) -> str:
    """The terminal block for one target: per-depth numbers, then one verdict per line."""
    s = run.settings
    head = (f"{result.target} ({result.kind}; d={s.d_model}, {s.n_heads} heads, seq {s.seq_len}, batch "
            f"{s.batch_size}; {s.steps} steps at lr {s.lr:g}; measured [theory] at init → after training)")
    verdicts = _table(["check", "status", "verdict"],
                      [[v.check, v.status.upper() if v.status != "ok" else "ok", v.label] for v in result.verdicts])
    lines = [head, _table(DEPTH_HEADER, depth_rows(result)), "", verdicts]
    suggestions = [d.suggestion for d in result.depths if d.suggestion is not None and d.suggestion.knob]
    if suggestions:
        lines.append("suggested " + "; ".join(_suggestion_text(x) for x in suggestions))
    lines.append(f"overall: {result.overall.upper()}")
    return "\n".join(lines)


def _suggestion_text(x: ScalingSuggestion) -> str:
    name = "Δt" if x.knob == "delta_t" else "α"
    if x.recommended is None:
        return f"L={x.n_layers}: no {name} reaches the band"
    text = f"L={x.n_layers}: {name}={_g(x.recommended)}"
    if not x.configured_within_band:
        text += f" (configured {_g(x.configured.value)} is outside the band)"
    return text


def summary_table(run: CheckRun) -> tuple[list[str], list[list[str]]]:
    """Targets × checks, each cell the status and the short verdict."""
    present = {v.check for r in run.results for v in r.verdicts}
    checks = [c for c in CHECKS if c in present]
    rows = []
    for r in run.results:
        by_check = {v.check: v for v in r.verdicts}
        cells = [r.target, r.overall]
        for c in checks:
            v = by_check.get(c)
            cells.append("–" if v is None else (v.label if v.status == "ok" else f"{v.status.upper()}: {v.label}"))
        rows.append(cells)
    return ["target", "overall", *checks], rows


def format_run(run: CheckRun) -> str:
    blocks = [format_target(r, run) for r in run.results]
    if len(run.results) > 1:
        blocks.append("summary (depths " + ",".join(map(str, run.settings.depths)) + ")\n"
                      + _table(*summary_table(run)))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------------------------------------ markdown
def report_markdown(run: CheckRun, plots: dict[str, list[str]]) -> str:
    s = run.settings
    lines = [
        "# spannorm check report", "",
        f"spannorm {spannorm.__version__}, torch {torch.__version__}, device {s.device}. Depths "
        f"{', '.join(map(str, s.depths))}; d_model {s.d_model}, {s.n_heads} heads, sequence {s.seq_len}, batch "
        f"{s.batch_size}; {s.steps} training steps on the embedded corpus (bytes), AdamW lr {s.lr:g}, warmup "
        f"{s.warmup}, clip {s.clip:g}, weight decay {s.weight_decay:g}, seed {s.seed}; band ×{s.band:g}."
        + (f" Model overrides: {s.model_overrides}." if s.model_overrides else ""), "",
        "Measured at init on one fixed validation batch, and after training on the same batch; the theory's "
        "prediction for that batch in brackets (placements only; see `docs/stability.md`).", "",
        f"**Overall: {run.overall}**", "",
    ]
    if len(run.results) > 1:
        lines += ["## Summary", "", _md_table(*summary_table(run)), ""]
    for r in run.results:
        lines += [f"## {r.target} ({r.kind}): {r.overall}", "", _md_table(DEPTH_HEADER, depth_rows(r)), "",
                  _md_table(["check", "status", "verdict", "detail"],
                            [[v.check, v.status, v.label, v.detail] for v in r.verdicts]), ""]
        suggestions = [d.suggestion for d in r.depths if d.suggestion is not None and d.suggestion.knob]
        if suggestions:
            lines += ["Stability criterion (band ×{:g}): ".format(s.band)
                      + "; ".join(_suggestion_text(x) for x in suggestions) + ".", ""]
        for name in plots.get(r.target, []):
            lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots
def _auto_log_y(ax) -> None:
    """Log y when the plotted values span more than ×20 (all positive), linear otherwise."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > 20:
        ax.set_yscale("log")


def plot_target(result: TargetResult, out_dir: Path) -> list[str]:
    """Three PNGs for one target; returns their file names."""
    # The Agg backend must be chosen before pyplot is imported.
    # Start-up time: matplotlib takes about a second to import, and only the plots need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time, as above

    name = slug(result.target)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    files = []

    def finish(fig, kind: str) -> None:
        for ax in fig.axes:
            _auto_log_y(ax)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(f"{result.target}: {kind} (solid: init, dashed: trained, dotted: theory)", fontsize=10)
        fig.tight_layout()
        path = f"{name}_{kind}.png"
        fig.savefig(out_dir / path, dpi=80)
        plt.close(fig)
        files.append(path)

    # moments against layer
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for i, d in enumerate(result.depths):
        c = colors[i % len(colors)]
        for m, style in ((d.init, "-"), (d.trained, "--")):
            if m is None:
                continue
            label = f"L={d.n_layers}" if style == "-" else None
            axes[0].plot(m.stream_variance, style, color=c, label=label)
            axes[1].plot(m.at_stream(m.mean_abs), style, color=c)
            axes[2].plot(m.at_stream(m.max_abs), style, color=c)
        if d.prediction is not None:
            axes[0].plot(d.prediction.stream_mean_square, ":", color=c)
    for ax, title in zip(axes, ("entry-wise variance of x_l", "mean |x_l|", "max |x_l|")):
        ax.set_xlabel("layer l")
        ax.set_title(title, fontsize=9)
    finish(fig, "moments")

    # gradient profile
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, d in enumerate(result.depths):
        c = colors[i % len(colors)]
        for m, style in ((d.init, "-"), (d.trained, "--")):
            g = m.block_input_grad_norm if m is not None else None
            if g:
                axes[0].plot([v / g[-1] for v in g], style, color=c, label=f"L={d.n_layers}" if style == "-" else None)
        if d.prediction is not None:
            axes[0].plot(d.prediction.grad_norm, ":", color=c)
    axes[0].set_xlabel("layer l")
    axes[0].set_title("‖∂L/∂x_l‖ / ‖∂L/∂x_(L-1)‖", fontsize=9)
    depths = [d.n_layers for d in result.depths]
    for key, style, label in (("init", "o-", "init"), ("trained", "s--", "trained")):
        ys = [getattr(d, key).grad_ratio if getattr(d, key) is not None else None for d in result.depths]
        pts = [(L, y) for L, y in zip(depths, ys) if y is not None and math.isfinite(y) and y > 0]
        if pts:
            axes[1].plot(*zip(*pts), style, label=label)
    preds = [(d.n_layers, d.prediction.grad_ratio) for d in result.depths if d.prediction is not None]
    if preds:
        axes[1].plot(*zip(*preds), "k:", label="theory")
    axes[1].set_xscale("log")
    axes[1].set_xticks(depths, [str(L) for L in depths])
    axes[1].minorticks_off()
    axes[1].set_xlabel("depth L")
    axes[1].set_title("first-to-last gradient ratio", fontsize=9)
    finish(fig, "gradients")

    # collapse
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for i, d in enumerate(result.depths):
        c = colors[i % len(colors)]
        for m, style in ((d.init, "-"), (d.trained, "--")):
            if m is None:
                continue
            label = f"L={d.n_layers}" if style == "-" else None
            axes[0].plot(m.angular_distance, style, color=c, label=label)
            axes[1].plot(m.token_uniformity, style, color=c)
            axes[2].plot(m.effective_rank, style, color=c)
        if d.prediction is not None:
            axes[1].plot(d.prediction.token_correlation, ":", color=c)
    for ax, title in zip(axes, ("angular distance x_l → x_(l+1) (/π)", "token uniformity of x_l",
                                "effective rank of x_l")):
        ax.set_xlabel("layer l")
        ax.set_title(title, fontsize=9)
    finish(fig, "collapse")
    return files


def write_report(run: CheckRun, out_dir: str | Path) -> dict:
    """Write report.json, report.md and the plots into ``out_dir`` (created); return the JSON object."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {r.target: plot_target(r, out) for r in run.results}
    data = report_json(run, plots)
    (out / REPORT_JSON).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    (out / REPORT_MD).write_text(report_markdown(run, plots) + "\n")
    return data
