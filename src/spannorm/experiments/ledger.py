"""A sweep's ledger: one small, append-only JSON-lines file that keeps what a sweep learned after its run
folders are gone.

Run folders hold checkpoints and logs; they belong on scratch disk. A ledger (``spannorm sweep --ledger FILE``)
holds, per finished run, everything a report and a resumed sweep need, a few kilobytes each, so it can be
committed beside the plan:

- a ``start`` line per sweep start: the plan's text and the start record of
  :mod:`~spannorm.experiments.declaration` (so a pre-registered comparison stays shown as declared first);
- a ``run`` line per finished run (done or diverged): its grid coordinates and the overrides that built it,
  the sweep's own overrides, its summary numbers, its validation and training loss curves, and its per-layer
  statistics when measured.

A sweep started with a ledger counts every run the ledger holds as finished, once its settings are checked
against the plan (the same check as a run folder's), and appends each run it finishes. A report reads a
ledger file like a sweep folder. Lines are written whole and flushed; a line cut by a kill is skipped and
counted, never fatal.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from spannorm.config import ConfigError
from spannorm.train.layout import METRICS_NAME

LEDGER_VERSION = 1
START, RUN = "start", "run"


def _curve(points: Any) -> list[tuple[int, float]]:
    out = []
    for point in points or ():
        try:
            step, value = int(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(value):
            out.append((step, value))
    return out


def read_curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The (step, val_loss) and (step, train_loss) points of ``run_dir``'s metrics.jsonl (empty when none)."""
    val: list[tuple[int, float]] = []
    train: list[tuple[int, float]] = []
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return val, train
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        step = row.get("step")
        if step is None:
            continue
        for key, out in (("val_loss", val), ("train_loss", train)):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.append((int(step), float(value)))
    return val, train


@dataclass
class Ledger:
    """The parsed content of a ledger file (empty when the file does not exist yet)."""

    path: Path
    starts: list[dict[str, Any]] = field(default_factory=list)
    """Each ``start`` line, oldest first."""
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``run_id -> run line`` (a later line for the same run wins)."""
    skipped_lines: int = 0
    """Lines that did not parse (a write cut by a kill): skipped."""

    @property
    def plan_name(self) -> str | None:
        return self.starts[-1].get("plan") if self.starts else None

    @property
    def plan_text(self) -> str | None:
        """The plan text of the latest start (what a report of the ledger alone reads)."""
        return self.starts[-1].get("plan_text") if self.starts else None

    def curves(self, run_id: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        line = self.runs.get(run_id) or {}
        return _curve(line.get("val_curve")), _curve(line.get("train_curve"))

    def layer_stats(self, run_id: str) -> dict[str, Any] | None:
        stats = (self.runs.get(run_id) or {}).get("layer_stats")
        return stats if isinstance(stats, dict) else None

    def append(self, entry: Mapping[str, Any]) -> None:
        """Append one line, whole, flushed and synced; a file whose last line was cut gets a newline first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_strict(dict(entry)), allow_nan=False, separators=(",", ":")) + "\n"
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        self._take(dict(entry))

    def _take(self, entry: dict[str, Any]) -> None:
        if entry.get("kind") == START:
            self.starts.append(entry)
        elif entry.get("kind") == RUN and isinstance(entry.get("spec"), dict):
            self.runs[entry["spec"]["run_id"]] = entry


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so each line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_strict(v) for v in value]
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    return value


SPEC_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,), "placement": (str,), "depth": (int,), "ffn": (str,), "lr": (int, float), "seed": (int,),
    "stage": (str,), "overrides": (list,)}
"""The keys a run line's ``spec`` needs, and their JSON types."""


