"""torch.compile of the training step and fused AdamW on the CPU (issue 14, item 1; docs/benchmarks.md).

For each shape (the issue-16 study's width 64, 4 heads, context 64, batch 16, fp32 at depths 12 and 48 with
``pre`` and ``span`` (fixed β; ``span_clean`` in results written before placement names 2), and the
``shakespeare-char`` preset) it builds the trainer's own training step
(:class:`spannorm.train.trainer.Trainer`, ``Trainer._train_step``: forward, backward, clipping, the
non-finite check and AdamW) in three variants from one seed:

- ``eager``: today's CPU default (``train.compile=false``, the for-loop AdamW);
- ``fused``: ``optim.fused=true`` (PyTorch's fused AdamW on the CPU);
- ``compiled``: ``train.compile=true`` (the model in ``torch.compile``; the optimizer is not compiled).

It times each variant's first ``--first`` steps one after another (the compiled variant compiles in its first
steps), then takes the variants' steady step time in ``--rounds`` rounds of ``--block`` steps, interleaved
and rotated round by round, so that the load of other jobs falls on all alike. The compile time is the time
of the compiled variant's first steps less as many steady compiled steps, and the break-even run length is
that cost over the steady time saved per step. The evaluation (16 batches, as in the study) is timed twice
for ``eager`` and ``compiled``: the compiled model compiles its evaluation graph on the first call. The
losses of the first ``--first`` steps of each variant are compared with ``eager``'s (max absolute
difference). Last, the optimizer step alone: the for-loop and the fused AdamW stepped alternately on the
eager model's gradients, ``--opt-reps`` times each.

The inductor cache is a fresh folder for the process (``TORCHINDUCTOR_CACHE_DIR``) and dynamo is reset before
every compiled model, so each shape's compile is cold but for kernels an earlier shape of the same process
already built. With ``--cache-dir DIR`` the cache is DIR and is kept: a second run with the same DIR measures
the compile of a later run of a sweep, whose earlier runs of the same shape filled the cache. Usage:

    OMP_NUM_THREADS=1 python benchmarks/compile_fused_cpu.py [--data FILE] [--shapes study-L12-pre,...]
        [--variants eager,fused,compiled] [--cache-dir DIR] [--first 20] [--rounds 4] [--block 3]
        [--out benchmarks/results/compile_fused_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spannorm.train.config import RunConfig, resolve_config
from spannorm.train.optimizer import build_optimizer
from spannorm.train.trainer import Trainer

STUDY = ["model.d_model=64", "model.n_heads=4", "model.context_length=64", "train.batch_size=16",
         "optim.schedule=cosine", "optim.warmup_steps=40", "optim.min_lr_ratio=0.1", "train.steps=400"]
"""The issue-16 study's base (studies/study16_shakespeare.yaml) but its data, depth and placement."""

SHAPES: dict[str, tuple[str | None, list[str]]] = {
    "study-L12-pre": (None, STUDY + ["model.n_layers=12", "model.placement=pre"]),
    "study-L12-span": (None, STUDY + ["model.n_layers=12", "model.placement=span", "model.span_scaling=fixed"]),
    "study-L48-pre": (None, STUDY + ["model.n_layers=48", "model.placement=pre"]),
    "study-L48-span": (None, STUDY + ["model.n_layers=48", "model.placement=span", "model.span_scaling=fixed"]),
    "shakespeare-char": ("shakespeare-char", []),
}
VARIANTS = {"eager": [], "fused": ["optim.fused=true"], "compiled": ["train.compile=true"]}
COMMON = ["train.precision=fp32", "train.device=cpu", "train.eval_every=0", "train.checkpoint_every=0",
          "train.progress=none", "train.tensorboard=false", "train.log_every=0", "train.eval_batches=16"]


def config(shape: str, variant: str, data: str | None, cache: Path) -> RunConfig:
    preset, overrides = SHAPES[shape]
    source = [f"data.path={data}"] if data else ["data.embedded_max_bytes=300000"]
    return resolve_config(preset, None, overrides + COMMON + source + [f"data.cache_dir={cache}"] + VARIANTS[variant])


