#!/usr/bin/env bash
# The first thing to run on a machine with a GPU (issue 15, item 6): correctness on the device against the CPU
# for every placement (dense and MoE, fp32 and bf16, eager and compiled), the speed of `spannorm train` for the
# GPT-2-124M shape in bf16 compiled (tokens/s, MFU, against llm.c's ~470k tokens/s per H100), and DDP and FSDP2
# on all visible GPUs. Writes one JSON file and prints a table; stops starting stages after --budget-s
# (default 540 s) and is killed at 600 s.
#
# Usage: bash benchmarks/gpu_check.sh [OUT_JSON] [extra gpu_check.py options...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu_check.json}"
shift || true
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
timeout 600 python benchmarks/gpu_check.py --out "$out" "$@"
