"""What a sweep's plan said when each sweep started, so that a report can show a comparison was fixed first.

Every start of :func:`~spannorm.experiments.runner.run_sweep` appends a record to the sweep index's
``starts`` list: the time, the SHA-256 of the plan text, the plan's pre-registered comparison and the
SHA-256 of that declaration, the git commit that last changed the plan file and whether the file was
committed unchanged, and how many runs of the sweep had already finished. A comparison counts as declared
before the runs when the first start with no finished run already carried the same declaration as the
plan the report reads.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from spannorm.config import PLACEMENT_NAMES

GIT_TIMEOUT_S = 10


def declaration_digest(declaration: Mapping[str, Any] | None) -> str | None:
    """SHA-256 of a pre-registered comparison's canonical JSON (None for no declaration)."""
    if declaration is None:
        return None
    return hashlib.sha256(json.dumps(dict(declaration), sort_keys=True).encode()).hexdigest()


def _git(folder: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def plan_file_commit(path: str | Path) -> dict[str, Any]:
    """The git commit that last changed ``path`` (with its date) and whether the file's content is that
    commit's (``committed``); ``commit`` None when the file is not tracked by git."""
    file = Path(path).resolve()
    log = _git(file.parent, "log", "-1", "--format=%H %cI", "--", file.name)
    if not log:
        return {"commit": None, "commit_date": None, "committed": False}
    commit, _, date = log.partition(" ")
    status = _git(file.parent, "status", "--porcelain", "--", file.name)
    return {"commit": commit, "commit_date": date, "committed": status == ""}


def start_record(declaration: Mapping[str, Any] | None, plan_text: str | None, plan_path: str | Path | None,
                 finished_before: int) -> dict[str, Any]:
    """The ``starts`` entry of one sweep start (see the module docstring)."""
    record: dict[str, Any] = {
        "time": round(time.time(), 3),
        "plan_sha256": None if plan_text is None else hashlib.sha256(plan_text.encode()).hexdigest(),
        "preregistered": None if declaration is None else dict(declaration),
        "preregistered_sha256": declaration_digest(declaration),
        "finished_before": finished_before,
        "placement_names": PLACEMENT_NAMES,
    }
    if plan_path is not None:
        record["plan_file"] = str(plan_path)
        record.update(plan_file_commit(plan_path))
    return record


@dataclass(frozen=True)
class DeclarationCheck:
    """Whether a sweep's records show its pre-registered comparison was fixed before any of its runs."""

    declared_first: bool
    text: str
    first_start: dict[str, Any] | None = None


def check_declared_first(starts: Sequence[Mapping[str, Any]],
                         declaration: Mapping[str, Any] | None) -> DeclarationCheck:
    """Read a sweep's ``starts``: the first start must have had no finished run and carried ``declaration``
    (the one the plan holds now), and no later start may have carried another one."""
    digest = declaration_digest(declaration)
    if not starts:
        return DeclarationCheck(False, "not shown: the sweep index records no sweep start (a sweep from before "
                                       "declarations were recorded)")
    first = dict(starts[0])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(first.get("time", 0))))
    if first.get("finished_before", 0):
        return DeclarationCheck(False, f"not shown: the first recorded start ({when}) found "
                                       f"{first['finished_before']} run(s) already finished", first)
    changed = [s for s in starts if s.get("preregistered_sha256") != digest]
    if changed:
        at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(changed[0].get("time", 0))))
        return DeclarationCheck(False, f"not shown: the start at {at} carried another declaration than the "
                                       "plan holds now", first)
    commit = first.get("commit")
    where = (f"plan file `{first.get('plan_file')}` at commit {commit[:12]} ({first.get('commit_date')})"
             + ("" if first.get("committed") else ", with uncommitted changes") if commit
             else "plan file not under git")
    # The rest of the plan (grid, seeds, steps) may change without touching the declaration; say so, so that
    # a protocol changed after results were seen is visible beside the comparison.
    edited = [s for s in starts[1:] if s.get("plan_sha256") != first.get("plan_sha256")]
    note = ""
    if edited:
        at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(edited[0].get("time", 0))))
        note = (f"; the plan's text changed later (first at the start of {at}, "
                f"{edited[0].get('finished_before', 0)} run(s) finished then), its declaration did not")
    if first.get("reconstructed"):  # a start record rebuilt from an earlier report, its index lost
        note += f"; the first start's record was reconstructed: {first['reconstructed']}"
    return DeclarationCheck(True, f"declared before any run: the first sweep start ({when}, no run finished "
                                  f"yet) carried this declaration (sha256 {digest[:12] if digest else '-'}; "
                                  f"{where}), and every later start the same{note}", first)


__all__ = ["DeclarationCheck", "check_declared_first", "declaration_digest", "plan_file_commit", "start_record"]
