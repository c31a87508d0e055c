"""``spannorm bench`` and its harness: the JSON report's fields and values, MFU from the device table (CUDA)
or from a measured calibration peak (CPU), ratios, the Hugging Face reference's size, and one-line errors on bad
input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spannorm.bench.harness import (
    BenchCase,
    BenchSettings,
    compute_ratios,
    format_report,
    model_config,
    plan_cases,
    resolve_peak_tflops,
    run_bench,
    summarize_times,
)
from spannorm.bench.reference import transformers_available
from spannorm.cli.main import main
from spannorm.hardware.calibrate import MEASURED, measured_peak_tflops
from spannorm.hardware.devices import lookup_device_peak, matmul_precision, peak_tflops
from spannorm.model.counting import flops_per_token, param_counts

TINY = ["--size", "tiny", "--d-model", "32", "--n-layers", "1", "--seq-len", "16", "--batch-size", "2",
        "--warmup", "1", "--steps", "2", "--rounds", "2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = main(["bench", *TINY, "--placements", "pre,span", "--ffn", "dense,moe", "--n-experts", "4",
                 "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_report_has_every_case_with_positive_measurements(cli_report):
    names = [r["name"] for r in cli_report["results"]]
    expected = ["pre/dense/eager/fp32", "span/dense/eager/fp32", "pre/moe/eager/fp32", "span/moe/eager/fp32"]
    if transformers_available():
        expected.append("hf_llama/dense/eager/fp32")
    assert names == expected
    settings = BenchSettings(**cli_report["settings"])
    assert settings.d_model == 32 and settings.tokens_per_step == 32
    for r in cli_report["results"]:
        st = r["step_time_s"]
        assert st["n"] == 2 and 0 < st["min"] <= st["p25"] <= st["median"] <= st["p75"] <= st["max"]
        assert len(r["round_median_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(32 / st["median"])
        cfg = model_config(settings, r["placement"], r["ffn"])
        assert r["flops_per_token"] == flops_per_token(cfg, 16)
        assert r["achieved_tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
        assert r["params"] == param_counts(cfg).total
        assert r["peak_memory_bytes"] > 0 and r["peak_memory_kind"] == "process_rss_high_water_mark"
        # parameters + AdamW's two moments, fp32 (+ the rotary tables)
        assert r["resident_state_bytes"] >= 3 * 4 * r["params"]
        assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
        # CPU without --peak-tflops: MFU against the peak measured by the calibration matmul, labelled so
        assert r["matmul_precision"] == "fp32" and r["peak_tflops_source"] == MEASURED
        assert r["peak_tflops"] == measured_peak_tflops("cpu", "fp32") > 0
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["peak_tflops"])
    hw = cli_report["hardware"]
    assert hw["device"] == "cpu" and hw["torch"] == torch.__version__ and hw["torch_threads"] == 1
    assert cli_report["meta"]["command"].startswith("spannorm bench --placements pre,span --ffn dense,moe")


def test_report_ratios_are_taken_from_the_medians(cli_report):
    by_name = {r["name"]: r for r in cli_report["results"]}
    ratios = {q["label"]: q for q in cli_report["ratios"]}
    span_pre = ratios["span/pre step time [dense, eager, fp32]"]
    assert span_pre["value"] == pytest.approx(by_name["span/dense/eager/fp32"]["step_time_s"]["median"]
                                              / by_name["pre/dense/eager/fp32"]["step_time_s"]["median"])
    moe_dense = ratios["MoE/dense step time [pre, eager, fp32]"]
    assert moe_dense["numerator"] == "pre/moe/eager/fp32" and moe_dense["denominator"] == "pre/dense/eager/fp32"
    if transformers_available():
        ours_hf = ratios["ours(pre)/HF Llama tokens/s [eager, fp32]"]
        assert ours_hf["value"] == pytest.approx(by_name["pre/dense/eager/fp32"]["tokens_per_s"]
                                                 / by_name["hf_llama/dense/eager/fp32"]["tokens_per_s"])


def _fake_result(placement, ffn="dense", compiled=False, dtype="fp32", median=1.0, rounds=(1.0, 1.0)):
    case = BenchCase(placement, ffn, compiled, dtype)
    return {"name": case.name, "placement": placement, "ffn": ffn, "compiled": compiled, "dtype": dtype,
            "step_time_s": {"median": median, "min": median / 2}, "round_median_s": list(rounds),
            "tokens_per_s": 100 / median}


def test_compute_ratios_on_known_values():
    results = [_fake_result("pre", median=2.0, rounds=(2.0, 2.0)),
               _fake_result("span", median=2.2, rounds=(2.4, 2.0)),
               _fake_result("hf_llama", median=2.5, rounds=(2.5, 2.5)),
               _fake_result("pre", ffn="moe", median=3.0, rounds=(3.0, 3.0)),
               _fake_result("pre", compiled=True, median=1.0, rounds=(1.0, 1.0)),
               _fake_result("pre", dtype="bf16", median=4.0, rounds=(4.0, 4.0))]
    ratios = {q["label"]: q for q in compute_ratios(results)}
    span = ratios["span/pre step time [dense, eager, fp32]"]
    assert span["value"] == pytest.approx(1.1)
    assert (span["per_round_min"], span["per_round_max"]) == pytest.approx((1.0, 1.2))
    assert span["per_round_median"] == pytest.approx(1.1)
    assert span["fastest_step_ratio"] == pytest.approx(1.1)
    assert ratios["ours(pre)/HF Llama tokens/s [eager, fp32]"]["fastest_step_ratio"] == pytest.approx(1.25)
    assert ratios["ours(pre)/HF Llama tokens/s [eager, fp32]"]["value"] == pytest.approx(1.25)
    assert ratios["MoE/dense step time [pre, eager, fp32]"]["value"] == pytest.approx(1.5)
    assert ratios["compiled speed-up (eager/compiled step) [pre, dense, fp32]"]["value"] == pytest.approx(2.0)
    assert ratios["bf16 speed-up (fp32/bf16 step) [pre, dense, eager]"]["value"] == pytest.approx(0.5)
    assert len(ratios) == 5


def test_summarize_times_quantiles():
    stats = summarize_times([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats == {"median": 3.0, "p25": 2.0, "p75": 4.0, "min": 1.0, "max": 5.0, "n": 5}


def test_device_table_gives_dense_peaks_for_fake_device_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5)
    assert peak_tflops("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(156.0)
    assert peak_tflops("NVIDIA A10", "bf16") == pytest.approx(125.0)  # not the A100 row
    assert peak_tflops("NVIDIA L4", "bf16") == pytest.approx(121.0)
    assert peak_tflops("NVIDIA L40S", "bf16") == pytest.approx(362.05)  # not the L4 row
    assert peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores
    assert peak_tflops("Some Future Accelerator", "bf16") is None
    assert lookup_device_peak("Intel(R) Xeon(R) Processor (2 logical cores)") is None
    with pytest.raises(ValueError, match="precision='fp8'"):
        peak_tflops("NVIDIA H100 80GB HBM3", "fp8")


def test_mfu_peak_comes_from_the_table_on_cuda_and_is_measured_on_cpu_without_a_user_figure():
    assert resolve_peak_tflops("cuda", "NVIDIA H100 80GB HBM3", "bf16", None) == (pytest.approx(989.4),
                                                                                 "device table")
    assert resolve_peak_tflops("cuda", "Unknown GPU", "bf16", None) == (None, None)
    assert resolve_peak_tflops("cpu", "Intel Xeon", "fp32", None) == (measured_peak_tflops("cpu", "fp32"),
                                                                     MEASURED)
    assert resolve_peak_tflops("cpu", "Intel Xeon", "fp32", 2.5) == (2.5, "user (--peak-tflops)")
    assert matmul_precision(torch.device("cpu"), "fp32") == "fp32"
    assert matmul_precision(torch.device("cpu"), "bf16") == "bf16"


def test_user_peak_gives_mfu_on_cpu():
    settings = BenchSettings(d_model=32, n_layers=1, n_heads=4, seq_len=8, batch_size=2, warmup=1, steps=1,
                             rounds=1, peak_tflops=0.5)
    report = run_bench(settings, plan_cases(["pre"], ["dense"], [False], ["fp32"], reference=False))
    (r,) = report.results
    assert r["peak_tflops"] == 0.5 and r["peak_tflops_source"] == "user (--peak-tflops)"
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.5)
    assert f"{100 * r['mfu']:.1f}%" in format_report(report)


@pytest.mark.skipif(not transformers_available(), reason="transformers is not installed")
@pytest.mark.parametrize("tied,kv_heads", [(True, None), (False, 2)])
def test_hf_reference_has_our_parameter_count(tied, kv_heads):
    from spannorm.bench.harness import build_case_model

    settings = BenchSettings(d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, seq_len=16,
                             tie_embeddings=tied)
    hf, cfg = build_case_model(BenchCase("hf_llama"), settings)
    ours, _ = build_case_model(BenchCase("pre"), settings)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == sum(p.numel() for p in ours.parameters()) == param_counts(cfg).total
    shapes_hf = sorted(tuple(p.shape) for p in hf.parameters())
    assert shapes_hf == sorted(tuple(p.shape) for p in ours.parameters())
    idx = torch.randint(256, (2, 16))
    loss = hf(idx, idx)
    assert loss.shape == () and math.isfinite(loss.item())


@pytest.mark.parametrize("args,message", [
    (["--placements", "pre,nope"], "--placements='nope' is invalid: allowed: pre, post"),
    (["--ffn", "sparse"], "--ffn='sparse' is invalid: allowed: dense, moe"),
    (["--modes", "jit"], "--modes='jit' is invalid: allowed: eager, compiled"),
    (["--rounds", "3"], "--rounds=3 is invalid: must be <= --steps=2"),
    (["--peak-tflops", "0"], "--peak-tflops=0.0 is invalid: must be > 0"),
    (["--n-heads", "5"], "model.d_model=32 is invalid: must be divisible by n_heads=5"),
    (["--device", "tpu"], "--device='tpu' is invalid"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, *args, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spannorm: error: ") and message in err[0]
    assert captured.out == ""
    assert not out.exists()


def test_existing_out_file_is_not_overwritten_without_flag(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("keep")
    assert main(["bench", *TINY, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep"


def test_markdown_rendering_lists_every_case_and_ratio(cli_report):
    from spannorm.bench.harness import format_markdown

    text = format_markdown(cli_report)
    for r in cli_report["results"]:
        assert f"| `{r['name']}` | {r['params']:,} | {1e3 * r['step_time_s']['median']:.1f} |" in text
    for r in cli_report["results"]:
        assert f"| {100 * r['mfu']:.1f}% |" in text
    assert text.count("| n/a |") == 0
    assert f"MFU peak: fp32: {measured_peak_tflops('cpu', 'fp32'):.3f} TFLOP/s, {MEASURED}" in text
    for q in cli_report["ratios"]:
        assert f"| {q['label']} | {q['value']:.3f} |" in text