def _shape_error(entry: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a parsed ledger line, or None."""
    version = entry.get("ledger_version", LEDGER_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        return f"has ledger_version {version!r}, not a whole number"
    if version > LEDGER_VERSION:
        return f"has ledger_version {version}; this spannorm reads up to {LEDGER_VERSION}"
    if entry["kind"] == START:
        record = entry.get("record")
        if not isinstance(record, dict) or not isinstance(record.get("time"), (int, float)):
            return "is a start line without a 'record' holding a numeric 'time'"
        if not isinstance(entry.get("plan_text"), (str, type(None))):
            return "is a start line whose 'plan_text' is not text"
        return None
    spec = entry.get("spec")
    if not isinstance(spec, dict):
        return "is a run line without a 'spec' object"
    for key, types in SPEC_FIELDS.items():
        if not isinstance(spec.get(key), types) or isinstance(spec.get(key), bool):
            return f"is a run line whose spec.{key} is {spec.get(key)!r}"
    if not all(isinstance(o, str) for o in spec["overrides"]) \
            or not isinstance(spec.get("preset"), (str, type(None))):
        return "is a run line whose spec.overrides or spec.preset is not text"
    if not isinstance(entry.get("summary"), dict):
        return "is a run line without a 'summary' object"
    extra = entry.get("sweep_overrides", [])
    if not isinstance(extra, list) or not all(isinstance(o, str) for o in extra):
        return "is a run line whose sweep_overrides is not a list of text"
    return None


def read_ledger(path: str | Path) -> Ledger:
    """Parse ``path`` (a missing file is an empty ledger). :class:`ConfigError` when it is not a ledger: a
    folder, an unreadable file, or a line of another format, shape or a newer version. A line that is not JSON
    (cut by a kill) is skipped and counted."""
    path = Path(path)
    ledger = Ledger(path)
    if not path.exists():
        return ledger
    if not path.is_file():
        raise ConfigError(f"ledger {str(path)!r} is not a file; allowed: a JSON-lines file (new or written by "
                          "`spannorm sweep --ledger`)")
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise ConfigError(f"ledger {str(path)!r} cannot be read ({err.strerror or err}); allowed: a readable "
                          "file") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            ledger.skipped_lines += 1
            continue
        if not isinstance(entry, dict) or entry.get("kind") not in (START, RUN):
            raise ConfigError(f"ledger {str(path)!r} line {number} is not a ledger line (kind 'start' or 'run'); "
                              "allowed: a file written by `spannorm sweep --ledger`")
        wrong = _shape_error(entry)
        if wrong is not None:
            raise ConfigError(f"ledger {str(path)!r} line {number} {wrong}; allowed: a line as "
                              "`spannorm sweep --ledger` writes it (docs/sweeps.md, 'The ledger')")
        ledger._take(entry)
    return ledger


def check_ledger_writable(path: str | Path) -> None:
    """Raise :class:`ConfigError` unless the sweep can append to ``path``: an existing file it may write, or
    a new one in a folder that exists (or can be made) and is writable."""
    path = Path(path)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"ledger {str(path)!r} is read-only; allowed: a writable file")
        return
    nearest = next(p for p in (path.absolute().parent, *path.absolute().parent.parents) if p.exists())
    if not nearest.is_dir():
        raise ConfigError(f"ledger {str(path)!r} cannot be made: {str(nearest)!r} is a file; allowed: a path "
                          "inside a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"ledger {str(path)!r} cannot be made: {str(nearest)!r} is read-only; allowed: a "
                          "writable folder")


def ledger_precision(ledger: Ledger) -> tuple[bool, str | None]:
    """``(known, precision)``: the precision the sweep chose for the ledger's runs (``train.precision`` among
    their sweep overrides; None for none, i.e. the config default), known when every run line agrees."""
    seen = set()
    for line in ledger.runs.values():
        chosen = [o.partition("=")[2].strip() for o in line.get("sweep_overrides") or ()
                  if o.partition("=")[0].strip().removeprefix("--") == "train.precision"]
        seen.add(chosen[-1] if chosen else None)
    return (len(seen) == 1, next(iter(seen)) if len(seen) == 1 else None)


def start_line(plan_name: str, plan_text: str | None, record: Mapping[str, Any]) -> dict[str, Any]:
    """The ledger line of one sweep start: the plan's name and text, and its declaration start record."""
    return {"kind": START, "ledger_version": LEDGER_VERSION, "plan": plan_name, "plan_text": plan_text,
            "record": dict(record)}


CURVE_DECIMALS = 5
"""Loss curves are kept to 1e-5 nats (they are plotted); the summary's numbers are kept exact."""
STATS_DIGITS = 6
"""Per-layer stats are kept to 6 significant digits (they are plotted and tabled to 3 or 4)."""


def _significant(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value != 0.0:
        return float(f"{value:.{STATS_DIGITS}g}")
    if isinstance(value, list):
        return [_significant(v) for v in value]
    if isinstance(value, dict):
        return {k: _significant(v) for k, v in value.items()}
    return value


def run_line(plan_name: str, spec: Mapping[str, Any], sweep_overrides: list[str], summary: Mapping[str, Any],
             val_curve: list[tuple[int, float]], train_curve: list[tuple[int, float]],
             layer_stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ledger line of one finished run (``spec``: :meth:`RunSpec.to_dict`, overrides included): the summary
    exact, the curves to :data:`CURVE_DECIMALS` decimals, the layer stats to :data:`STATS_DIGITS` digits."""
    def curve(points: list[tuple[int, float]]) -> list[list[Any]]:
        return [[s, round(v, CURVE_DECIMALS)] for s, v in points]

    return {"kind": RUN, "ledger_version": LEDGER_VERSION, "plan": plan_name, "spec": dict(spec),
            "sweep_overrides": list(sweep_overrides), "summary": dict(summary),
            "val_curve": curve(val_curve), "train_curve": curve(train_curve),
            "layer_stats": None if layer_stats is None else _significant(dict(layer_stats))}  # strict on append


def check_ledger_plan(ledger: Ledger, plan_name: str) -> None:
    """A ledger belongs to one plan, as a sweep folder does: refuse one whose lines name another."""
    names = {str(e["plan"]) for e in [*ledger.starts, *ledger.runs.values()] if e.get("plan") is not None}
    other = sorted(n for n in names if n != plan_name)
    if other:
        raise ConfigError(f"ledger {str(ledger.path)!r} belongs to plan {other[0]!r}, not {plan_name!r}; allowed: "
                          "the plan that wrote it (or that plan extended), or another ledger file")


__all__ = ["LEDGER_VERSION", "Ledger", "check_ledger_plan", "check_ledger_writable", "ledger_precision",
           "read_curves", "read_ledger", "run_line", "start_line"]