def one_step(trainer: Trainer) -> float:
    """One training step of ``trainer``; its loss, read to the host (as a logging step would)."""
    trainer._train_step()
    pending = trainer._pending.pop()
    trainer._non_finite = None
    return float(pending.values[0])


def timed_steps(trainer: Trainer, n: int) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for _ in range(n):
        start = time.perf_counter()
        losses.append(one_step(trainer))
        times.append(time.perf_counter() - start)
    return times, losses


def optimizer_step_ms(trainer: Trainer, reps: int) -> dict[str, float]:
    """The optimizer step alone on the eager model's gradients: for-loop and fused AdamW alternately."""
    model = trainer.model
    optims = {"for_loop": build_optimizer(model, trainer.cfg.optim), "fused": build_optimizer(model, trainer.cfg.optim,
                                                                                           fused=True)}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    samples: dict[str, list[float]] = {name: [] for name in optims}
    for rep in range(reps + 1):
        order = list(optims) if rep % 2 == 0 else list(optims)[::-1]
        for name in order:
            start = time.perf_counter()
            optims[name].step()
            if rep > 0:  # the first step of each allocates its moments
                samples[name].append((time.perf_counter() - start) * 1e3)
    model.load_state_dict(weights)
    return {f"{name}_ms": statistics.median(values) for name, values in samples.items()}


def measure(shape: str, args: argparse.Namespace, cache: Path, run_root: Path) -> dict:
    variants = args.variants.split(",")
    trainers: dict[str, Trainer] = {}
    first: dict[str, dict] = {}
    for variant in variants:
        if variant == "compiled":
            torch._dynamo.reset()
        trainer = Trainer(config(shape, variant, args.data, cache), run_root / f"{shape}-{variant}", callbacks=[],
                          overwrite=True)
        times, losses = timed_steps(trainer, args.first)
        trainers[variant] = trainer
        first[variant] = {"step_s": times, "loss": losses}
        print(f"{shape} {variant}: first steps {', '.join(f'{t:.2f}' for t in times[:3])} s ...", flush=True)
    steady: dict[str, list[float]] = {variant: [] for variant in variants}
    names = variants
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for variant in order:
            times, _ = timed_steps(trainers[variant], args.block)
            steady[variant].append(statistics.median(times))
    step_s = {variant: statistics.median(values) for variant, values in steady.items()}
    evaluation = {}
    for variant in ("eager", "compiled"):  # the study evaluates 16 batches every 100 steps; compiled, it compiles
        times = []
        for _ in range(2):
            start = time.perf_counter()
            trainers[variant].evaluate()
            times.append(time.perf_counter() - start)
        evaluation[variant] = {"first_s": times[0], "second_s": times[1]}
    compiled_first = first["compiled"]["step_s"][:args.compile_steps]
    compile_s = sum(compiled_first) - len(compiled_first) * step_s["compiled"]
    saved = step_s["eager"] - step_s["compiled"]
    cfg = trainers["eager"].cfg
    result = {
        "shape": {"preset": SHAPES[shape][0], "overrides": SHAPES[shape][1], "d_model": cfg.model.d_model,
                  "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
                  "context_length": cfg.model.context_length, "batch_size": cfg.train.batch_size,
                  "placement": cfg.model.placement,
                  "parameters": sum(p.numel() for p in trainers["eager"].model.parameters())},
        "first_steps": first,
        "steady_step_ms_rounds": {v: [t * 1e3 for t in values] for v, values in steady.items()},
        "steady_step_ms": {v: t * 1e3 for v, t in step_s.items()},
        "ratio_to_eager": {v: step_s[v] / step_s["eager"] for v in variants},
        "ratio_to_eager_rounds": {v: [a / b for a, b in zip(steady[v], steady["eager"])] for v in variants},
        "compile_s": compile_s,
        "break_even_steps_from_steady_medians": compile_s / saved if saved > 0 else None,
        "max_abs_loss_diff": {v: max(abs(a - b) for a, b in zip(first[v]["loss"], first["eager"]["loss"]))
                              for v in variants if v != "eager"},
        "evaluation": evaluation,
        "eval_compile_s": evaluation["compiled"]["first_s"] - evaluation["compiled"]["second_s"],
        "optimizer_step": optimizer_step_ms(trainers["eager"], args.opt_reps),
    }
    result["optimizer_step"]["fused_over_for_loop"] = (result["optimizer_step"]["fused_ms"]
                                                       / result["optimizer_step"]["for_loop_ms"])
    return result


