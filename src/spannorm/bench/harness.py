"""The training-step benchmark: step time, tokens/s, peak memory and MFU for a grid of cases, measured
side by side in one process.

A *case* is one model (a spannorm placement, dense or MoE, or the Hugging Face Llama reference) run eager or
compiled, in fp32 or under bf16 autocast. One step is forward + backward + AdamW step (fused where the
installed torch supports it). Every case is built and warmed up first (warmup steps, compilation included,
are never timed); then the timed steps run in *rounds*: each round runs a few steps of every case, in a
rotated order, so that load from other processes on a shared machine falls on all cases alike. Ratios
between cases are taken from the medians and, per round, from the round medians, whose range shows the noise.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from spannorm.bench.devices import device_name, matmul_precision, peak_tflops, process_peak_rss_bytes
from spannorm.bench.reference import HFLlamaLM, transformers_available
from spannorm.config import ModelConfig
from spannorm.configuration import fail
from spannorm.model.counting import flops_per_token
from spannorm.model.transformer import DecoderLM

DTYPES = ("fp32", "bf16")
FFNS = ("dense", "moe")
HF_LLAMA = "hf_llama"
"""Placement label of the Hugging Face ``LlamaForCausalLM`` reference case."""


@dataclass
class BenchSettings:
    """Model size, batch and timing of a benchmark run; shared by every case. ``spannorm bench`` builds it
    from its options with :func:`spannorm.configuration.build`; :meth:`validate` names the options."""

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    vocab_size: int = 256
    seq_len: int = 128
    """Tokens per sequence; also the models' context length."""
    batch_size: int = 8
    tie_embeddings: bool = True
    n_experts: int = 8
    top_k: int = 2
    warmup: int = 3
    """Untimed steps per case before timing (compilation happens here)."""
    steps: int = 10
    """Timed steps per case, spread over ``rounds`` rounds."""
    rounds: int = 5
    device: str = "cpu"
    seed: int = 0
    peak_tflops: float | None = None
    """Peak TFLOP/s to divide by for MFU; None: from the device table (none for CPUs: MFU is n/a)."""
    lr: float = 1e-4
    allow_tf32: bool = False
    """On CUDA, let fp32 matmuls use TF32 tensor cores (MFU then divides by the TF32 peak)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Other ModelConfig fields of every spannorm case (``--set``, e.g. {"norm": "layer"}); not of the
    Hugging Face reference."""

    def validate(self) -> None:
        """Raise ConfigError naming the command-line option of the first bad setting (every float is
        already finite: :func:`~spannorm.configuration.build` checks that)."""
        for name in ("warmup", "steps", "rounds", "seq_len", "batch_size", "n_experts", "top_k"):
            if getattr(self, name) < 1:
                fail(_option(name), getattr(self, name), "must be >= 1")
        if self.rounds > self.steps:
            fail(_option("rounds"), self.rounds, f"must be <= --steps={self.steps}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            fail(_option("peak_tflops"), self.peak_tflops, "must be > 0")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps_per_round(self) -> int:
        return math.ceil(self.steps / self.rounds)


@dataclass(frozen=True)
class BenchCase:
    """One measured configuration."""

    placement: str
    """A spannorm placement, or ``hf_llama`` for the Hugging Face reference."""
    ffn: str = "dense"
    compiled: bool = False
    dtype: str = "fp32"

    @property
    def is_reference(self) -> bool:
        return self.placement == HF_LLAMA

    @property
    def name(self) -> str:
        return f"{self.placement}/{self.ffn}/{'compiled' if self.compiled else 'eager'}/{self.dtype}"


def plan_cases(placements: list[str], ffns: list[str], compile_modes: list[bool], dtypes: list[str],
               reference: bool) -> list[BenchCase]:
    """Every combination of the lists; with ``reference``, one dense Hugging Face Llama case per
    (compile mode, dtype)."""
    cases = [BenchCase(p, f, c, d) for c in compile_modes for d in dtypes for f in ffns for p in placements]
    if reference:
        cases += [BenchCase(HF_LLAMA, "dense", c, d) for c in compile_modes for d in dtypes]
    return cases


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_config(settings: BenchSettings, placement: str, ffn: str) -> ModelConfig:
    """The spannorm config of a case (the reference uses the ``pre`` dense config's sizes, without
    ``model_overrides``)."""
    moe = dict(n_experts=settings.n_experts, top_k=settings.top_k) if ffn == "moe" else None
    overrides = {} if placement == HF_LLAMA else settings.model_overrides
    return ModelConfig.from_dict(dict(
        vocab_size=settings.vocab_size, d_model=settings.d_model, n_layers=settings.n_layers,
        n_heads=settings.n_heads, n_kv_heads=settings.n_kv_heads, d_ff=settings.d_ff,
        context_length=settings.seq_len, placement="pre" if placement == HF_LLAMA else placement,
        tie_embeddings=settings.tie_embeddings, moe=moe, **overrides))


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters) when this torch supports it on ``device``; measured
    about 8x faster than the default on a 2-core CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # fused not supported for this device or dtype
        return torch.optim.AdamW(params, lr=lr)


