"""Print a ``spannorm bench`` JSON report as Markdown tables (cases, then ratios), with its command and
hardware, for docs/benchmarks.md.

Usage: python benchmarks/bench_to_markdown.py benchmarks/results/bench_cpu_placements.json
"""

from __future__ import annotations

import json
import sys

from spannorm.bench.harness import compute_ratios, format_markdown


def main(path: str) -> None:
    report = json.loads(open(path, encoding="utf-8").read())
    report["ratios"] = compute_ratios(report["results"])  # derived from the stored per-round medians
    hw = report["hardware"]
    print(f"Command: `{report['meta']['command']}`\n")
    print(f"Hardware: {hw['device_name']}, torch {hw['torch']}, {hw['torch_threads']} thread(s)"
          + (f", transformers {hw['transformers']}" if "transformers" in hw else "")
          + f"; measured {report['meta']['created_utc']}.\n")
    print(format_markdown(report))


if __name__ == "__main__":
    main(sys.argv[1])
