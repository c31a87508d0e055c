"""Every snippet of docs/interop.md runs, in order, in an empty folder: Python blocks in one namespace, and
each ``spannorm ...`` line of the bash blocks through the CLI (exit status 0)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from spannorm.cli.main import main  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "interop.md"
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippets() -> list[tuple[str, str]]:
    return BLOCK.findall(DOC.read_text())


def test_doc_has_the_round_trip():
    kinds = [kind for kind, _ in snippets()]
    text = DOC.read_text()
    assert kinds.count("python") >= 4 and kinds.count("bash") >= 2
    assert "spannorm import-hf" in text and "spannorm export-hf" in text and "--init-from" in text


def test_doc_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the trainer's token cache goes under ~/.cache
    namespace: dict = {}
    for kind, code in snippets():
        if kind == "python":
            exec(compile(code, str(DOC), "exec"), namespace)
            continue
        for line in code.splitlines():
            if line.strip():
                words = shlex.split(line)
                assert words[0] == "spannorm", line
                assert main(words[1:]) == 0, line
    out = capsys.readouterr().out
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("max |logit")]
    assert len(diffs) == 3 and max(diffs) < 1e-4  # import, Llama export and remote-code export checks
    assert (tmp_path / "runs" / "llama-to-span" / "summary.json").is_file()
    assert (tmp_path / "span-hf" / "modeling_spannorm.py").is_file()