def build_case_model(case: BenchCase, settings: BenchSettings) -> tuple[nn.Module, ModelConfig]:
    """The case's model on the settings' device, initialized from ``settings.seed``."""
    cfg = model_config(settings, case.placement, case.ffn)
    torch.manual_seed(settings.seed)
    model: nn.Module = HFLlamaLM(cfg) if case.is_reference else DecoderLM(cfg)
    return model.to(settings.device), cfg


def _loss(out: Any, cfg: ModelConfig) -> torch.Tensor:
    """The training loss of a forward's output: cross-entropy, plus the MoE auxiliary losses weighted as
    the trainer weights them."""
    if isinstance(out, torch.Tensor):
        return out
    loss = out.loss
    if out.balance_loss is not None and cfg.moe is not None:
        loss = loss + cfg.moe.balance_coef * out.balance_loss + cfg.moe.z_loss_coef * out.z_loss
    return loss


class _Runner:
    """A built case: model, optimizer, one fixed batch, and a ``step()`` that trains on it once."""

    def __init__(self, case: BenchCase, settings: BenchSettings):
        self.case, self.settings = case, settings
        self.device = torch.device(settings.device)
        self.model, self.cfg = build_case_model(case, settings)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.forward = torch.compile(self.model) if case.compiled else self.model
        self.optimizer = make_optimizer(self.model, settings.lr, self.device)
        gen = torch.Generator().manual_seed(settings.seed + 1)
        tokens = torch.randint(settings.vocab_size, (settings.batch_size, settings.seq_len + 1), generator=gen)
        self.idx, self.targets = tokens[:, :-1].to(self.device), tokens[:, 1:].to(self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if case.dtype == "bf16"
                         else nullcontext())
        self.times: list[list[float]] = []
        """Seconds per timed step, one list per round."""
        self.warmup_s = 0.0
        self.peak_memory_bytes = 0
        self.last_loss = float("nan")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        with self.autocast:
            loss = _loss(self.forward(self.idx, self.targets), self.cfg)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss_tensor = loss

    def resident_bytes(self) -> int:
        """Bytes this case keeps between steps: parameters, buffers and optimizer state."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def warm_up(self) -> None:
        self.sync()
        start = time.perf_counter()
        for _ in range(self.settings.warmup):
            self.step()
        self.sync()
        self.warmup_s = time.perf_counter() - start
        self._measure_memory()

    def _measure_memory(self) -> None:
        """CUDA: the peak bytes of one step as if this case were alone on the device (the step's peak above
        what was allocated before it, plus this case's resident state). CPU: the process's RSS high-water
        mark so far, which covers every case built before this one."""
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.step()
            self.sync()
            self.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device) - before + self.resident_bytes()
        else:
            self.step()
            self.peak_memory_bytes = process_peak_rss_bytes()

    def timed_round(self, n_steps: int) -> None:
        times = []
        for _ in range(n_steps):
            self.sync()
            start = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - start)
        self.times.append(times)
        self.last_loss = float(self._loss_tensor.detach())


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_times(times: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of step times in seconds, and the step count."""
    values = sorted(times)
    return {"median": statistics.median(values), "p25": _quantile(values, 0.25),
            "p75": _quantile(values, 0.75), "min": values[0], "max": values[-1], "n": len(values)}


def resolve_peak_tflops(device_type: str, device_label: str, precision: str,
                        user_peak: float | None) -> tuple[float | None, str | None]:
    """The peak TFLOP/s that MFU divides by, and where it came from: the user's figure when given; else, on
    CUDA, the device table's dense peak for ``precision`` (None for a device not in the table); on CPU, None
    (MFU is then n/a: there is no honest default peak for a CPU)."""
    if user_peak is not None:
        return user_peak, "user (--peak-tflops)"
    if device_type == "cuda":
        peak = peak_tflops(device_label, precision)
        return peak, ("device table" if peak is not None else None)
    return None, None


def case_result(runner: _Runner, device_label: str) -> dict[str, Any]:
    """The JSON record of one measured case."""
    case, settings = runner.case, runner.settings
    flat = [t for round_times in runner.times for t in round_times]
    stats = summarize_times(flat)
    tokens_per_s = settings.tokens_per_step / stats["median"]
    fpt = flops_per_token(runner.cfg, settings.seq_len)
    achieved_tflops = fpt * tokens_per_s / 1e12
    precision = matmul_precision(runner.device, case.dtype)
    peak, peak_source = resolve_peak_tflops(runner.device.type, device_label, precision, settings.peak_tflops)
    return {
        "name": case.name, "model": "hf_llama" if case.is_reference else "spannorm",
        "placement": case.placement, "ffn": case.ffn, "compiled": case.compiled, "dtype": case.dtype,
        "params": runner.params, "flops_per_token": fpt, "tokens_per_step": settings.tokens_per_step,
        "step_time_s": stats, "round_median_s": [statistics.median(r) for r in runner.times],
        "tokens_per_s": tokens_per_s, "achieved_tflops": achieved_tflops,
        "matmul_precision": precision, "peak_tflops": peak, "peak_tflops_source": peak_source,
        "mfu": None if peak is None else achieved_tflops / peak,
        "peak_memory_bytes": runner.peak_memory_bytes,
        "resident_state_bytes": runner.resident_bytes(),
        "peak_memory_kind": ("cuda_max_memory_allocated" if runner.device.type == "cuda"
                             else "process_rss_high_water_mark"),
        "warmup_s": runner.warmup_s, "final_loss": runner.last_loss,
    }


def _ratio(label: str, num: dict, den: dict, metric: str) -> dict[str, Any]:
    """``metric`` is ``step_time`` (num/den of median step times) or ``tokens_per_s`` (num/den of
    tokens/s, the inverse). Besides the ratio of the medians: the ratio of the fastest steps (the least
    disturbed by other load), and the ratio within each round (the two cases ran seconds apart there, under
    the same load): its median and range."""
    pairs = list(zip(num["round_median_s"], den["round_median_s"]))
    fastest = num["step_time_s"]["min"] / den["step_time_s"]["min"]
    if metric == "step_time":
        value = num["step_time_s"]["median"] / den["step_time_s"]["median"]
        per_round = [a / b for a, b in pairs]
    else:
        value = num["tokens_per_s"] / den["tokens_per_s"]
        per_round = [b / a for a, b in pairs]
        fastest = 1 / fastest
    return {"label": label, "numerator": num["name"], "denominator": den["name"], "metric": metric,
            "value": value, "fastest_step_ratio": fastest, "per_round_median": statistics.median(per_round),
            "per_round_min": min(per_round), "per_round_max": max(per_round)}


def compute_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Side-by-side ratios between cases that differ in one factor: placement vs ``pre`` (step time),
    ours vs the Hugging Face reference (tokens/s), MoE vs dense (step time), compiled vs eager (speed-up
    = eager step / compiled step) and bf16 vs fp32 (speed-up = fp32 step / bf16 step)."""
    by_key = {(r["placement"], r["ffn"], r["compiled"], r["dtype"]): r for r in results}
    ratios = []
    for (placement, ffn, compiled, dtype), r in by_key.items():
        mode = "compiled" if compiled else "eager"
        pre = by_key.get(("pre", ffn, compiled, dtype))
        if placement not in ("pre", HF_LLAMA) and pre is not None:
            ratios.append(_ratio(f"{placement}/pre step time [{ffn}, {mode}, {dtype}]", r, pre, "step_time"))
        if placement == HF_LLAMA and pre is not None:
            ratios.append(_ratio(f"ours(pre)/HF Llama tokens/s [{mode}, {dtype}]", pre, r, "tokens_per_s"))
        dense = by_key.get((placement, "dense", compiled, dtype))
        if ffn == "moe" and dense is not None:
            ratios.append(_ratio(f"MoE/dense step time [{placement}, {mode}, {dtype}]", r, dense, "step_time"))
        eager = by_key.get((placement, ffn, False, dtype))
        if compiled and eager is not None:
            ratios.append(_ratio(f"compiled speed-up (eager/compiled step) [{placement}, {ffn}, {dtype}]",
                                 eager, r, "step_time"))
        fp32 = by_key.get((placement, ffn, compiled, "fp32"))
        if dtype == "bf16" and fp32 is not None:
            ratios.append(_ratio(f"bf16 speed-up (fp32/bf16 step) [{placement}, {ffn}, {mode}]",
                                 fp32, r, "step_time"))
    return ratios


def hardware_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform()}
    if transformers_available():
        import transformers  # optional dependency: the 'hf' extra

        info["transformers"] = transformers.__version__
    return info


@dataclass
class BenchReport:
    """Everything a benchmark run measured; ``to_dict()`` is the JSON written by ``spannorm bench``."""

    hardware: dict[str, Any]
    settings: dict[str, Any]
    results: list[dict[str, Any]]
    ratios: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_bench(settings: BenchSettings, cases: list[BenchCase],
              log: Callable[[str], None] = lambda _msg: None) -> BenchReport:
    """Build and warm up every case, then time them in interleaved rounds; return the report."""
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = settings.allow_tf32
        torch.backends.cudnn.allow_tf32 = settings.allow_tf32
    label = device_name(device)
    runners = []
    for case in cases:
        log(f"building and warming up {case.name}")
        runner = _Runner(case, settings)
        runner.warm_up()
        runners.append(runner)
    for r in range(settings.rounds):
        log(f"timing round {r + 1}/{settings.rounds}")
        shift = r % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.timed_round(settings.steps_per_round)
    results = [case_result(runner, label) for runner in runners]
    return BenchReport(hardware=hardware_info(device), settings=dataclasses.asdict(settings),
                       results=results, ratios=compute_ratios(results))


def format_report(report: BenchReport) -> str:
    """The report as two plain-text tables: one row per case, then the ratios."""
    hw = report.hardware
    lines = [f"device: {hw['device_name']} | torch {hw['torch']} | threads {hw['torch_threads']}"
             + (f" | transformers {hw['transformers']}" if "transformers" in hw else ""),
             "peak MiB: " + ("CUDA max_memory_allocated of one step, as if the case ran alone"
                             if hw["device"] == "cuda" else "process RSS high-water mark (covers every case "
                                                            "built so far)")
             + "; state MiB: parameters, buffers and optimizer state"]
    header = (f"{'case':<34}{'params':>11}{'step ms':>10}{'IQR ms':>16}{'tok/s':>11}"
              f"{'TFLOP/s':>9}{'MFU':>8}{'peak MiB':>10}{'state MiB':>10}")
    lines += [header, "-" * len(header)]
    for r in report.results:
        st = r["step_time_s"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        iqr = f"{1e3 * st['p25']:.1f}-{1e3 * st['p75']:.1f}"
        lines.append(f"{r['name']:<34}{r['params']:>11,}{1e3 * st['median']:>10.1f}{iqr:>16}"
                     f"{r['tokens_per_s']:>11,.0f}{r['achieved_tflops']:>9.3f}{mfu:>8}"
                     f"{r['peak_memory_bytes'] / 2**20:>10.0f}{r['resident_state_bytes'] / 2**20:>10.1f}")
    if report.ratios:
        lines += ["", f"{'ratio':<72}{'value':>8}{'paired median':>15}{'fastest':>9}{'per-round range':>18}"]
        for q in report.ratios:
            spread = f"{q['per_round_min']:.3f}-{q['per_round_max']:.3f}"
            lines.append(f"{q['label']:<72}{q['value']:>8.3f}{q['per_round_median']:>15.3f}"
                         f"{q['fastest_step_ratio']:>9.3f}{spread:>18}")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """A report (as written to JSON) as two Markdown tables, cases then ratios, for docs."""
    lines = ["| case | params | step ms (median) | IQR ms | tokens/s | TFLOP/s | MFU | state MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        st = r["step_time_s"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| `{r['name']}` | {r['params']:,} | {1e3 * st['median']:.1f} | "
                     f"{1e3 * st['p25']:.1f}–{1e3 * st['p75']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['achieved_tflops']:.3f} | {mfu} | {r['resident_state_bytes'] / 2**20:.1f} |")
    if report["ratios"]:
        lines += ["", "| ratio | ratio of medians | paired (per-round) median | fastest steps | per-round range |",
                  "|---|---:|---:|---:|---:|"]
        for q in report["ratios"]:
            lines.append(f"| {q['label']} | {q['value']:.3f} | {q['per_round_median']:.3f} | "
                         f"{q['fastest_step_ratio']:.3f} | {q['per_round_min']:.3f}–{q['per_round_max']:.3f} |")
    return "\n".join(lines)
