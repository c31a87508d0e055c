"""Two training runs of the ``tiny`` preset (40 steps each), as a sweep would run them: two 1-thread workers at
the same time, against one 2-thread worker running them one after the other; the variants alternate round by
round and the ratio is paired per round. Not a test: it takes minutes.

Usage: python benchmarks/sweep_workers.py [--rounds 4]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--rounds", type=int, default=4)
args = parser.parse_args()
work = tempfile.mkdtemp(prefix="sweep-workers-")
env = dict(os.environ)


def run(out, threads):
    e = dict(env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    argv = [sys.executable, "-m", "spannorm", "train", "--preset", "tiny", "--out", out, "--overwrite",
            "--train.steps=40", "--train.eval_every=0", "--train.eval_batches=2", "--train.progress=none",
            "--train.tensorboard=false", "--train.checkpoint_every=0"]
    return subprocess.Popen(argv, env=e, stdout=subprocess.DEVNULL)


res = {"2 workers x 1 thread": [], "1 worker x 2 threads": []}
for r in range(args.rounds):
    order = list(res) if r % 2 == 0 else list(res)[::-1]
    for name in order:
        t = time.perf_counter()
        if name.startswith("2"):
            procs = [run(f"{work}/w{i}", 1) for i in range(2)]
            for proc in procs:
                proc.wait()
        else:
            for i in range(2):
                run(f"{work}/w{i}", 2).wait()
        res[name].append(time.perf_counter() - t)
    print(r, {k: round(v[-1], 1) for k, v in res.items()}, os.getloadavg()[0], flush=True)
rat = [b / a for a, b in zip(res["2 workers x 1 thread"], res["1 worker x 2 threads"])]
print("median wall s", {k: round(statistics.median(v), 1) for k, v in res.items()},
      "speed-up of 2x1 over 1x2: median", round(statistics.median(rat), 3),
      "range", round(min(rat), 3), round(max(rat), 3))
shutil.rmtree(work, ignore_errors=True)
