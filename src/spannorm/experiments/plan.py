"""Sweep plans: a YAML file that names a base run config and a grid, expanded into runs with stable ids.

A plan looks like this (every key but ``grid.placements`` and ``grid.depths`` has a default)::

    name: depth-study
    base:
      preset: null            # a named preset of spannorm/presets, or null
      config:                 # nested like a config file: model / data / optim / train
        model: {d_model: 64, n_heads: 4, context_length: 64}
        train: {steps: 200, batch_size: 8}
      overrides: []           # dotted overrides applied last
    grid:
      placements:             # a placement name, or a named variant with its own overrides
        - pre
        - span
        - {name: peri-dt0.1, placement: peri, overrides: [model.delta_t=0.1], ffn: [dense]}
      depths: [6, 24, 48]
      ffn:                    # name -> overrides; "dense" and "moe" are the usual two
        dense: []
        moe: [model.moe.n_experts=4, model.moe.top_k=2]
      lrs: [1.0e-3, 3.0e-3]
      seeds: [0, 1, 2]
    protocol:
      kind: full              # full: every lr x every seed; lr_search: see below
      search_seeds: [0]       # lr_search: the lr grid runs on these seeds only, at these depths ...
      search_depths: [6]      # (default: every depth; other depths take the nearest search depth's best lr)
      shared_lr: 3.0e-3       # ... then every seed runs at each cell's best lr and at this shared lr
      shared_runs: true
    measure:
      layer_stats: true       # per-layer moments and gradients after training, on a fixed val batch
      batch_size: 8
      prune_checkpoints: false  # delete a finished run's checkpoints once it has been measured

A *cell* is one (placement, depth, ffn) triple; its runs differ in learning rate and seed. Run ids are
``{placement}-L{depth}-{ffn}-lr{lr}-s{seed}``, e.g. ``span-L24-moe-lr3e-3-s1``.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml

from spannorm.config import ConfigError, Placement
from spannorm.configuration import build, fail, parse_override
from spannorm.experiments.plan_checks import check_plan, exact_lr_tag

Protocol = Literal["full", "lr_search"]
PROTOCOLS = typing.get_args(Protocol)
FINISHED = ("done", "diverged")
"""Run statuses that end a run for good (``failed`` runs are retried by the next sweep)."""


def format_lr(lr: float) -> str:
    """A learning rate as it appears in run ids: 0.003 -> ``3e-3``, 0.0015 -> ``1.5e-3``; exact, so two
    learning rates never share an id (see :func:`~spannorm.experiments.plan_checks.exact_lr_tag`)."""
    return exact_lr_tag(lr)


@dataclass(frozen=True)
class PlacementVariant:
    """One entry of ``grid.placements``: a display name, the model placement and extra overrides."""

    name: str
    placement: str
    overrides: tuple[str, ...] = ()
    ffn: tuple[str, ...] | None = None
    """Run this variant with these FFN kinds only (None: every kind of ``grid.ffn``)."""


@dataclass(frozen=True)
class Cell:
    """A (placement variant, depth, ffn) triple: the unit that an LR is selected for."""

    placement: str
    depth: int
    ffn: str

    @property
    def key(self) -> str:
        return f"{self.placement}-L{self.depth}-{self.ffn}"


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep: its id, its grid coordinates and the overrides that build its config."""

    run_id: str
    cell: Cell
    lr: float
    seed: int
    stage: str
    """``grid`` (full protocol); under lr_search: ``search`` (the LR grid on the search seeds), ``best`` (every
    seed at the cell's best LR) or ``shared`` (every seed at the shared LR)."""
    preset: str | None
    overrides: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "placement": self.cell.placement, "depth": self.cell.depth,
                "ffn": self.cell.ffn, "lr": self.lr, "seed": self.seed, "stage": self.stage,
                "preset": self.preset, "overrides": list(self.overrides)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunSpec":
        return cls(run_id=data["run_id"], cell=Cell(data["placement"], int(data["depth"]), data["ffn"]),
                   lr=float(data["lr"]), seed=int(data["seed"]), stage=data["stage"],
                   preset=data.get("preset"), overrides=tuple(data["overrides"]))


@dataclass
class MeasureOptions:
    """What to measure after each run (the plan's ``measure`` section)."""

    layer_stats: bool = True
    batch_size: int = 8
    prune_checkpoints: bool = False

    def validate(self, prefix: str = "plan.measure") -> None:
        if self.batch_size < 1:
            fail(f"{prefix}.batch_size", self.batch_size, "must be >= 1")


