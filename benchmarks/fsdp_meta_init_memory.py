"""Peak host memory (resident set size) of each process while FSDP2 builds and shards a model, with the
model built on the meta device and filled from rank 0's init (``DataParallel.build_model``, what
``spannorm train --train.parallel=fsdp`` does) against the full model built in every process and then
sharded (the path before it). CPU, gloo, 2 processes under torchrun, each variant in fresh processes
(peak RSS only rises). Writes ``benchmarks/results/fsdp_meta_init_memory.json`` and prints a table. Not a
test.

Usage: python benchmarks/fsdp_meta_init_memory.py [--d-model 512] [--n-layers 24]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = r'''
import json, sys
import torch
import torch.distributed as dist
from spannorm.config import ModelConfig
from spannorm.hardware.devices import process_peak_rss_bytes
from spannorm.model.transformer import DecoderLM
from spannorm.train.distributed import DataParallel, SingleProcess

variant, d_model, n_layers, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=8, context_length=256, vocab_size=50304)
parallel = DataParallel("fsdp", rank, 2)
before = process_peak_rss_bytes()
torch.manual_seed(0)
if variant == "meta":
    model = parallel.build_model(lambda: DecoderLM(cfg), torch.device("cpu"), "fp32")
else:
    model = SingleProcess.build_model(parallel, lambda: DecoderLM(cfg), torch.device("cpu"))
    parallel.shard(model)
dist.barrier()
params = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the full tensor's
with open(f"{out}/{variant}_rank{rank}.json", "w") as handle:
    json.dump({"peak_rss_before_build": before, "peak_rss_after_shard": process_peak_rss_bytes(),
               "params": params}, handle)
dist.destroy_process_group()
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=24)
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        for variant in ("full", "meta"):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), variant, str(args.d_model), str(args.n_layers), tmp],
                           env=env, check=True, capture_output=True)
            for rank in (0, 1):
                row = json.loads((Path(tmp) / f"{variant}_rank{rank}.json").read_text())
                rows.append({"variant": variant, "rank": rank, **row,
                             "build_growth_mib": (row["peak_rss_after_shard"] - row["peak_rss_before_build"]) / 2**20})
    result = {"command": "python benchmarks/fsdp_meta_init_memory.py " + " ".join(argv or sys.argv[1:]),
              "d_model": args.d_model, "n_layers": args.n_layers, "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "rows": rows}
    out = REPO / "benchmarks" / "results" / "fsdp_meta_init_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model: {rows[0]['params']:,} parameters ({rows[0]['params'] * 4 / 2**20:.0f} MiB fp32)")
    print("| build | rank | peak RSS after sharding (MiB) | growth during build (MiB) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['rank']} | {row['peak_rss_after_shard'] / 2**20:.0f} | "
              f"{row['build_growth_mib']:.0f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
