"""Time to the first training step, and the training process's peak memory, on prepared datasets.

For each dataset folder (written by ``spannorm prepare``) it starts ``spannorm train --preset tiny`` as a child
process (one thread, 20 steps, every step logged), polls ``metrics.jsonl`` for the first record, and reads the
child's peak RSS. A second, in-process measurement draws 20 training batches of 16 windows and reports how
the resident memory grew, split into anonymous memory (what the process allocated) and file-backed pages (the
memory-mapped shards that the kernel maps in around each window read; page cache, reclaimable). Usage:

    python benchmarks/first_step_bench.py DATASET [DATASET ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WINDOWS = r'''
import sys
from spannorm.data.dataset import WindowSampler, load_splits
from spannorm.train.config import DataConfig
def rss():
    fields = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssFile", "RssAnon")):
            fields[line.split(":")[0]] = int(line.split()[1]) // 1024
    return fields
tokenizer, splits = load_splits(DataConfig(path=sys.argv[1]))
before = rss()
sampler = WindowSampler(splits.train, 64, 16, seed=0)
for _ in range(20):
    sampler.next_batch()
after = rss()
print(after["RssAnon"] - before["RssAnon"], after["RssFile"] - before["RssFile"])
'''


def first_step(dataset: str, out: Path) -> dict:
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "spannorm", "train", "--preset", "tiny", "--out", str(out),
                              f"--data.path={dataset}", "--train.steps=20", "--train.log_every=1",
                              "--train.progress=none", "--train.eval_batches=1", "--train.checkpoint_every=0"],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    metrics, first = out / "metrics.jsonl", None
    while True:
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = time.perf_counter() - started
        _, status, usage = os.wait4(child.pid, os.WNOHANG)
        if _ == child.pid:
            break
        time.sleep(0.02)
    if status != 0:
        raise SystemExit(f"spannorm train exited with status {status}")
    return {"first_step_logged_s": round(first or float("nan"), 2),
            "whole_process_s": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def main() -> int:
    rows = []
    for dataset in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            row = {"dataset": dataset, **first_step(dataset, Path(tmp) / "run")}
        anon, file_backed = subprocess.run([sys.executable, "-c", WINDOWS, dataset], capture_output=True, text=True,
                                           check=True).stdout.split()
        row.update({"20_batches_anon_mb": int(anon), "20_batches_file_backed_mb": int(file_backed)})
        rows.append(row)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