@dataclass
class StudyPlan:
    """A parsed, validated sweep plan."""

    name: str
    placements: list[PlacementVariant]
    depths: list[int]
    ffn: dict[str, tuple[str, ...]]
    lrs: list[float]
    seeds: list[int]
    preset: str | None = None
    base_overrides: tuple[str, ...] = ()
    protocol: Protocol = "full"
    search_seeds: list[int] = field(default_factory=lambda: [0])
    search_depths: list[int] | None = None
    """lr_search: the depths whose cells run the LR grid (None: every depth). A cell at another depth uses
    the best LR of the same placement and FFN at the nearest search depth (the deeper one on a tie)."""
    shared_lr: float | None = None
    shared_runs: bool = True
    """lr_search: also run every seed at the shared LR (besides the best LR)."""
    measure: MeasureOptions = field(default_factory=MeasureOptions)
    description: str = ""

    # ------------------------------------------------------------------ cells and runs
    def cells(self) -> list[Cell]:
        return [Cell(p.name, d, f) for p in self.placements for d in self.depths for f in self.ffn
                if p.ffn is None or f in p.ffn]

    def search_cell(self, cell: Cell) -> Cell:
        """The cell whose LR search decides ``cell``'s best LR (itself, under ``full`` or at a search depth)."""
        depths = self.search_depths or self.depths
        if self.protocol == "full" or cell.depth in depths:
            return cell
        nearest = min(depths, key=lambda d: (abs(d - cell.depth), -d))
        return Cell(cell.placement, nearest, cell.ffn)

    def search_specs(self, cell: Cell) -> list[RunSpec]:
        """The runs of the LR search that decides ``cell``'s best LR."""
        seeds = self.seeds if self.protocol == "full" else self.search_seeds
        stage = "grid" if self.protocol == "full" else "search"
        search = self.search_cell(cell)
        return [self.run_spec(search, lr, s, stage) for lr in self.lrs for s in seeds]

    def best_lr(self, cell: Cell, results: Mapping[str, Mapping[str, Any]]) -> float | None:
        """``cell``'s best LR from its search runs' records, or None while any of them is unfinished."""
        specs = self.search_specs(cell)
        records = [results.get(spec.run_id) for spec in specs]
        if not all(r is not None and r.get("status") in FINISHED for r in records):
            return None
        by_lr: dict[float, list] = {}
        for spec, record in zip(specs, records):
            by_lr.setdefault(spec.lr, []).append(record)
        return select_best_lr(by_lr)

    def variant(self, name: str) -> PlacementVariant:
        return next(p for p in self.placements if p.name == name)

    @property
    def reference_lr(self) -> float:
        """The shared LR: ``protocol.shared_lr``, else the middle of the grid."""
        if self.shared_lr is not None:
            return self.shared_lr
        return sorted(self.lrs)[(len(self.lrs) - 1) // 2]

    def run_spec(self, cell: Cell, lr: float, seed: int, stage: str) -> RunSpec:
        variant = self.variant(cell.placement)
        overrides = (
            *self.base_overrides,
            f"model.placement={variant.placement}",
            f"model.n_layers={cell.depth}",
            *self.ffn[cell.ffn],
            *variant.overrides,
            f"optim.lr={lr!r}",
            f"train.seed={seed}",
        )
        run_id = f"{cell.key}-lr{format_lr(lr)}-s{seed}"
        return RunSpec(run_id, cell, lr, seed, stage, self.preset, overrides)

    def expand(self, results: Mapping[str, Mapping[str, Any]] | None = None) -> list[RunSpec]:
        """Every run the plan asks for, given the results so far (``run_id -> record`` with ``status`` and
        ``final_val_loss``). Under ``lr_search`` the extra-seed runs of a cell appear only once all of its
        search runs have finished, because they depend on the selected LR."""
        results = results or {}
        specs: list[RunSpec] = []
        known: set[str] = set()

        def add(spec: RunSpec) -> None:
            if spec.run_id not in known:
                specs.append(spec)
                known.add(spec.run_id)

        cells = self.cells()
        for cell in cells:  # the LR searches first, so that a later stage never renames a search run
            if self.protocol == "full":
                for lr in self.lrs:
                    for seed in self.seeds:
                        add(self.run_spec(cell, lr, seed, "grid"))
            elif self.search_cell(cell) == cell:
                for spec in self.search_specs(cell):
                    add(spec)
        if self.protocol == "full":
            return specs
        for stage in ("best", "shared"):
            for cell in cells:
                best = self.best_lr(cell, results)
                if best is None:
                    continue
                if stage == "best":
                    lr = best
                elif self.shared_runs:
                    lr = self.reference_lr
                else:
                    continue
                for seed in self.seeds:
                    add(self.run_spec(cell, lr, seed, stage))
        return specs


# ---------------------------------------------------------------------- LR selection
def rank_key(records: Iterable[Mapping[str, Any]]) -> tuple[int, float]:
    """How good an LR is from its runs: (number of diverged runs, mean final val loss of the others).
    Lower is better, so a divergence ranks an LR below every LR without one: diverged counts as worst."""
    records = list(records)
    diverged = sum(1 for r in records if r.get("status") == "diverged" or r.get("diverged"))
    losses = [float(r["final_val_loss"]) for r in records
              if not (r.get("status") == "diverged" or r.get("diverged"))
              and r.get("final_val_loss") is not None and math.isfinite(float(r["final_val_loss"]))]
    mean = sum(losses) / len(losses) if losses else math.inf
    return diverged, mean


def select_best_lr(runs_by_lr: Mapping[float, Iterable[Mapping[str, Any]]]) -> float:
    """The LR whose runs rank best by :func:`rank_key`; ties go to the smaller LR."""
    return min(runs_by_lr, key=lambda lr: (*rank_key(runs_by_lr[lr]), lr))


# ---------------------------------------------------------------------- parsing
# The plan file's sections, as typed dataclasses built by :func:`spannorm.configuration.build` (unknown keys,
# types, enumerated values and finite floats are checked there); :func:`parse_plan` adds the checks between
# sections and assembles the :class:`StudyPlan`.
@dataclass
class PlanBase:
    """``base``: the config every run starts from."""

    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """Nested like a config file (model, data, optim, train); flattened into overrides."""
    overrides: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "plan.base") -> None:
        _check_overrides(f"{prefix}.overrides", self.overrides)


