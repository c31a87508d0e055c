"""Training-step benchmark: step time, tokens/s, peak memory and MFU of placements, dense and MoE, eager
and compiled, fp32 and bf16, side by side with a Hugging Face Llama of the same size."""

from spannorm.bench.harness import (
    BenchCase,
    BenchReport,
    BenchSettings,
    compute_ratios,
    format_report,
    plan_cases,
    run_bench,
)
from spannorm.hardware.devices import DEVICE_PEAKS, lookup_device_peak, peak_tflops

__all__ = ["DEVICE_PEAKS", "BenchCase", "BenchReport", "BenchSettings", "compute_ratios", "format_report",
           "lookup_device_peak", "peak_tflops", "plan_cases", "run_bench"]
