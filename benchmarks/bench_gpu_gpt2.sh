#!/usr/bin/env bash
# Issue 6's GPU target: a GPT-2-124M-size model (d=768, 12 layers, 12 heads, vocabulary 50304, context 1024,
# SwiGLU FFN with GPT-2's MLP parameter count, tied head: 124M parameters) trained in bf16 autocast should
# reach >= 400k tokens/s and >= 40% MFU on one H100. MFU divides by the device table's dense bf16 peak
# (989.4 TFLOP/s for an H100 SXM, 756.5 for PCIe), looked up from torch.cuda.get_device_name().
#
# Usage: bash benchmarks/bench_gpu_gpt2.sh [OUT_JSON] [extra spannorm bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/bench_gpu_gpt2.json}"
shift || true
spannorm bench --device cuda --size gpt2-124m --batch-size 16 \
  --placements pre,span --ffn dense --modes eager,compiled --dtypes bf16 \
  --warmup 5 --steps 30 --rounds 5 --out "$out" --overwrite "$@"
