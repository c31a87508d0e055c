"""What the host reads of a training step cost on the CPU (issue 15, item 3; docs/training.md, "Host syncs").

1. The one read a step that does not read still makes on the CPU, the non-finite flag (``bool`` of the 0-d
   flag tensor, because the CPU's AdamW cannot skip a step on the device), timed alone over many repetitions.
2. ``spannorm train --preset tiny`` itself (the trainer, in this process) with every step reading
   (``train.log_every=1``: what every step did before reading steps existed) and with a read every 20th step
   (the preset's ``log_every``), ``--rounds`` times, the order swapped every round; the figure is
   ``summary.json``'s tokens/s (time in training steps only), and the step time in milliseconds derived from it.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_host_syncs.py [--steps 60] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spannorm.launch import train
from spannorm.train.config import resolve_config


def flag_read_us(repeats: int) -> dict[str, float]:
    """Microseconds per non-finite check: the flag's two isfinite calls and the ``and`` alone, and with the
    host read (``bool``) added."""
    loss, norm = torch.tensor(2.5), torch.tensor(1.0)

    def timed(read: bool) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            flag = ~(torch.isfinite(loss) & torch.isfinite(norm))
            if read:
                bool(flag)
        return (time.perf_counter() - start) / repeats * 1e6

    timed(True)  # warm-up
    without, with_read = min(timed(False) for _ in range(3)), min(timed(True) for _ in range(3))
    return {"flag_us": without, "flag_and_read_us": with_read, "read_us": with_read - without}


def tiny_run(out: Path, steps: int, log_every: int) -> float:
    cfg = resolve_config("tiny", None, [f"train.steps={steps}", f"train.log_every={log_every}",
                                        "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0",
                                        "train.progress=none", "train.tensorboard=false",
                                        "data.embedded_max_bytes=200000"])
    return train(cfg, out, overwrite=True).tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps}
    report["flag"] = flag_read_us(args.repeats)
    rates: dict[str, list[float]] = {"read_every_step": [], "read_every_20": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            cases = [("read_every_step", 1), ("read_every_20", 20)]
            for name, log_every in cases if round_index % 2 == 0 else cases[::-1]:  # alternate the order
                rates[name].append(tiny_run(Path(tmp) / name, args.steps, log_every))
    tokens_per_step = resolve_config("tiny", None, []).tokens_per_step
    for name, values in rates.items():
        rate = statistics.median(values)
        report[name] = {"tokens_per_s": values, "median_tokens_per_s": rate, "step_ms": tokens_per_step / rate * 1e3}
    report["read_share_of_step"] = report["flag"]["read_us"] / 1e3 / report["read_every_20"]["step_ms"]
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
