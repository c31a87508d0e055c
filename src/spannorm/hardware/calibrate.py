"""A measured peak for devices without a published one (every CPU): a calibration matmul per device, dtype
and thread count.

A CPU's useful peak depends on its vector and matrix units, the dtype, the thread count and the clock it
holds under load, so no table can give it: bf16 runs several times faster than fp32 on a Xeon with AMX, and
several times slower on a CPU with AVX2 only (the AMD EPYC this project's numbers come from). Instead
:func:`measured_peak_tflops` times square ``torch.mm`` products of growing size (up to 1024) in three operand
layouts and returns the best rate seen: an *attained* peak, which a training step can approach but not pass.
It is measured once per ``(device, dtype, threads)`` in a process and cached in memory; one calibration takes
about a second on one CPU thread. Its tensors come from their own generator, so the global random state (and
with it every seeded loss) is untouched.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

CALIBRATION_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
"""The matmul precisions a calibration can measure (:data:`spannorm.hardware.devices.PRECISIONS`) and the dtype
of its operands; ``tf32`` is an fp32 product under the current ``allow_tf32`` setting."""

MEASURED = "measured (calibration matmul)"
"""The peak's source label in benchmark and training records."""


@dataclass(frozen=True)
class Calibration:
    """One calibration: the best TFLOP/s seen, and the product that reached it."""

    device: str
    dtype: str
    threads: int
    n: int
    """Size of the fastest ``n × n × n`` product."""
    layout: str
    """Operand layout of the fastest product: ``nn``, ``nt`` (``a @ b.T``, as ``nn.Linear``) or ``tn``."""
    tflops: float


SIZES = (256, 512, 1024)
"""Product sizes tried, smallest first; a larger one is tried only while every product of the last size took
under :data:`GROW_BELOW_S` (a CPU without bf16 units runs bf16 at a few GFLOP/s: a 1024³ product would take
seconds there, and would not be faster)."""
GROW_BELOW_S = 0.02
LAYOUTS = ("nn", "nt", "tn")
"""Operand layouts tried: on CPUs the fastest one differs by dtype (bf16 without AMX by 10× and more)."""


def calibrate(device: torch.device | str, dtype: str, *, repeats: int = 3) -> Calibration:
    """Time ``repeats`` square matmuls per size in :data:`SIZES` and layout in :data:`LAYOUTS` in ``dtype`` on
    ``device`` (after one untimed warm-up each) and return the fastest as TFLOP/s (2·n³ FLOPs per product).
    Not cached; see :func:`measured_peak_tflops`."""
    if dtype not in CALIBRATION_DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed: {', '.join(CALIBRATION_DTYPES)}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    best = Calibration(str(device), dtype, torch.get_num_threads(), 0, "", 0.0)
    for n in SIZES:
        a = torch.randn(n, n, generator=generator).to(device=device, dtype=CALIBRATION_DTYPES[dtype])
        b = torch.randn(n, n, generator=generator).to(device=device, dtype=CALIBRATION_DTYPES[dtype])
        operands = {"nn": (a, b), "nt": (a, b.t()), "tn": (a.t(), b)}
        slowest = 0.0
        for layout in LAYOUTS:
            x, y = operands[layout]
            times = []
            for _ in range(repeats + 1):  # the first product warms up caches and the allocator
                _sync(device)
                start = time.perf_counter()
                torch.mm(x, y)
                _sync(device)
                times.append(time.perf_counter() - start)
            fastest = min(times[1:])
            slowest = max(slowest, fastest)
            tflops = 2 * n**3 / fastest / 1e12
            if tflops > best.tflops:
                best = dataclasses.replace(best, n=n, layout=layout, tflops=tflops)
        if slowest >= GROW_BELOW_S:
            break
    return best


_CACHE: dict[tuple[str, str, int], Calibration] = {}
"""Calibrations by ``(device, dtype, threads)``, for the life of the process."""


def measured_peak_tflops(device: torch.device | str, dtype: str) -> float:
    """The calibrated peak TFLOP/s of ``device`` in ``dtype`` at the current thread count, measured on first
    use and cached in memory for the process."""
    device = torch.device(device)
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _CACHE:
        _CACHE[key] = calibrate(device, dtype)
    return _CACHE[key].tflops


BF16_MIN_SPEEDUP = 3.0
"""bf16 is chosen for CPU training only where its calibrated matmul peak is at least this many times the fp32
peak. A training step gains far less than its matmuls: the rest of the step (norms, softmax, casts, the
optimizer) does not speed up in bf16 and some of it slows down. On the issue-14 Xeon (AMX) a 7× faster bf16
matmul made a 1.27× faster step; on this project's AVX2 EPYC a 0.3× matmul made a 16× slower step."""


@dataclass(frozen=True)
class PrecisionChoice:
    """The faster training precision of a CPU, from one calibration per dtype at ``threads`` threads."""

    precision: str
    fp32_tflops: float
    bf16_tflops: float
    threads: int

    @property
    def reason(self) -> str:
        ratio = self.bf16_tflops / self.fp32_tflops if self.fp32_tflops > 0 else float("inf")
        verdict = ">=" if self.precision == "bf16" else "<"
        return (f"measured bf16 matmul {self.bf16_tflops * 1e3:.1f} GFLOP/s = {ratio:.2f}x fp32 "
                f"{self.fp32_tflops * 1e3:.1f} GFLOP/s at {self.threads} thread(s), {verdict} "
                f"{BF16_MIN_SPEEDUP:g}x")


def fastest_cpu_precision(threads: int = 1) -> PrecisionChoice:
    """``bf16`` when this CPU's measured bf16 matmul peak at ``threads`` torch threads is at least
    :data:`BF16_MIN_SPEEDUP` times its fp32 peak (CPUs with AMX), else ``fp32``. Calibrations are cached per
    thread count for the process (:func:`measured_peak_tflops`); the thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fp32 = measured_peak_tflops("cpu", "fp32")
        bf16 = measured_peak_tflops("cpu", "bf16")
    finally:
        torch.set_num_threads(before)
    return PrecisionChoice("bf16" if bf16 >= BF16_MIN_SPEEDUP * fp32 else "fp32", fp32, bf16, threads)


def cached_calibrations() -> list[Calibration]:
    """Every calibration this process has measured."""
    return list(_CACHE.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["BF16_MIN_SPEEDUP", "CALIBRATION_DTYPES", "GROW_BELOW_S", "LAYOUTS", "MEASURED", "SIZES", "Calibration",
           "PrecisionChoice", "cached_calibrations", "calibrate", "fastest_cpu_precision", "measured_peak_tflops"]
