"""Every snippet of docs/stability.md runs, in order, in an empty folder: Python blocks in one namespace, each
``spannorm ...`` line of the bash blocks through the CLI (exit status 0). The identity-path table runs at
depths 4 and 16 only (64 takes minutes on a small CPU) and must reproduce the recorded rows. The recorded
``console`` runs are too long for a test: their commands must still parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from spannorm.cli.main import build_parser, main
from spannorm.diagnostics.report import load_schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "stability.md"
BLOCK = re.compile(r"^```(python|bash|console|text)\n(.*?)^```", re.MULTILINE | re.DOTALL)
ROW = re.compile(r"^(post|deepnorm|span_post)\s+(\d+)\s+(\S+)\s+(\S+)\s+\S+\s+\|\s+(\S+)\s+(\S+)$", re.MULTILINE)


def snippets() -> list[tuple[str, str]]:
    return BLOCK.findall(DOC.read_text())


def test_doc_covers_the_toolkit():
    text = DOC.read_text()
    for needle in ("spannorm check", "diagnostics_every", "predict_init", "suggest_scaling", "fit_growth",
                   "--strict", "package.module:factory", "![", "2-core CPU"):
        assert needle in text, needle
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (DOC.parent / image).is_file(), image


def test_doc_names_the_report_schema_and_its_top_level_keys():
    text = DOC.read_text()
    section = text[text.index("**report.json schema.**"):text.index("## Measurements")]
    assert "spannorm/schemas/report.schema.json" in section
    assert (DOC.parents[1] / "src" / "spannorm" / "schemas" / "report.schema.json").is_file()
    schema = load_schema()  # the package's copy, as report.json is validated against it
    listed = set(re.findall(r"^- `([a-z_]+)`(?:, `([a-z_]+)`)?", section, re.MULTILINE))
    listed = {key for pair in listed for key in pair if key}
    assert listed == set(schema["properties"]) == set(schema["required"])
    target_keys = set(schema["$defs"]["target"]["properties"])
    targets_line = section[section.index("- `targets`"):]
    assert all(f"`{key}`" in targets_line for key in target_keys - {"target"})
    assert all(f"`{key}`" in targets_line for key in schema["$defs"]["depth"]["properties"])
    assert all(f"`{key}`" in targets_line for key in schema["$defs"]["verdict"]["properties"])


def test_recorded_commands_still_parse():
    commands = [line.removeprefix("$ ") for kind, code in snippets() if kind == "console"
                for line in code.splitlines() if line.startswith("$ spannorm ")]
    assert commands
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])


@pytest.mark.slow
def test_doc_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the trainer's token cache goes under ~/.cache
    monkeypatch.syspath_prepend(str(tmp_path))  # my_blocks.py, written by a snippet
    recorded = {(p, int(L)): tuple(map(float, v)) for p, L, *v in
                [(m[0], m[1], m[2], m[3], m[4], m[5]) for m in ROW.findall(DOC.read_text())]}
    assert len(recorded) == 9
    namespace: dict = {}
    for kind, code in snippets():
        if kind == "python":
            code = code.replace("for L in (4, 16, 64):", "for L in (4, 16):")
            exec(compile(code, str(DOC), "exec"), namespace)
        elif kind == "bash":
            for line in code.splitlines():
                if line.strip():
                    words = shlex.split(line)
                    assert words[0] == "spannorm", line
                    assert main(words[1:]) == 0, line
    out = capsys.readouterr().out
    rerun = {(p, int(L)): tuple(map(float, v)) for p, L, *v in
             [(m[0], m[1], m[2], m[3], m[4], m[5]) for m in ROW.findall(out)]}
    assert len(rerun) == 6
    for key, values in rerun.items():
        assert values == pytest.approx(recorded[key], rel=2e-3), key
    assert "['embed', 'block0.mid', 'block0.out'] 17" in out
    assert (tmp_path / "reports" / "quick" / "report.json").is_file()
    assert (tmp_path / "reports" / "mine" / "my_blocks_doubling_moments.png").is_file()
