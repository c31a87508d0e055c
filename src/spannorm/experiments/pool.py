"""The worker pool that sweeps and recoveries train their runs in.

:class:`RunPool` runs jobs (calls of :func:`~spannorm.experiments.runner.execute_run`, each training one run
into its folder) in ``workers`` spawned processes, or one at a time in this process when ``workers`` is 0.
Its callers ask it three things: how many runs may start now (:attr:`RunPool.free`), which are running
(:attr:`RunPool.running`), and the records of the next runs to end (:meth:`RunPool.wait`).

A worker that ends abruptly (the out-of-memory killer, a segfault, ``kill -9``) breaks a
:class:`~concurrent.futures.ProcessPoolExecutor`: every run in flight then fails with ``BrokenProcessPool``,
the healthy ones included, and nothing more can be submitted; the worker that died may even have been idle.
The pool replaces the executor and trains the runs that were in flight again, one at a time on the new
executor (each resumes from its last checkpoint), before it takes new ones, so that a worker that dies then
is known to have held the run it died in. That run is returned as ``failed`` (the next start retries it);
the others go on. The price of knowing: after a death, the runs that were side by side train back to back.
A break found when a run is submitted (an idle worker died) costs nothing but a new executor. The executor
may see a death late: at a submit it wakes its manager thread before it spawns the new worker, so the manager
can miss that worker's death until another run ends; that run then counts as ended, and the rest as above.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from spannorm.experiments.worker_guard import guard_worker

Job = tuple[Any, ...]
"""The arguments of one call of the pool's function; with ``execute_run`` the first is the run's spec dict."""

WORKER_LOST = ("its worker process ended abruptly while it trained alone (killed from outside, for example by "
               "the out-of-memory killer, or crashed); the same command, started again, resumes it from its last "
               "checkpoint")


def lost_record(job: Job) -> dict[str, Any]:
    """The ``failed`` record of an ``execute_run`` job whose worker died: the spec's coordinates, as
    ``execute_run`` records a run that raised."""
    spec = job[0] if job and isinstance(job[0], dict) else {}
    record = {k: v for k, v in spec.items() if k != "overrides"}
    record.update(status="failed", error=WORKER_LOST)
    return record


class RunPool:
    """Call ``fn(*job)`` for each job submitted, in ``workers`` processes (spawn; each first runs
    :func:`guard_worker`, so it dies with this process), or in this process when ``workers`` is 0. Use it as
    a context manager; the module docstring says what happens when a worker dies."""

    def __init__(self, workers: int, fn: Callable[..., dict[str, Any]], log: Callable[[str], None] = print):
        if workers < 0:
            raise ValueError(f"workers={workers} is invalid: must be >= 0")
        self.workers = workers
        self._fn = fn
        self._log = log
        self._executor: ProcessPoolExecutor | None = None
        self._inline: list[tuple[str, Job]] = []  # workers == 0: submitted, trained by the next wait()
        self._futures: dict[Future, tuple[str, Job]] = {}
        self._suspects: list[tuple[str, Job]] = []  # in flight when a worker died: each trains alone
        self._alone: set[str] = set()  # the keys of those, until each has ended

    def __enter__(self) -> RunPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def free(self) -> int:
        """How many runs may be submitted now: none while the runs of a dead worker retrain one by one."""
        if self.workers == 0:
            return 0 if self._inline else 1
        if self._suspects or any(key in self._alone for key, _ in self._futures.values()):
            return 0
        return self.workers - len(self._futures)

    @property
    def running(self) -> list[str]:
        """The keys of the runs submitted and not yet returned by :meth:`wait`."""
        return [key for key, _ in (*self._inline, *self._futures.values(), *self._suspects)]

    def submit(self, key: str, job: Job) -> None:
        """Start ``fn(*job)`` in a free worker (in this process: at the next :meth:`wait`)."""
        if self.free < 1:
            raise RuntimeError("RunPool.submit with no free worker")
        if self.workers == 0:
            self._inline.append((key, job))
        else:
            self._send(key, job)

    def wait(self) -> list[tuple[str, dict[str, Any]]]:
        """Block until at least one run ends (or until a dead worker's runs are set to retrain), and return
        ``(key, record)`` of each run that ended, in the order they were submitted."""
        if self.workers == 0:
            if not self._inline:
                return []
            key, job = self._inline.pop(0)
            return [(key, self._fn(*job))]
        self._start_suspect()
        if not self._futures:
            return []
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        ended: list[tuple[str, dict[str, Any]]] = []
        broken = False
        for future in [f for f in self._futures if f in done]:
            key, job = self._futures[future]
            try:
                record = future.result()
            except BrokenProcessPool:
                broken = True
                continue
            except Exception as err:  # noqa: BLE001 - a job that could not be sent or received: that run fails
                record = {**lost_record(job), "error": f"{type(err).__name__}: {err}".splitlines()[0][:500]}
            del self._futures[future]
            ended.append((key, record))
        if broken:
            ended.extend(self._after_broken())
        self._alone.difference_update(key for key, _ in ended)
        return ended

    def close(self) -> None:
        """Stop the workers (waiting for the runs in flight: after Ctrl-C each checkpoints and returns) and
        forget every run not returned."""
        self._replace_executor()
        self._inline.clear()
        self._futures.clear()
        self._suspects.clear()
        self._alone.clear()

    # ------------------------------------------------------------------ internals
    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=self.workers,
                                                 mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=guard_worker, initargs=(os.getpid(),))
        return self._executor

    def _send(self, key: str, job: Job) -> None:
        """Submit to the executor; one that broke while idle (a worker with no run died) is replaced first."""
        try:
            future = self._pool().submit(self._fn, *job)
        except BrokenProcessPool:
            self._log(f"a worker with no run had ended abruptly; new workers take {key}")
            self._replace_executor()
            future = self._pool().submit(self._fn, *job)
        self._futures[future] = (key, job)

    def _replace_executor(self) -> None:
        """Shut the executor down (waiting for its workers); the next submit starts a new one."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _start_suspect(self) -> None:
        if self._suspects and not self._futures:
            key, job = self._suspects[0]
            self._send(key, job)
            self._suspects.pop(0)

    def _after_broken(self) -> list[tuple[str, dict[str, Any]]]:
        """A worker died: every run in flight lost its worker. A run that was already training alone, on an
        executor of its own, is the one whose worker died: it fails. The others (even a run alone in flight
        on an older executor, whose idle neighbour may be the one that died) retrain one at a time."""
        lost = list(self._futures.values())
        self._futures.clear()
        self._replace_executor()
        failed = [(key, job) for key, job in lost if key in self._alone]
        for key, _ in failed:
            self._log(f"the worker training {key} alone ended abruptly; {key} counts as failed")
        again = [(key, job) for key, job in lost if key not in self._alone]
        if again:
            self._log(f"a worker ended abruptly while {len(lost)} run(s) trained "
                      f"({', '.join(key for key, _ in lost)}); each trains again alone, from its last checkpoint, "
                      "to find the one that dies")
        self._alone.update(key for key, _ in again)
        self._suspects = [*again, *self._suspects]
        return [(key, lost_record(job)) for key, job in failed]


__all__ = ["WORKER_LOST", "RunPool", "lost_record"]
