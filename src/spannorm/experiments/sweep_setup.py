"""How a sweep uses the machine: how many worker processes, how many torch threads each, and, for the runs
whose plan names no ``train.precision``, whether they train in fp32 or bf16.

The rule (``spannorm sweep --help`` and docs/training.md, "Sweeps: workers, threads and precision", say it in
words; docs/benchmarks.md holds the measurement behind it):

- **workers** ``auto`` on a CPU: one worker per usable physical core
  (:func:`~spannorm.hardware.devices.usable_cpu_cores`: the affinity mask, hyper-threads counted once, a
  cgroup quota), divided by the threads per worker. Measured on the project's shared 2-core machine, two
  1-thread workers trained 1.9 to 5× the tokens per second of one 2-thread worker (a 2-thread OpenMP team
  stalls whenever another process holds one of its cores), and 1.7 to 1.9× one 1-thread worker when the
  machine was quiet (about as much as one under other jobs' load). On a CUDA device: one worker (every
  worker would train on the same GPU; pinning workers to GPUs is not built). ``--workers N`` is used as given.
- **precision**, for runs whose plan (preset, base config, overrides, variant or FFN overrides) names no
  ``train.precision``: on a CPU, bf16 only where a calibration matmul measures bf16 at least
  :data:`~spannorm.hardware.calibrate.BF16_MIN_SPEEDUP` times faster than fp32 (CPUs with AMX), else fp32;
  on CUDA the config's own default (fp32, with TF32 matmuls). The choice is made once, at a sweep folder's
  first start, and stored in its ``index.json``; later starts reuse it, so a calibration that reads
  differently under another load never mixes precisions within one sweep. A folder whose runs predate this
  choice keeps the config default. A plan that names the precision always wins.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from spannorm.configuration import parse_override
from spannorm.experiments.plan import RunSpec
from spannorm.experiments.plan_checks import read_index
from spannorm.hardware.calibrate import PrecisionChoice, fastest_cpu_precision
from spannorm.hardware.devices import usable_cpu_cores
from spannorm.interop.init_from import run_config_layer
from spannorm.train.config import load_preset, resolve_config

AUTO = "auto"
PRECISION_KEY = ("train", "precision")


def parse_workers(text: str) -> int | str:
    """``--workers``: ``auto`` or a whole number >= 0 (an ``argparse`` type: a bad value is one line, exit 2)."""
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: auto, or a whole number >= 0 "
                                         "(0 trains in this process)")
    return value


@dataclass(frozen=True)
class SweepSetup:
    """What a sweep runs with, and why; stored in the sweep's ``index.json`` and ``runs.jsonl``."""

    device: str
    """``cpu`` or ``cuda``: where the plan's runs train."""
    workers: int
    threads: int | None
    """Torch threads per worker (None: torch's default)."""
    precision: str | None
    """The precision given to runs whose plan names none; None: they keep their config's default."""
    workers_rule: str
    precision_rule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        threads = "torch's default threads" if self.threads is None else f"{self.threads} thread(s)"
        precision = self.precision or "as configured"
        return (f"{self.workers} worker(s) x {threads} on {self.device} ({self.workers_rule}); "
                f"precision {precision} ({self.precision_rule})")


def names_precision(spec: RunSpec) -> bool:
    """Whether the plan sets ``train.precision`` for this run: in its overrides or in its preset."""
    if any(tuple(parse_override(text)[0]) == PRECISION_KEY for text in spec.overrides):
        return True
    if not spec.preset:
        return False
    return "precision" in (load_preset(spec.preset).get("train") or {})


def sweep_overrides(spec: RunSpec, precision: str | None) -> tuple[str, ...]:
    """The overrides the sweep adds to ``spec``: its chosen precision, unless the plan names one."""
    if precision is None or names_precision(spec):
        return ()
    return (f"train.precision={precision}",)


def run_device(specs: Iterable[RunSpec], cuda_available: Callable[[], bool] = torch.cuda.is_available) -> str:
    """Where the runs train: ``train.device`` of the first run (``auto``: CUDA when available); cpu for none."""
    for spec in specs:
        device = resolve_config(spec.preset, None, list(spec.overrides), init_from_layer=run_config_layer).train.device
        if device == "auto":
            return "cuda" if cuda_available() else "cpu"
        return device
    return "cpu"


def stored_setup(out_dir: str | Path) -> dict[str, Any] | None:
    """The setup recorded in the sweep folder's ``index.json`` by an earlier start, or None."""
    data = read_index(out_dir) if Path(out_dir).is_dir() else None
    return None if data is None else data.get("setup")


def choose_setup(specs: list[RunSpec], workers: int | str, threads: int | None, *,
                 stored: Mapping[str, Any] | None = None, earlier_runs: bool = False,
                 cores: Callable[[], int] | None = None,
                 cpu_precision: Callable[[int], PrecisionChoice] | None = None,
                 cuda_available: Callable[[], bool] | None = None) -> SweepSetup:
    """The workers, threads and precision of a sweep (the rule of the module docstring).

    ``workers`` is ``auto`` or the user's count; ``threads`` the torch threads per worker (None: torch's
    default). ``stored`` is the setup of the folder's earlier start, ``earlier_runs`` whether its index lists
    runs already. ``cores``, ``cpu_precision`` and ``cuda_available`` measure the machine (None:
    :func:`~spannorm.hardware.devices.usable_cpu_cores`, :func:`~spannorm.hardware.calibrate.fastest_cpu_precision`
    and ``torch.cuda.is_available``; tests pass fakes)."""
    device = run_device(specs, cuda_available or torch.cuda.is_available)
    if workers != AUTO:
        workers_rule = "as given"
    elif device != "cpu":
        workers, workers_rule = 1, f"auto: one worker on {device}"
    else:
        n_cores = (cores or usable_cpu_cores)()
        per_worker = threads if threads is not None else n_cores  # torch's default uses every core
        workers = max(1, n_cores // max(1, per_worker))
        workers_rule = f"auto: {n_cores} usable core(s) / {per_worker} thread(s) per worker"
    if not any(not names_precision(spec) for spec in specs):
        precision, precision_rule = None, "the plan names it"
    elif stored is not None and "precision" in stored:
        precision = stored["precision"]
        precision_rule = stored.get("inherited_from") or "chosen at this sweep folder's first start"
    elif earlier_runs:
        precision, precision_rule = None, "the config default: this folder's runs predate the automatic choice"
    elif device != "cpu":
        precision, precision_rule = None, f"the config default on {device}"
    else:
        choice = (cpu_precision or fastest_cpu_precision)(threads or 1)
        precision, precision_rule = choice.precision, f"auto: {choice.reason}"
    return SweepSetup(device, int(workers), threads, precision, workers_rule, precision_rule)


__all__ = ["AUTO", "SweepSetup", "choose_setup", "names_precision", "parse_workers", "run_device",
           "stored_setup", "sweep_overrides"]
