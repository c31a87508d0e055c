"""One owner per run folder: a lock file ``RUN/.spannorm.lock`` holding the owner's pid, host and start time.

``spannorm train`` and every run of ``spannorm sweep`` hold the lock of their run folder while they work in it.
A second process that wants the same folder is refused with one line naming the owner. A lock whose owner is
gone (a dead pid on this host, or a pid now used by a process that started after the lock was taken) is
stale and is taken over; a lock taken on another host is never judged from here: the refusal says so, and the
user deletes the file once that process is known to be gone. The lock is released when its holder leaves the
``with`` block, and at interpreter exit; ``kill -9`` leaves it, stale, for the next process to take over.

Taking the lock is atomic (``O_CREAT | O_EXCL``), so of two processes started together exactly one wins.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from spannorm.config import ConfigError

LOCK_NAME = ".spannorm.lock"
UNREADABLE_GRACE_S = 10.0
"""A lock file that cannot be parsed (its owner was killed between creating and writing it) is stale once
it is this old; younger, it is assumed to be being written."""


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock (exit 2 on the command line, like any user error)."""


def _proc_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unknown: it tells
    a live owner from an unrelated process that reused a dead owner's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces or parentheses
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": time.time(),
            "started_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "proc_start": _proc_start_ticks(pid)}


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's owner record, or None when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def is_stale(path: Path, owner: dict[str, Any] | None) -> bool:
    """True when the lock at ``path`` (owner record ``owner``) can be taken over from here."""
    if owner is None:
        try:
            return time.time() - path.stat().st_mtime > UNREADABLE_GRACE_S
        except OSError:
            return True
    if owner.get("host") != socket.gethostname():
        return False
    pid = owner["pid"]
    if not _pid_alive(pid):
        return True
    recorded, now = owner.get("proc_start"), _proc_start_ticks(pid)
    return recorded is not None and now is not None and recorded != now


def describe_owner(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "a process that is still writing its lock"
    return f"pid {owner['pid']} on host {owner.get('host', '?')} since {owner.get('started_utc', '?')}"


class RunLock:
    """The lock of one run folder; :meth:`acquire` it, :meth:`release` it (or use :func:`hold_run_folder`)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; :class:`RunFolderBusy` while a live process holds it."""
        for _ in range(3):  # a stale lock removed by us may be retaken by a racing process: then it is theirs
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_lock(self.path)
                if not is_stale(self.path, owner):
                    raise RunFolderBusy(
                        f"run folder {str(self.run_dir)!r} is in use by {describe_owner(owner)} (lock file "
                        f"{str(self.path)!r}); allowed: wait for it to finish, another --out, or delete the lock "
                        "file if that process is gone") from None
                self._remove_stale(owner)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(_owner_record()) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            atexit.register(self.release)
            return
        raise RunFolderBusy(f"run folder {str(self.run_dir)!r} is contended by several processes taking over a "
                            f"stale lock ({str(self.path)!r}); allowed: start one process per run folder")

    def _remove_stale(self, owner: dict[str, Any] | None) -> None:
        """Remove the stale lock, unless it changed hands since it was read (then the next try decides)."""
        if read_lock(self.path) != owner:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def release(self) -> None:
        """Remove the lock file if this process still owns it."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        owner = read_lock(self.path)
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@contextlib.contextmanager
def hold_run_folder(run_dir: str | os.PathLike) -> Iterator[RunLock]:
    """Hold ``run_dir``'s lock for the ``with`` block. The folder is created for the lock when missing; if the
    block raises :class:`ConfigError` (bad input found before anything was written), a folder created here is
    removed again, so a refused command leaves the disk as it found it."""
    run_dir = Path(run_dir)
    created = _topmost_missing(run_dir)
    if created is not None:
        try:
            run_dir.mkdir(parents=True)
        except OSError as err:
            raise ConfigError(f"--out {str(run_dir)!r} cannot be created: {err.strerror or err}; allowed: a "
                              "writable folder") from None
    elif not run_dir.is_dir():
        raise ConfigError(f"out_dir={str(run_dir)!r} is invalid: it is a file; name a folder")
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except PermissionError as err:
        raise ConfigError(f"--out {str(run_dir)!r} is not writable ({err.strerror}); allowed: a writable "
                          "folder") from None
    except RunFolderBusy:
        _remove_created(run_dir, created)
        raise
    try:
        yield lock
    except ConfigError:
        lock.release()
        _remove_created(run_dir, created)
        raise
    finally:
        lock.release()


def _topmost_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet; None when it exists."""
    if path.exists():
        return None
    path = path.absolute()
    top = path
    for parent in path.parents:
        if parent.exists():
            break
        top = parent
    return top


def _remove_created(run_dir: Path, created: Path | None) -> None:
    """Remove the folders made for the lock (``run_dir`` up to ``created``), each only when empty."""
    if created is None:
        return
    folder = run_dir.absolute()
    created = created.absolute()
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return
        folder = folder.parent


__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "hold_run_folder", "is_stale", "read_lock"]
