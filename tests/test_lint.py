"""The linter and the type checker run as part of the test suite, so the README's one test command
(`python -m pytest`) covers them. Their settings live in pyproject.toml ([tool.ruff], [tool.mypy])."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed; install the test extra: pip install -e \".[test]\"")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow  # about 30 s of CPU without mypy's cache (.mypy_cache), 2 to 3 s with it
def test_mypy_finds_nothing():
    result = run_tool("mypy", "src/spannorm")
    assert result.returncode == 0, result.stdout + result.stderr
