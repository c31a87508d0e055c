"""Print a ``spannorm bench`` JSON report as Markdown tables (cases, then ratios), with its command and
hardware, for docs/benchmarks.md. A report written before placement names 2 (its meta has no
``placement_names``) is printed in today's names: its ``span`` rows and the ``span`` of its command are
``span_post``, so that the command builds the models that were measured.

Usage: python benchmarks/bench_to_markdown.py benchmarks/results/bench_cpu_placements.json
"""

from __future__ import annotations

import json
import sys

from spannorm.bench.harness import compute_ratios, format_markdown
from spannorm.config import upgrade_placement_name


def in_todays_names(report: dict) -> dict:
    """``report`` with version 1's placement names (a report without ``meta.placement_names``) renamed."""
    if "placement_names" in report.get("meta", {}):
        return report
    for result in report["results"]:
        placement = result.get("placement")
        new = upgrade_placement_name(placement)
        if new != placement:
            result["placement"] = new
            result["name"] = new + result["name"][len(placement):]
    words = report["meta"]["command"].split(" ")
    for i, word in enumerate(words[:-1]):
        if word == "--placements":
            words[i + 1] = ",".join(upgrade_placement_name(p) for p in words[i + 1].split(","))
    report["meta"]["command"] = " ".join(words)
    return report


def main(path: str) -> None:
    report = in_todays_names(json.loads(open(path, encoding="utf-8").read()))
    report["ratios"] = compute_ratios(report["results"])  # derived from the stored per-round medians
    hw = report["hardware"]
    print(f"Command: `{report['meta']['command']}`\n")
    print(f"Hardware: {hw['device_name']}, torch {hw['torch']}, {hw['torch_threads']} thread(s)"
          + (f", transformers {hw['transformers']}" if "transformers" in hw else "")
          + f"; measured {report['meta']['created_utc']}.\n")
    print(format_markdown(report))


if __name__ == "__main__":
    main(sys.argv[1])
