"""Jobs for tests/test_pool.py. They live in a module of their own because spawned workers import them by name."""

from __future__ import annotations

import os
import time
from pathlib import Path

PATIENCE_S = 120.0


def _pids(folder: str, key: str) -> list[int]:
    path = Path(folder) / f"{key}.calls"
    return [int(line) for line in path.read_text().splitlines()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def note_and_maybe_die(spec: dict, folder: str, dies: str, beside: str | None = None) -> dict:
    """Append this process's pid to FOLDER/KEY.calls, wait until the job ``beside`` has started too (a worker
    may be slow to spawn on a loaded CPU), then:
    - ``dies`` "always", or "once" on the first call: end this process abruptly;
    - ``dies`` "outlive", on the first call: wait until the process of ``beside`` has died, then for as long
      again as a broken pool takes to end this one (a worker that lives through that returns, and the test
      that expected it to be lost fails);
    - then return a record as ``execute_run`` does."""
    key = spec["run_id"]
    with (Path(folder) / f"{key}.calls").open("a") as f:
        f.write(f"{os.getpid()}\n")
    first = len(_pids(folder, key)) == 1
    deadline = time.time() + PATIENCE_S
    while beside is not None and not _pids(folder, beside) and time.time() < deadline:
        time.sleep(0.02)
    if dies == "always" or (dies == "once" and first):
        os._exit(9)
    if dies == "outlive" and first and beside is not None:
        while _alive(_pids(folder, beside)[0]) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(min(30.0, max(0.0, deadline - time.time())))
    return {"run_id": key, "status": "done", "pid": os.getpid()}
