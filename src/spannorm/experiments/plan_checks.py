"""Checks that keep a sweep's results credited to the right run: a plan that contradicts itself is refused
when it is parsed, a run id names exactly one learning rate, and a sweep folder belongs to one plan.

- :func:`check_plan` (called by :func:`~spannorm.experiments.plan.parse_plan`): the grid owns a run's
  placement, depth, learning rate and seed, which its run id records. An override of ``model.placement``,
  ``model.n_layers``, ``optim.lr`` or ``train.seed`` in a variant, an FFN kind or the base would either be
  silently replaced by the grid's value (base) or make the run something its id does not say (variant, FFN),
  so any of them is refused. Two learning rates or seeds that give one run id are refused too.
- :func:`exact_lr_tag`: the shortest scientific form of a learning rate that reads back as the same float
  (``3e-3``, ``1.5e-3``, ``1.0000001e-3``), so two learning rates never share a run id.
- :func:`check_sweep_folder`: a sweep folder that already holds runs accepts the plan that made them, or that
  plan extended (more depths, learning rates, seeds, placements); a plan with another name, or one that no
  longer asks for runs the folder holds, is refused before ``plan.yaml`` or ``index.json`` is touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from spannorm.config import ConfigError

GRID_OWNED = {"model.placement": "grid.placements (a variant's placement)", "model.n_layers": "grid.depths",
              "optim.lr": "grid.lrs", "train.seed": "grid.seeds",
              "model.placement_names": "the plan's top-level placement_names"}
"""Override keys a plan may not set outside the grid, and the grid key that sets each."""
INDEX_NAME = "index.json"
PLAN_NAME = "plan.yaml"


def exact_lr_tag(lr: float) -> str:
    """``lr`` as it appears in run ids: the fewest significant digits that read back as exactly ``lr``
    (0.003 -> ``3e-3``, 0.0015 -> ``1.5e-3``)."""
    for digits in range(17):
        text = f"{lr:.{digits}e}"
        if float(text) == lr:
            break
    mantissa, exponent = text.split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _key(override: str) -> str:
    return override.partition("=")[0].strip().removeprefix("--")


def check_plan(plan: Any, source: str = "plan") -> None:
    """Raise :class:`ConfigError` when ``plan`` (a :class:`~spannorm.experiments.plan.StudyPlan`) sets a
    grid-owned key outside the grid, or when two of its runs would share a run id."""
    places = [("base", plan.base_overrides)]
    places += [(f"grid.ffn.{name}", overrides) for name, overrides in plan.ffn.items()]
    places += [(f"grid.placements[{v.name}].overrides", v.overrides) for v in plan.placements]
    places += [(f"grid.placements[{v.name}].overrides_by_depth[{depth}]", overrides)
               for v in plan.placements for depth, overrides in v.overrides_by_depth]
    for where, overrides in places:
        for override in overrides:
            key = _key(override)
            if key in GRID_OWNED:
                raise ConfigError(f"{source}: {where} sets {override!r}, which the grid decides (and the run id "
                                  f"records); allowed: set it through {GRID_OWNED[key]}")
    for where, lrs in [("grid.lrs", plan.lrs)] + [(f"grid.placements[{v.name}].lrs", v.lrs)
                                                   for v in plan.placements if v.lrs is not None]:
        tags: dict[str, float] = {}
        for lr in lrs:
            tag = exact_lr_tag(lr)
            if tag in tags and tags[tag] != lr:
                raise ConfigError(f"{source}: {where} {tags[tag]!r} and {lr!r} would share the run id tag "
                                  f"lr{tag}; allowed: distinct learning rates")
            tags[tag] = lr
    for name, values in (("grid.lrs", plan.lrs), ("grid.seeds", plan.seeds), ("grid.depths", plan.depths)):
        if len(set(values)) != len(values):
            dup = next(v for v in values if values.count(v) > 1)
            raise ConfigError(f"{source}: {name} lists {dup!r} twice; allowed: distinct values")


def read_index(out_dir: str | Path) -> dict[str, Any] | None:
    """The sweep's ``index.json``, or None when there is none; :class:`ConfigError` naming the file when it is
    not a sweep index."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err).splitlines()[0]
        raise ConfigError(f"sweep index {str(path)!r} is corrupt ({reason}); allowed: restore it, or move the "
                          "sweep folder aside and start a new one") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("run_id"), str)
                                             for r in runs):
        raise ConfigError(f"sweep index {str(path)!r} is corrupt (no 'runs' list of records with a run_id); "
                          "allowed: restore it, or move the sweep folder aside and start a new one")
    return data


def check_sweep_folder(plan: Any, out_dir: str | Path, results: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise :class:`ConfigError` unless ``out_dir`` is new, or holds a sweep of the same plan name whose
    recorded runs ``plan`` (given ``results``, the folder's index records) still asks for."""
    out = Path(out_dir)
    stored_plan = out / PLAN_NAME
    if stored_plan.is_file():
        try:
            old = yaml.safe_load(stored_plan.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            old = None
        old_name = str(old.get("name") or "sweep") if isinstance(old, dict) else None
        if old_name is not None and old_name != plan.name:
            raise ConfigError(f"sweep folder {str(out)!r} belongs to plan {old_name!r}, not {plan.name!r}; "
                              "allowed: that plan, or that plan extended (docs/sweeps.md, 'Changing a plan'), "
                          "or a new --out")
    index = read_index(out)
    if index is None:
        return
    if index.get("plan") not in (None, plan.name):
        raise ConfigError(f"sweep folder {str(out)!r} belongs to plan {index.get('plan')!r}, not {plan.name!r}; "
                          "allowed: that plan, or that plan extended (docs/sweeps.md, 'Changing a plan'), "
                          "or a new --out")
    wanted = {spec.run_id for spec in plan.expand(results)}
    kept = [r["run_id"] for r in index["runs"] if r.get("status") in ("done", "diverged", "failed")]
    dropped = [run_id for run_id in kept if run_id not in wanted]
    if dropped:
        raise ConfigError(f"plan {plan.name!r} no longer asks for {len(dropped)} run(s) that sweep folder "
                          f"{str(out)!r} holds (e.g. {dropped[0]}); allowed: the plan that made them (extended, "
                          "not cut), or a new --out")


__all__ = ["GRID_OWNED", "check_plan", "check_sweep_folder", "exact_lr_tag", "read_index"]