def summarize(result: dict, steps: int = 400, evaluations: int = 4) -> dict:
    """The figures the docs quote, robust to the load: the eager step is the median of all its timed steps
    (the first one dropped), the compiled and fused steps that times the median of their per-round ratios to
    eager; the compile cost is the training graph's plus the evaluation graph's; the break-even run length is
    that cost over the time saved per training step; and a study run of ``steps`` steps with ``evaluations``
    evaluations is priced both ways (compiled evaluations counted at their steady time)."""
    eager_s = statistics.median(result["first_steps"]["eager"]["step_s"][1:]
                                + [ms / 1e3 for ms in result["steady_step_ms_rounds"]["eager"]])
    ratios = {v: statistics.median(r) for v, r in result["ratio_to_eager_rounds"].items() if v != "eager"}
    compiled_s = eager_s * ratios["compiled"]
    compile_total_s = result["compile_s"] + result["eval_compile_s"]
    saved_s = eager_s - compiled_s
    evaluation = result["evaluation"]
    eager_run = steps * eager_s + evaluations * evaluation["eager"]["second_s"]
    compiled_run = steps * compiled_s + evaluations * evaluation["compiled"]["second_s"] + compile_total_s
    out = {"eager_step_ms": eager_s * 1e3, "ratio_median": ratios, "compiled_step_ms": compiled_s * 1e3,
           "compile_train_s": result["compile_s"], "compile_eval_s": result["eval_compile_s"],
           "compile_total_s": compile_total_s,
           "break_even_steps": compile_total_s / saved_s if saved_s > 0 else None,
           f"run_{steps}_steps_eager_s": eager_run, f"run_{steps}_steps_compiled_s": compiled_run,
           "optimizer_saved_ms": result["optimizer_step"]["for_loop_ms"] - result["optimizer_step"]["fused_ms"]}
    out["optimizer_saved_share_of_step"] = out["optimizer_saved_ms"] / out["eager_step_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="training text (default: the embedded corpus)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--first", type=int, default=20, help="steps timed one by one and losses compared")
    parser.add_argument("--compile-steps", type=int, default=3, help="first steps counted as compile time")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--block", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--opt-reps", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, eager and compiled among them, of {', '.join(VARIANTS)}")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="inductor cache folder to use and keep (a second run with it measures a warm cache); "
                             "default: a fresh one, removed at the end")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not {"eager", "compiled"} <= set(args.variants.split(",")) <= set(VARIANTS):
        parser.error(f"--variants: {args.variants!r}; allowed: eager and compiled, and optionally fused")
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; allowed: {', '.join(SHAPES)}")
    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor(),
                    "load_average_start": os.getloadavg(),
                    "settings": vars(args) | {"out": str(args.out), "cache_dir": str(args.cache_dir)},
                    "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        inductor = args.cache_dir if args.cache_dir is not None else Path(tmp) / "inductor"
        report["warm_cache"] = inductor.exists()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)  # cold compiles unless --cache-dir names a used one
        for shape in shapes:
            report["shapes"][shape] = measure(shape, args, Path(tmp) / "cache", Path(tmp) / "runs")
            r = report["shapes"][shape]
            r["summary"] = summarize(r)
            print(f"{shape}: {r['summary']}, loss diff {r['max_abs_loss_diff']}", flush=True)
            report["load_average_end"] = os.getloadavg()
            if args.out is not None:  # after every shape, so that a long run leaves what it measured
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({s: {k: r[k] for k in ("summary", "max_abs_loss_diff", "optimizer_step")}
                      for s, r in report["shapes"].items()}, indent=2))


if __name__ == "__main__":
    main()
