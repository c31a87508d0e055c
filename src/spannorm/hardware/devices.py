"""Peak dense FLOP rates per accelerator, device naming, and peak-memory readings for the benchmark.

MFU (model FLOPs utilization) is achieved FLOPs/s divided by the device's peak FLOPs/s for the precision the
matmuls ran in. The peaks below are the vendors' published *dense* tensor-core figures (the "with sparsity"
figures are twice these and are not used). A device that is not in the table, and every CPU, has no peak:
MFU is then reported as n/a unless the user passes ``--peak-tflops``.
"""

from __future__ import annotations

import math
import os
import platform
import re
import resource
import sys
from dataclasses import dataclass

import torch

PRECISIONS = ("bf16", "tf32", "fp32")
"""Matmul precisions the table knows: bf16 tensor cores, tf32 tensor cores, and plain fp32 (CUDA cores)."""


@dataclass(frozen=True)
class DevicePeak:
    """Published dense peak TFLOP/s of one accelerator model, per matmul precision (None: not supported)."""

    pattern: str
    """Regular expression matched (case-insensitive) against ``torch.cuda.get_device_name()``."""
    label: str
    bf16: float | None
    tf32: float | None
    fp32: float


# Order matters: the first pattern that matches wins, so specific names come before general ones
# (``H100 PCIe`` before ``H100``, ``A100`` before ``A10``, ``L40S`` before ``L4``).
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak(r"GH200", "GH200 (H100/H200 SXM)", bf16=989.4, tf32=494.7, fp32=67.0),
    DevicePeak(r"H200.*NVL", "H200 NVL", bf16=835.5, tf32=417.5, fp32=60.0),
    DevicePeak(r"H200", "H200 SXM", bf16=989.4, tf32=494.7, fp32=67.0),
    DevicePeak(r"H100.*PCIe", "H100 PCIe", bf16=756.5, tf32=378.0, fp32=51.2),
    DevicePeak(r"H100.*NVL", "H100 NVL", bf16=835.5, tf32=417.5, fp32=60.0),
    DevicePeak(r"H100|H800", "H100 SXM", bf16=989.4, tf32=494.7, fp32=67.0),
    DevicePeak(r"A100|A800", "A100", bf16=312.0, tf32=156.0, fp32=19.5),
    DevicePeak(r"L40S", "L40S", bf16=362.05, tf32=183.0, fp32=91.6),
    DevicePeak(r"\bL4\b", "L4", bf16=121.0, tf32=60.0, fp32=30.3),
    DevicePeak(r"\bA10\b", "A10", bf16=125.0, tf32=62.5, fp32=31.2),
    DevicePeak(r"RTX 4090", "GeForce RTX 4090", bf16=165.2, tf32=82.6, fp32=82.6),
    DevicePeak(r"RTX 3090", "GeForce RTX 3090", bf16=71.0, tf32=35.6, fp32=35.6),
    DevicePeak(r"V100", "V100 SXM2", bf16=None, tf32=None, fp32=15.7),
    DevicePeak(r"MI300X", "Instinct MI300X", bf16=1307.4, tf32=653.7, fp32=163.4),
)


def lookup_device_peak(device_name: str) -> DevicePeak | None:
    """The table row whose pattern matches ``device_name`` (e.g. ``"NVIDIA H100 80GB HBM3"``), or None."""
    for row in DEVICE_PEAKS:
        if re.search(row.pattern, device_name, flags=re.IGNORECASE):
            return row
    return None


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` at ``precision`` (one of :data:`PRECISIONS`); None when the
    device is unknown or does not support that precision. CPUs are never in the table."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: allowed: {', '.join(PRECISIONS)}")
    row = lookup_device_peak(device_name)
    return None if row is None else getattr(row, precision)


def matmul_precision(device: torch.device, dtype: str) -> str:
    """The precision matmuls actually run in: bf16 under bf16 autocast; for fp32 on CUDA, tf32 when
    ``torch.backends.cuda.matmul.allow_tf32`` is on, else plain fp32."""
    if dtype == "bf16":
        return "bf16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def cpu_has_bf16_units() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX, as oneDNN reports it). Without them
    bf16 products are emulated: measured 5 to 10x slower than fp32 on an AVX2 EPYC (docs/benchmarks.md)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_cpu_note(device: torch.device, precision: str) -> str | None:
    """A warning line for bf16 training on a CPU without bf16 units; None where there is nothing to say."""
    if device.type != "cpu" or precision != "bf16" or cpu_has_bf16_units():
        return None
    return ("warning: train.precision=bf16 on a CPU without bf16 matrix units (AVX512-BF16/AMX): its bf16 "
            "matmuls are emulated and several times slower than fp32; --train.precision=fp32 is faster here")


def device_name(device: torch.device) -> str:
    """A human name for the device: the CUDA device name, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical cores)"


def cpu_model() -> str:
    """The CPU model string from /proc/cpuinfo where available, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


CPU_TOPOLOGY = "/sys/devices/system/cpu/cpu{}/topology/{}"
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def usable_cpu_cores() -> int:
    """Physical cores this process may use: the CPUs of its affinity mask (``taskset``, a cpuset), one per
    core where Linux's topology shows hyper-threads of one core, and no more than a cgroup CPU quota
    (``cpu.max``) allows. ``os.cpu_count()`` where there is no affinity mask (macOS, Windows)."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    cores = set()
    for cpu in os.sched_getaffinity(0):
        try:
            ids = tuple(_read(CPU_TOPOLOGY.format(cpu, name)) for name in ("physical_package_id", "core_id"))
        except OSError:
            ids = ("cpu", str(cpu))  # no topology: count the CPU as a core of its own
        cores.add(ids)
    count = max(1, len(cores))
    try:
        quota, period = _read(CGROUP_CPU_MAX).split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


def process_peak_rss_bytes() -> int:
    """High-water mark of this process's resident set size (``ru_maxrss``; kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory on ``device`` so far: ``torch.cuda.max_memory_allocated`` on CUDA (the
    caching allocator's high-water mark of allocated tensors), else the process's peak resident set size
    (:func:`process_peak_rss_bytes`: host memory of everything, Python and libraries included)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return process_peak_rss_bytes()
