"""Benchmark behind docs/data.md: ``spannorm prepare`` throughput and peak memory at 100 MB and 1 GB, the
disk size per token, training's peak memory and start-up on the prepared data, and a reference line for the
read-everything approach of nanoGPT's ``prepare.py`` on the same text.

The corpus is made locally from real text: JSONL documents, each a run of 3 to 20 paragraphs of a text file
(tinyshakespeare by default) taken from a position that varies per document, under a numbered title.

Each measured command runs as a child process; its wall time and peak RSS (``ru_maxrss`` from ``wait4``: the
largest of the process and the workers it waited for) are recorded. ``mb_per_s`` is text MB over the time
``prepare`` itself reports (reading, tokenizing and writing, without Python start-up and imports);
``mb_per_s_whole_process`` includes them. Usage:

    python benchmarks/prepare_bench.py --text /work/shared/data/tinyshakespeare.txt --work /tmp/prep-bench \\
        [--sizes 100,1000] [--bpe-sizes 20]

Writes benchmarks/results/prepare_bench.json (``--name``) and prints one line per measurement. The working folder (the
corpora and datasets, about 4.5 GB at 1 GB) is not cleaned up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = r'''
import json, sys
import numpy as np
# nanoGPT's prepare.py approach: read the whole corpus into memory, tokenize it all, split 90/10 by position,
# write train.bin and val.bin.
corpus, out = sys.argv[1], sys.argv[2]
docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
ids = np.concatenate([np.frombuffer(b"\0" + d.encode(), dtype=np.uint8) for d in docs]).astype(np.uint16)
cut = int(len(ids) * 0.9)
ids[:cut].tofile(out + "/train.bin")
ids[cut:].tofile(out + "/val.bin")
'''


OPEN = r'''
import sys, time
started = time.perf_counter()
from spannorm.data.dataset import WindowSampler, load_splits
from spannorm.train.config import DataConfig
imported = time.perf_counter()
tokenizer, splits = load_splits(DataConfig(path=sys.argv[1]))
WindowSampler(splits.train, 64, 16, seed=0).next_batch()
print(f"open_and_first_batch_s={time.perf_counter() - imported:.3f} import_s={imported - started:.3f}")
'''

TRAIN_BPE = r'''
import sys, time
from pathlib import Path
from spannorm.data import prepare as prep
options = prep.PrepareOptions(tokenizer="bpe", bpe_vocab_size=4096, bpe_sample_mb=float(sys.argv[2]))
started = time.perf_counter()
prep.train_bpe_from_iterator(prep._sample_texts([Path(sys.argv[1])], options), 4096, (prep.BPE_EOS_TOKEN,))
print(f"train_bpe_s={time.perf_counter() - started:.1f}")
'''


def make_corpus(text_path: Path, out: Path, size_mb: int) -> None:
    """JSONL documents of varied paragraph runs from ``text_path`` until ``size_mb`` MB."""
    if out.is_file() and out.stat().st_size >= size_mb * 1e6:
        return
    paragraphs = [p for p in text_path.read_text().split("\n\n") if p.strip()]
    tmp = out.with_suffix(".tmp")
    written, doc = 0, 0
    with tmp.open("w") as handle:
        while written < size_mb * 1e6:
            start = (doc * 7919) % len(paragraphs)
            length = 3 + (doc * 31) % 18
            text = f"Document {doc}.\n\n" + "\n\n".join(paragraphs[start:start + length])
            line = json.dumps({"text": text}) + "\n"
            handle.write(line)
            written += len(line)
            doc += 1
    tmp.replace(out)


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of a child process (and the children it waited for)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout:
        child = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        stdout.seek(0)
        printed = stdout.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{printed}")
    row = {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    inner = re.search(r"MB of text in ([0-9.]+)s", printed)  # prepare's own time, without start-up
    if inner:
        row["tokenize_s"] = float(inner.group(1))
    for key, value in re.findall(r"(\w+_s)=([0-9.]+)", printed):
        row[key] = float(value)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=Path("/work/shared/data/tinyshakespeare.txt"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/prep-bench"))
    parser.add_argument("--sizes", default="100,1000", help="corpus sizes in MB")
    parser.add_argument("--name", default="prepare_bench", help="results/NAME.json")
    parser.add_argument("--bpe-train-only", action="store_true",
                        help="only time training BPE 4096 on a 10 MB sample of the first --bpe-sizes corpus")
    parser.add_argument("--open-only", action="store_true",
                        help="only time opening the byte datasets of an earlier run of --sizes")
    parser.add_argument("--bpe-sizes", default="20",
                        help="corpus sizes in MB also prepared with BPE (trained once on a 10 MB sample of the "
                             "first of them); empty: none")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    spannorm = [sys.executable, "-m", "spannorm"]
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    bpe_sizes = [int(s) for s in args.bpe_sizes.split(",") if s]
    sizes = sorted(set([int(s) for s in args.sizes.split(",") if s] + ([] if args.open_only else bpe_sizes)))
    tokenizer_json = args.work / "bpe" / "tokenizer.json"
    if args.bpe_train_only:
        row = measure([sys.executable, "-c", TRAIN_BPE, str(args.work / f"corpus_{bpe_sizes[0]}mb.jsonl"), "10"], env)
        record({"what": "train BPE 4096 on a 10 MB sample (whole process)", "corpus_mb": bpe_sizes[0], **row})
        sizes = []
    for size in sizes if args.open_only else []:
        row = measure([sys.executable, "-c", OPEN, str(args.work / f"ds_byte_{size}mb_w1")], env)
        record({"what": "open the byte dataset and draw the first batch (load_splits + WindowSampler)",
                "corpus_mb": size, **row})
    for size in [] if args.open_only or args.bpe_train_only else sizes:
        corpus = args.work / f"corpus_{size}mb.jsonl"
        make_corpus(args.text, corpus, size)
        text_mb = corpus.stat().st_size / 1e6
        tokenizers = ["byte", "bpe"] if size in bpe_sizes else ["byte"]
        for tokenizer in tokenizers:
            if tokenizer == "bpe" and not tokenizer_json.is_file():
                subprocess.run(["rm", "-rf", str(args.work / "bpe")], check=True)
                row = measure(spannorm + ["prepare", str(corpus), "--out", str(args.work / "bpe"), "--tokenizer",
                                          "bpe", "--bpe-vocab-size", "4096", "--bpe-sample-mb", "10"], env)
                record({"what": "prepare+train BPE 4096 on a 10 MB sample", "corpus_mb": round(text_mb), **row})
            for workers in (1, 2):
                out = args.work / f"ds_{tokenizer}_{size}mb_w{workers}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                spec = "byte" if tokenizer == "byte" else str(tokenizer_json)
                row = measure(spannorm + ["prepare", str(corpus), "--out", str(out), "--tokenizer", spec,
                                          "--workers", str(workers)], env)
                index = json.loads((out / "index.json").read_text())
                tokens = sum(index["splits"][s]["tokens"] for s in ("train", "val"))
                disk = sum(shard["bytes"] for s in ("train", "val") for shard in index["splits"][s]["shards"])
                record({"what": f"prepare {tokenizer}", "workers": workers, "corpus_mb": round(text_mb), **row,
                        "mb_per_s": round(text_mb / row["tokenize_s"], 2),
                        "mb_per_s_whole_process": round(text_mb / row["wall_s"], 2), "tokens": tokens,
                        "disk_bytes_per_token": round(disk / tokens, 3), "bytes_of_text_per_token":
                        round((index["splits"]["train"]["bytes"] + index["splits"]["val"]["bytes"]) / tokens, 3)})
        ref_out = args.work / f"ref_{size}mb"
        ref_out.mkdir(exist_ok=True)
        row = measure([sys.executable, "-c", REFERENCE, str(corpus), str(ref_out)], env)
        record({"what": "reference: read all, tokenize all (nanoGPT prepare.py approach), byte", "corpus_mb":
                round(text_mb), **row, "mb_per_s": round(text_mb / row["wall_s"], 2)})
        run = args.work / f"run_{size}mb"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        row = measure(spannorm + ["train", "--preset", "tiny", "--out", str(run),
                                  f"--data.path={args.work / f'ds_byte_{size}mb_w1'}", "--train.steps=1",
                                  "--train.progress=none", "--train.eval_batches=1"], env)
        trainer_wall = json.loads((run / "summary.json").read_text())["wall_s"]
        record({"what": "train 1 step (tiny preset) on the byte dataset: whole process", "corpus_mb":
                round(text_mb), **row, "trainer_wall_s": round(trainer_wall, 2)})
        row = measure([sys.executable, "-c", OPEN, str(args.work / f"ds_byte_{size}mb_w1")], env)
        record({"what": "open the byte dataset and draw the first batch (load_splits + WindowSampler)",
                "corpus_mb": round(text_mb), **row})
    RESULTS.mkdir(exist_ok=True)
    result = {"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores "
              "shared with other jobs", "python": platform.python_version(), "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