@dataclass
class PlanVariantEntry:
    """An item of ``grid.placements`` written as a mapping (a bare name ``pre`` means {name: pre, placement: pre})."""

    name: str
    placement: Placement
    overrides: list[str] = field(default_factory=list)
    ffn: list[str] | None = None

    def validate(self, prefix: str) -> None:
        if not self.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            fail(f"{prefix}.name", self.name, "use letters, digits, _ - .")
        _check_overrides(f"{prefix}.overrides", self.overrides)
        if self.ffn is not None and not self.ffn:
            fail(f"{prefix}.ffn", self.ffn, "a non-empty list of grid.ffn names")


@dataclass
class PlanGrid:
    """``grid``: the placements, depths, FFN kinds, learning rates and seeds a study crosses."""

    placements: list[Any]
    """Placement names, or mappings :class:`PlanVariantEntry`."""
    depths: list[int]
    ffn: dict[str, list[str]] = field(default_factory=lambda: {"dense": []})
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    seeds: list[int] = field(default_factory=lambda: [0])

    def validate(self, prefix: str = "plan.grid") -> None:
        for name in ("depths", "lrs", "seeds"):
            _check_distinct(f"{prefix}.{name}", getattr(self, name))
        if any(d < 1 for d in self.depths):
            fail(f"{prefix}.depths", self.depths, "depths must be >= 1")
        if any(not lr > 0 for lr in self.lrs):
            fail(f"{prefix}.lrs", self.lrs, "learning rates must be positive")
        if any(s < 0 for s in self.seeds):
            fail(f"{prefix}.seeds", self.seeds, "seeds must be >= 0")
        if not self.ffn:
            self.ffn = {"dense": []}
        for name, overrides in self.ffn.items():
            if not name.isalnum():
                fail(f"{prefix}.ffn", name, "names are letters and digits only")
            _check_overrides(f"{prefix}.ffn.{name}", overrides)


@dataclass
class PlanProtocol:
    """``protocol``: which runs the grid asks for (see the module docstring)."""

    kind: Protocol = "full"
    search_seeds: list[int] | None = None
    """lr_search: the seeds the LR grid runs on (None: the first of grid.seeds)."""
    search_depths: list[int] | None = None
    shared_lr: float | None = None
    shared_runs: bool = True

    def validate(self, prefix: str = "plan.protocol") -> None:
        for name in ("search_seeds", "search_depths"):
            if getattr(self, name) is not None:
                _check_distinct(f"{prefix}.{name}", getattr(self, name))


