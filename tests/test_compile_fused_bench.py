"""benchmarks/compile_fused_cpu.py's summary (docs/benchmarks.md, "torch.compile and fused AdamW on this
CPU"): the figures the doc quotes follow from the timings by the stated arithmetic. The benchmark itself
compiles for minutes, so it is not run here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_fused_cpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compile_fused_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_prices_compile_against_the_time_it_saves():
    result = {
        "first_steps": {"eager": {"step_s": [9.0, 0.2, 0.2, 0.2]}},  # the first eager step is dropped
        "steady_step_ms_rounds": {"eager": [200.0, 200.0]},
        "ratio_to_eager_rounds": {"eager": [1.0, 1.0], "compiled": [0.5, 0.75, 0.7], "fused": [0.9, 1.0, 0.95]},
        "compile_s": 30.0, "eval_compile_s": 10.0,
        "evaluation": {"eager": {"first_s": 2.0, "second_s": 2.0}, "compiled": {"first_s": 11.0, "second_s": 1.0}},
        "optimizer_step": {"for_loop_ms": 12.0, "fused_ms": 2.0},
    }
    summary = load_script().summarize(result, steps=400, evaluations=4)
    assert summary["eager_step_ms"] == pytest.approx(200.0)
    assert summary["ratio_median"] == {"compiled": 0.7, "fused": 0.95}
    assert summary["compiled_step_ms"] == pytest.approx(140.0)
    assert summary["compile_total_s"] == pytest.approx(40.0)
    assert summary["break_even_steps"] == pytest.approx(40.0 / 0.06)  # 60 ms saved per step
    assert summary["run_400_steps_eager_s"] == pytest.approx(400 * 0.2 + 4 * 2.0)
    assert summary["run_400_steps_compiled_s"] == pytest.approx(400 * 0.14 + 4 * 1.0 + 40.0)
    assert summary["optimizer_saved_ms"] == pytest.approx(10.0)
    assert summary["optimizer_saved_share_of_step"] == pytest.approx(0.05)
