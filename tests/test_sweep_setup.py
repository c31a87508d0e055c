"""How a sweep uses the machine: the automatic worker count and precision (with fake core counts and fake
calibrations), the user's explicit settings winning, bad --workers values, and the choice recorded."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml

from spannorm.cli.main import main
from spannorm.experiments import sweep_setup
from spannorm.experiments.plan import Cell, RunSpec, parse_plan
from spannorm.experiments.runner import run_sweep
from spannorm.experiments.sweep_setup import (
    AUTO,
    choose_setup,
    names_precision,
    parse_workers,
    run_device,
    sweep_overrides,
)
from spannorm.hardware import calibrate, devices
from spannorm.hardware.calibrate import BF16_MIN_SPEEDUP, PrecisionChoice, fastest_cpu_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AVX2_EPYC = PrecisionChoice("fp32", fp32_tflops=0.090, bf16_tflops=0.025, threads=1)
AMX_XEON = PrecisionChoice("bf16", fp32_tflops=0.148, bf16_tflops=1.0, threads=1)


def spec(*overrides: str, preset: str | None = None) -> RunSpec:
    return RunSpec("pre-L2-dense-lr1e-3-s0", Cell("pre", 2, "dense"), 1e-3, 0, "grid", preset,
                   ("train.device=cpu", *overrides))


def never(*_):
    raise AssertionError("must not be measured")


@pytest.mark.parametrize("text, value", [("auto", AUTO), ("0", 0), ("3", 3)])
def test_workers_accepts_auto_and_whole_numbers(text, value):
    assert parse_workers(text) == value


@pytest.mark.parametrize("text", ["-1", "two", "1.5", ""])
def test_workers_rejects_anything_else(text):
    with pytest.raises(argparse.ArgumentTypeError, match="allowed: auto, or a whole number >= 0"):
        parse_workers(text)


@pytest.mark.parametrize("cores, threads, workers", [(2, 1, 2), (4, 1, 4), (4, 2, 2), (1, 2, 1), (3, 2, 1),
                                                     (4, None, 1)])
def test_auto_workers_are_cores_over_threads_per_worker(cores, threads, workers):
    setup = choose_setup([spec()], AUTO, threads, cores=lambda: cores, cpu_precision=lambda t: AVX2_EPYC)
    assert setup.workers == workers and setup.threads == threads and setup.device == "cpu"
    assert setup.workers_rule.startswith(f"auto: {cores} usable core(s)")


def test_explicit_workers_win_and_measure_no_cores():
    setup = choose_setup([spec()], 3, 1, cores=never, cpu_precision=lambda t: AVX2_EPYC)
    assert (setup.workers, setup.workers_rule) == (3, "as given")
    assert choose_setup([spec()], 0, 1, cores=never, cpu_precision=lambda t: AVX2_EPYC).workers == 0


def test_auto_precision_follows_the_calibration_on_a_cpu():
    threads_asked = []

    def amx(threads):
        threads_asked.append(threads)
        return AMX_XEON

    assert choose_setup([spec()], AUTO, 1, cores=lambda: 2, cpu_precision=amx).precision == "bf16"
    assert threads_asked == [1]  # calibrated at the workers' thread count
    setup = choose_setup([spec()], AUTO, 1, cores=lambda: 2, cpu_precision=lambda t: AVX2_EPYC)
    assert setup.precision == "fp32" and setup.precision_rule.startswith("auto: measured bf16 matmul 25.0 GFLOP/s")


@pytest.mark.parametrize("fp32, bf16, chosen", [(0.148, 1.0, "bf16"), (0.1, 0.1 * BF16_MIN_SPEEDUP, "bf16"),
                                                (0.1, 0.2, "fp32"), (0.09, 0.025, "fp32")])
def test_bf16_is_chosen_only_where_its_measured_peak_is_several_times_fp32(monkeypatch, fp32, bf16, chosen):
    peaks = {"fp32": fp32, "bf16": bf16}
    seen_threads = []

    def fake_peak(device, dtype):
        seen_threads.append(torch.get_num_threads())
        return peaks[dtype]

    monkeypatch.setattr(calibrate, "measured_peak_tflops", fake_peak)
    before = torch.get_num_threads()
    choice = fastest_cpu_precision(threads=2)
    assert (choice.precision, choice.fp32_tflops, choice.bf16_tflops, choice.threads) == (chosen, fp32, bf16, 2)
    assert seen_threads == [2, 2] and torch.get_num_threads() == before
    assert (">=" if chosen == "bf16" else "<") in choice.reason


def test_a_plan_that_names_the_precision_wins():
    assert names_precision(spec("train.precision=bf16")) and not names_precision(spec("train.steps=3"))
    assert names_precision(spec(preset="tiny"))  # the tiny preset sets train.precision: fp32
    setup = choose_setup([spec("train.precision=fp32")], AUTO, 1, cores=lambda: 2, cpu_precision=never)
    assert setup.precision is None and setup.precision_rule == "the plan names it"
    # Runs that name it keep theirs; the others get the sweep's choice.
    assert sweep_overrides(spec("train.precision=fp32"), "bf16") == ()
    assert sweep_overrides(spec(), "bf16") == ("train.precision=bf16",)
    assert sweep_overrides(spec(), None) == ()


def test_a_folder_keeps_its_first_choice_and_old_folders_keep_the_default():
    stored = {"precision": "bf16"}
    setup = choose_setup([spec()], AUTO, 1, stored=stored, cores=lambda: 2, cpu_precision=never)
    assert setup.precision == "bf16" and "first start" in setup.precision_rule
    legacy = choose_setup([spec()], AUTO, 1, earlier_runs=True, cores=lambda: 2, cpu_precision=never)
    assert legacy.precision is None and "predate" in legacy.precision_rule


def test_on_cuda_one_worker_and_the_config_precision():
    gpu_run = RunSpec("pre-L2-dense-lr1e-3-s0", Cell("pre", 2, "dense"), 1e-3, 0, "grid", None, ())
    setup = choose_setup([gpu_run], AUTO, 1, cores=never, cpu_precision=never, cuda_available=lambda: True)
    assert (setup.device, setup.workers, setup.precision) == ("cuda", 1, None)
    assert run_device([spec()], cuda_available=lambda: True) == "cpu"  # the plan's train.device=cpu wins
    assert run_device([], cuda_available=lambda: True) == "cpu"


def test_usable_cores_count_hyperthreads_once_and_honour_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    topology = {0: "0", 1: "1", 2: "0", 3: "1"}  # CPUs 2 and 3 are the hyper-threads of cores 0 and 1
    files = {devices.CGROUP_CPU_MAX: "max 100000"}
    for cpu, core in topology.items():
        files[devices.CPU_TOPOLOGY.format(cpu, "physical_package_id")] = "0"
        files[devices.CPU_TOPOLOGY.format(cpu, "core_id")] = core

    def fake_read(path):
        if path not in files:
            raise OSError(path)
        return files[path]

    monkeypatch.setattr(devices, "_read", fake_read)
    assert devices.usable_cpu_cores() == 2
    files[devices.CGROUP_CPU_MAX] = "50000 100000"  # half a CPU: still one worker
    assert devices.usable_cpu_cores() == 1
    del files[devices.CGROUP_CPU_MAX]
    for cpu in topology:  # no topology files: every CPU counts
        del files[devices.CPU_TOPOLOGY.format(cpu, "core_id")]
    assert devices.usable_cpu_cores() == 4


def micro_plan(tmp_path, **train) -> dict:
    """One 3-step run of a width-16, one-block model on the embedded corpus."""
    train = {"steps": 3, "batch_size": 2, "eval_every": 0, "eval_batches": 1, "tensorboard": False,
             "progress": "none", "checkpoint_every": 0, "keep_checkpoints": 1, "device": "cpu", **train}
    config = {"model": {"d_model": 16, "n_heads": 2, "context_length": 16},
              "data": {"embedded_max_bytes": 60000, "cache_dir": str(tmp_path / "cache")},
              "optim": {"warmup_steps": 1}, "train": train}
    return {"name": "micro", "base": {"config": config},
            "grid": {"placements": ["pre"], "depths": [1], "lrs": [3e-3]}, "measure": {"layer_stats": False}}


def write_plan(tmp_path, **train) -> str:
    data = micro_plan(tmp_path, **train)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("value", ["-1", "many", "2.5"])
def test_sweep_cli_rejects_bad_workers_in_one_line(tmp_path, capsys, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", write_plan(tmp_path), "--out", str(out), "--workers", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --workers" in err[0] and "allowed: auto, or a whole number >= 0" in err[0]
    assert not out.exists()


def test_sweep_cli_dry_run_prints_the_automatic_choice(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_setup, "usable_cpu_cores", lambda: 4)
    monkeypatch.setattr(sweep_setup, "fastest_cpu_precision", lambda threads: AMX_XEON)
    plan = write_plan(tmp_path)
    assert main(["sweep", plan, "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("[sweep] 4 worker(s) x 1 thread(s) on cpu (auto: 4 usable core(s)")
    assert "precision bf16 (auto: measured bf16 matmul 1000.0 GFLOP/s" in first
    assert main(["sweep", plan, "--out", str(tmp_path / "out"), "--dry-run", "--workers", "1",
                 "--threads", "2"]) == 0
    assert capsys.readouterr().out.startswith("[sweep] 1 worker(s) x 2 thread(s) on cpu (as given)")
    named = write_plan(tmp_path, precision="fp32")
    assert main(["sweep", named, "--out", str(tmp_path / "out2"), "--dry-run"]) == 0
    assert "precision as configured (the plan names it)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_chosen_precision_trains_the_runs_and_is_recorded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_setup, "usable_cpu_cores", lambda: 2)
    monkeypatch.setattr(sweep_setup, "fastest_cpu_precision", lambda threads: AMX_XEON)
    out = tmp_path / "out"
    assert main(["sweep", write_plan(tmp_path), "--out", str(out), "--workers", "0"]) == 0
    run_dir = out / "runs" / "pre-L1-dense-lr3e-3-s0"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"] == "bf16"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["sweep_overrides"] == ["train.precision=bf16"]
    assert "train.precision=bf16" not in info["overrides"]  # the plan's own settings stay apart
    index = json.loads((out / "index.json").read_text())
    assert index["setup"]["precision"] == "bf16" and index["setup"]["workers"] == 0
    assert index["setup"]["workers_rule"] == "as given"
    events = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["setup"] == index["setup"]
    # A later start keeps the folder's choice without measuring again, even where bf16 would now lose.
    monkeypatch.setattr(sweep_setup, "fastest_cpu_precision", never)
    capsys.readouterr()
    assert main(["sweep", write_plan(tmp_path), "--out", str(out), "--workers", "0"]) == 0
    assert "precision bf16 (chosen at this sweep folder's first start)" in capsys.readouterr().out


@pytest.mark.slow
def test_run_sweep_without_a_precision_leaves_the_config_alone(tmp_path):
    data = micro_plan(tmp_path)
    out = tmp_path / "sweep"
    assert run_sweep(parse_plan(data), out, workers=0, log=lambda _: None).executed
    run_dir = out / "runs" / "pre-L1-dense-lr3e-3-s0"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"] == "fp32"
    assert json.loads((run_dir / "run.json").read_text())["sweep_overrides"] == []
    assert "setup" not in json.loads((out / "index.json").read_text())