@dataclass
class PlanFile:
    """A plan file as written: the sections of the module docstring."""

    grid: PlanGrid
    name: str | None = None
    description: str | None = None
    base: PlanBase = field(default_factory=PlanBase)
    protocol: PlanProtocol = field(default_factory=PlanProtocol)
    measure: MeasureOptions = field(default_factory=MeasureOptions)


def _check_distinct(path: str, values: list) -> None:
    if not values:
        fail(path, values, "must be a non-empty list")
    if len(set(values)) != len(values):
        fail(path, values, "values must be distinct")


def _check_overrides(path: str, overrides: list[str]) -> None:
    for text in overrides:
        try:
            parse_override(text)
        except ConfigError:
            fail(path, overrides, "must be a list of 'section.field=value' strings")


def _flatten(prefix: str, value: Any) -> list[str]:
    """A nested config dict as dotted overrides (``placement_overrides`` stays one YAML value)."""
    if isinstance(value, dict) and not prefix.endswith("placement_overrides"):
        out: list[str] = []
        for key, inner in value.items():
            out += _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
        return out
    if isinstance(value, (dict, list)) or value is None:
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("...").strip()
        return [f"{prefix}={text}"]
    return [f"{prefix}={value}"]


def _variant(item: Any, index: int) -> PlacementVariant:
    path = f"plan.grid.placements[{index}]"
    if isinstance(item, str):
        entry = build(PlanVariantEntry, {"name": item, "placement": item}, path)
    elif isinstance(item, dict):
        entry = build(PlanVariantEntry, item, path)
    else:
        fail(path, item, "a placement name, or {name, placement, overrides, ffn}")
    return PlacementVariant(entry.name, entry.placement, tuple(entry.overrides),
                       None if entry.ffn is None else tuple(entry.ffn))


def parse_plan(data: Any, source: str = "plan") -> StudyPlan:
    """Validate a plan dict (see the module docstring) and build a :class:`StudyPlan`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with keys name, base, grid, protocol, measure")
    plan = build(PlanFile, data, "plan")
    grid, protocol = plan.grid, plan.protocol
    variants = [_variant(item, i) for i, item in enumerate(grid.placements)]
    if not variants or len({v.name for v in variants}) != len(variants):
        fail("plan.grid.placements", [v.name for v in variants], "must be a non-empty list of distinct names")
    for variant in variants:
        for name in variant.ffn or ():
            if name not in grid.ffn:
                fail(f"plan.grid.placements[{variant.name}].ffn", name, f"allowed: {', '.join(grid.ffn)}")
    search_seeds = grid.seeds[:1] if protocol.search_seeds is None else protocol.search_seeds
    if not set(search_seeds) <= set(grid.seeds):
        fail("plan.protocol.search_seeds", search_seeds, "must be among grid.seeds")
    if protocol.search_depths is not None and not set(protocol.search_depths) <= set(grid.depths):
        fail("plan.protocol.search_depths", protocol.search_depths, "must be among grid.depths")
    if protocol.shared_lr is not None and protocol.shared_lr not in grid.lrs:
        fail("plan.protocol.shared_lr", protocol.shared_lr, "must be one of grid.lrs")
    base_overrides = tuple(_flatten("", plan.base.config)) + tuple(plan.base.overrides)
    study = StudyPlan(name=plan.name or "sweep", placements=variants, depths=grid.depths,
                     ffn={name: tuple(o) for name, o in grid.ffn.items()}, lrs=grid.lrs, seeds=grid.seeds,
                     preset=plan.base.preset, base_overrides=base_overrides, protocol=protocol.kind,
                     search_seeds=search_seeds, search_depths=protocol.search_depths,
                     shared_lr=protocol.shared_lr, shared_runs=protocol.shared_runs, measure=plan.measure,
                     description=plan.description or "")
    check_plan(study, source)  # no grid-owned key set outside the grid, no two runs under one id
    return study


def load_plan(path: str | Path) -> StudyPlan:
    """Read and validate a plan YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plan file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ConfigError(f"plan file {str(path)!r} is not valid YAML: {first}") from None
    source = f"plan file {str(path)!r}"
    try:
        return parse_plan(data, source)
    except ConfigError as err:
        if str(err).startswith(source):
            raise
        raise ConfigError(f"{source}: {err}") from None
