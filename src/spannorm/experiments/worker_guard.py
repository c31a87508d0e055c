"""Sweep workers die with the sweep: a worker whose parent is gone (killed with SIGKILL, say) must not train on
unattended, holding run folders and the caller's pipe.

:func:`guard_worker` runs first in every worker process. On Linux it asks the kernel for a parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes): the worker is killed the moment its parent exits. A
watchdog thread, on every platform, polls the parent pid once a second as a fallback and ends the worker when
it changed. Checkpoints are kill-safe and the run lock goes stale with its owner, so the next sweep resumes
the killed runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
"""From <linux/prctl.h>."""
WATCHDOG_PERIOD_S = 1.0
EXIT_ORPHANED = 70
"""The exit status of a worker ended by the watchdog because its parent was gone."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int, period_s: float) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(EXIT_ORPHANED)  # no cleanup: the parent that would read any result is gone
        time.sleep(period_s)


def guard_worker(parent_pid: int, period_s: float = WATCHDOG_PERIOD_S) -> None:
    """Make this worker die with ``parent_pid`` (the process pool's initializer)."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(EXIT_ORPHANED)
    threading.Thread(target=_watch, args=(parent_pid, period_s), name="spannorm-parent-watchdog",
                     daemon=True).start()


__all__ = ["guard_worker", "set_parent_death_signal"]
