"""The measured peak: a calibration matmul per device, dtype and thread count, cached, that leaves the global
random state alone; and the training record's achieved TFLOP/s and MFU on logging steps."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from spannorm.cli.main import main
from spannorm.config import ModelConfig
from spannorm.hardware import calibrate as cal
from spannorm.hardware.devices import process_peak_rss_bytes
from spannorm.model.counting import flops_per_token
from spannorm.train.callbacks import PeakMemory, Throughput
from spannorm.train.config import ConfigError, TrainConfig


def test_calibration_reports_a_positive_rate_of_a_product_it_ran():
    c = cal.calibrate("cpu", "fp32", repeats=1)
    assert c.device == "cpu" and c.dtype == "fp32" and c.threads == torch.get_num_threads()
    assert c.n in cal.SIZES and c.layout in cal.LAYOUTS and c.tflops > 0
    with pytest.raises(ValueError, match="dtype='fp8' is invalid: allowed: fp32, tf32, bf16"):
        cal.calibrate("cpu", "fp8")


def test_measured_peak_is_cached_per_device_dtype_and_threads(monkeypatch):
    calls = []

    def fake(device, dtype):
        calls.append((str(device), dtype, torch.get_num_threads()))
        return cal.Calibration(str(device), dtype, torch.get_num_threads(), 256, "nn", 0.125 * len(calls))

    monkeypatch.setattr(cal, "_CACHE", {})
    monkeypatch.setattr(cal, "calibrate", fake)
    assert cal.measured_peak_tflops("cpu", "fp32") == 0.125
    assert cal.measured_peak_tflops("cpu", "fp32") == 0.125  # cached, not measured again
    assert cal.measured_peak_tflops("cpu", "bf16") == 0.25
    assert len(calls) == 2 and [c.dtype for c in cal.cached_calibrations()] == ["fp32", "bf16"]


def test_calibration_leaves_the_global_random_state_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    cal.calibrate("cpu", "fp32", repeats=1)
    assert torch.equal(torch.rand(4), expected)


def test_throughput_logs_tflops_and_mfu_on_logging_steps_only():
    cb = Throughput(flops_per_token=1_000_000, world_size=2, total_steps=25, log_every=10, peak_tflops=0.5,
                    peak_source="train.peak_tflops")
    records = {step: {"step": step, "tokens_per_s": 4e6} for step in (1, 10, 11, 20, 25)}
    for step, record in records.items():
        cb.on_step_end(None, step, record)
    for step in (1, 11):
        assert "achieved_tflops" not in records[step] and "mfu" not in records[step]
    for step in (10, 20, 25):  # every log_every steps and the last; per device: halved for two processes
        assert records[step]["achieved_tflops"] == pytest.approx(1e6 * 4e6 / 2 / 1e12)
        assert records[step]["mfu"] == pytest.approx(2.0 / 0.5)
    no_peak = Throughput(1_000_000, 1, 5, 0, None, None)
    record = {"tokens_per_s": 1e6}
    no_peak.on_step_end(None, 3, record)  # log_every 0: every step
    assert record["achieved_tflops"] == pytest.approx(1.0) and record["mfu"] is None


def test_peak_memory_is_logged_on_logging_steps_only():
    cb = PeakMemory(torch.device("cpu"), total_steps=25, log_every=10)
    records = {step: {"step": step} for step in (1, 10, 11, 25)}
    for step, record in records.items():
        cb.on_step_end(None, step, record)
    assert [s for s, r in records.items() if "peak_mem_bytes" in r] == [10, 25]
    assert records[10]["peak_mem_bytes"] == pytest.approx(process_peak_rss_bytes(), rel=0.5)


def test_peak_tflops_setting_is_checked():
    TrainConfig(peak_tflops=1.5).validate()
    with pytest.raises(ConfigError, match="train.peak_tflops=0.0 is invalid: must be a finite number > 0"):
        TrainConfig(peak_tflops=0.0).validate()


@pytest.mark.parametrize("extra,source", [(["--train.peak_tflops=0.25"], "train.peak_tflops"),
                                          (["--train.measure_peak=true"], "measured"), ([], None)])
def test_a_training_run_logs_tflops_and_mfu(tmp_path, extra, source):
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--out", str(out), "--train.steps=4", "--train.log_every=2",
                 "--train.eval_every=0", "--train.eval_batches=1", "--train.progress=none",
                 "--model.d_model=32", "--model.n_layers=1", "--model.context_length=16",
                 "--train.batch_size=2", "--train.tensorboard=false", *extra])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "achieved_tflops" in r]
    assert [r["step"] for r in logged] == [2, 4]
    model = ModelConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())["model"])
    assert [r["step"] for r in records if "peak_mem_bytes" in r] == [2, 4]  # logging steps only
    assert all(r["peak_mem_bytes"] >= 10_000_000 for r in logged)  # the process's peak RSS on CPU: torch alone
    for r in logged:
        assert r["achieved_tflops"] == pytest.approx(flops_per_token(model) * r["tokens_per_s"] / 1e12)
        if source is None:
            assert r["mfu"] is None
        elif source == "train.peak_tflops":
            assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.25)
        else:
            assert r["mfu"] == pytest.approx(r["achieved_tflops"] / cal.measured_peak_tflops("cpu", "fp32"))


def test_bf16_on_a_cpu_without_bf16_units_gets_a_warning(monkeypatch):
    from spannorm.hardware import devices

    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: False)
    note = devices.bf16_cpu_note(torch.device("cpu"), "bf16")
    assert note.startswith("warning: train.precision=bf16 on a CPU without bf16 matrix units")
    assert devices.bf16_cpu_note(torch.device("cpu"), "fp32") is None
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: True)
    assert devices.bf16_cpu_note(torch.device("cpu"), "bf16") is None
