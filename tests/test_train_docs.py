"""docs/training.md runs: every bash, YAML and Python snippet, in order, in a temporary folder.

``spannorm train`` commands are shortened with extra overrides placed before the command's own (so the
command's settings still win), and their ``--train.steps=N`` become a handful of steps. Lines marked
``# exits 2`` must fail with status 2. A Python ``print(...)  # EXPECTED`` must print EXPECTED."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from spannorm.cli.main import main

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "training.md"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snippets() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python|yaml)\n(.*?)```", DOC.read_text(), re.S)


def shorten(argv: list[str], cache_dir: Path) -> list[str]:
    """Insert fast settings right after ``train`` and cut every --train.steps=N to a few steps."""
    fast = ["--model.context_length=32", "--train.batch_size=4", "--train.eval_batches=1",
            "--train.steps=4", "--data.embedded_max_bytes=200000", f"--data.cache_dir={cache_dir}"]
    rest = [f"--train.steps={int(a.split('=')[1]) // 100 + 2}" if a.startswith("--train.steps=") else a
            for a in argv[1:]]
    return [argv[0], *fast, *rest]


def run_bash(code: str, cache_dir: Path) -> None:
    for line in code.strip().splitlines():
        command, _, comment = line.partition("  # ")
        argv = shlex.split(command)
        assert argv[0] == "spannorm", f"docs snippet is not a spannorm command: {line}"
        argv = argv[1:]
        if argv[0] == "train":
            argv = shorten(argv, cache_dir)
        expected = 2 if comment.startswith("exits 2") else 0
        assert main(argv) == expected, line


def run_python(code: str, cache_dir: Path, monkeypatch) -> None:
    from spannorm.train import config as config_module

    original = config_module.resolve_config

    def resolve_with_test_cache(*args, **kwargs):
        cfg = original(*args, **kwargs)
        cfg.data.cache_dir = str(cache_dir)
        return cfg

    monkeypatch.setattr(config_module, "resolve_config", resolve_with_test_cache)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_snippet"})
    printed = out.getvalue()
    for expected in re.findall(r"^print\(.*\)  # (.+)$", code, re.M):
        assert expected in printed, (expected, printed)


@pytest.mark.slow
def test_training_doc_snippets_run(tmp_path, monkeypatch):
    found = snippets()
    assert len(found) >= 8
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")  # `eval --data.path=README.md` reads it
    cache_dir = tmp_path / "cache"
    for kind, code in found:
        if kind == "yaml":
            name = code.splitlines()[0].lstrip("# ").strip()
            Path(name).write_text(code)
        elif kind == "bash":
            run_bash(code, cache_dir)
        else:
            run_python(code, cache_dir, monkeypatch)
    assert (tmp_path / "runs" / "tiny" / "summary.json").is_file()
    assert (tmp_path / "runs" / "peri6" / "config.yaml").read_text().count("placement: peri") == 1
