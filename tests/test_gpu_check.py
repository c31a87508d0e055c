"""benchmarks/gpu_check: the shell script parses, and the driver's CPU half runs end to end on a tiny shape
(correctness of bf16 against fp32 on the CPU, `spannorm train` timing with the tiny preset, distributed
stages skipped without CUDA), writing one JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_benchmarks_doc_names_the_script():
    doc = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "bash benchmarks/gpu_check.sh benchmarks/results/gpu_check.json" in doc


def test_gpu_check_cpu_half_runs_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # through the shell script, as documented, with the CPU and a tiny shape
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu",
                           "--tiny", "--placements", "span", "--ffns", "dense,moe", "--dtypes", "fp32,bf16",
                           "--modes", "eager", "--check-steps", "2", "--train-steps", "3", "--warmup-steps", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert sorted((r["ffn"], r["dtype"]) for r in report["correctness"]) == [
        ("dense", "bf16"), ("dense", "fp32"), ("moe", "bf16"), ("moe", "fp32")]
    for row in report["correctness"]:
        assert row["status"] == "pass" and len(row["losses"]) == 2
        assert row["max_rel_diff"] <= row["tolerance"]
        if row["dtype"] == "fp32":  # the same device, dtype and kernels as the reference: exactly equal
            assert row["losses"] == row["cpu_losses"]
    assert [r["run"] for r in report["speed"]] == ["pre", "span", "moe_pre"]
    for row in report["speed"]:
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["mfu"] is None  # no CPU peak
        assert row["flops_per_token"] > 0 and row["timed_steps"] == 2
    assert report["ratios"]["span_time_over_pre"] > 0
    assert {r["status"] for r in report["distributed"]} == {"skipped"}
    assert "correctness against the CPU" in proc.stdout and "wrote" in proc.stdout
