"""Every benchmark command in docs/benchmarks.md runs (outside the training section, which its own test
covers). Commands are run shrunk: tiny model, one timed step, eager mode only (compilation takes minutes on
a CPU; the benchmark itself exercises it), output into a temporary folder. GPU commands are only parsed
when no CUDA device is present."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from spannorm.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
OTHER_SECTIONS = ("## Training: nanoGPT Shakespeare (char level)",)
SHRINK = ["--size", "tiny", "--d-model", "32", "--n-layers", "1", "--seq-len", "16", "--batch-size", "2",
          "--warmup", "1", "--steps", "1", "--rounds", "1", "--threads", "1", "--quiet", "--overwrite"]


def _my_sections(text: str) -> str:
    """The doc without the sections other pages' tests own."""
    parts = re.split(r"(?m)^(?=## )", text)
    return "".join(p for p in parts if not p.startswith(OTHER_SECTIONS))


def _commands() -> list[str]:
    if not DOC.exists():
        return []
    blocks = re.findall(r"```bash\n(.*?)```", _my_sections(DOC.read_text(encoding="utf-8")), flags=re.S)
    lines = [ln.strip() for block in blocks for ln in block.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _shrunk(argv: list[str], tmp_path: Path) -> list[str]:
    """``spannorm bench`` arguments with the modes forced to eager, the output moved to tmp_path and the
    size shrunk (later options win in argparse)."""
    out = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--modes", "--out"):
            skip = True
            continue
        out.append(arg)
    return out + ["--modes", "eager", "--out", str(tmp_path / "bench.json")] + SHRINK


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_has_commands():
    commands = _commands()
    assert any(c.startswith("spannorm bench") for c in commands)
    assert any(c.startswith("python benchmarks/bench_cpu.py") for c in commands)
    assert any(c.startswith("bash benchmarks/bench_gpu_gpt2.sh") for c in commands)


@pytest.mark.parametrize("command", [c for c in _commands() if c.startswith("spannorm bench")])
def test_documented_spannorm_bench_command_runs(command, tmp_path):
    argv = shlex.split(command)[1:]
    if "cuda" in argv and not torch.cuda.is_available():
        build_parser().parse_args(argv)  # at least the options exist
        return
    assert main(_shrunk(argv, tmp_path)) == 0
    assert (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("command", [c for c in _commands() if c.startswith("python benchmarks/bench_cpu.py")])
def test_documented_cpu_benchmark_run_is_a_valid_bench_command(command, tmp_path, monkeypatch):
    module = _load_script("bench_cpu.py")
    captured = []
    monkeypatch.setattr(module, "spannorm_main", lambda argv: captured.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", shlex.split(command)[1:])
    assert module.main() == 0
    (argv,) = captured
    assert argv[0] == "bench" and "--out" in argv
    assert main(_shrunk(argv, tmp_path)) == 0


@pytest.mark.parametrize("command", [c for c in _commands() if c.startswith("python benchmarks/bench_fast_paths.py")])
def test_documented_fast_paths_benchmark_runs(command, tmp_path, monkeypatch):
    module = _load_script("bench_fast_paths.py")
    argv = shlex.split(command)[1:]
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(tmp_path / "fast.json")
    monkeypatch.setattr(sys, "argv", argv + ["--repeats", "2", "--no-compile"])
    monkeypatch.setattr(module, "bench_moe",
                        lambda n_experts, repeats: {"n_experts": n_experts, "d_expert": 8, "times": {}})
    module.main()
    assert (tmp_path / "fast.json").exists() or "--out" not in argv


@pytest.mark.parametrize("command", [c for c in _commands() if c.startswith("bash benchmarks/bench_gpu_gpt2.sh")])
def test_documented_gpu_script_holds_a_valid_bench_command(command):
    script = (ROOT / "benchmarks" / "bench_gpu_gpt2.sh").read_text(encoding="utf-8")
    line = re.search(r"^spannorm bench .*?(?<!\\)$", script.replace("\\\n", " "), flags=re.M).group(0)
    argv = [{"$out": "out.json"}.get(a, a) for a in shlex.split(line)[1:] if a != "$@"]
    args = build_parser().parse_args(argv)
    assert args.size == "gpt2-124m" and args.dtypes == "bf16" and "compiled" in args.modes
