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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from spannorm.config import PLACEMENTS, ConfigError
from spannorm.experiments.plan_checks import check_plan, exact_lr_tag

PROTOCOLS = ("full", "lr_search")
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
    """What to measure after each run."""

    layer_stats: bool = True
    batch_size: int = 8
    prune_checkpoints: bool = False


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
    protocol: str = "full"
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


def _need(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ConfigError(f"plan {where} is missing {key!r}")
    return data[key]


def _number_list(value: Any, path: str, kind: type) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"plan {path}={value!r} is invalid: must be a non-empty list")
    out = []
    for item in value:
        try:
            number = kind(float(item)) if kind is int else float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"plan {path} item {item!r} is invalid: must be a number") from None
        if kind is int and float(item) != number:
            raise ConfigError(f"plan {path} item {item!r} is invalid: must be an integer")
        out.append(number)
    if len(set(out)) != len(out):
        raise ConfigError(f"plan {path}={value!r} is invalid: values must be distinct")
    return out


def _overrides(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"plan {path}={value!r} is invalid: must be a list of 'section.field=value' strings")
    return tuple(value)


def parse_plan(data: Any, source: str = "plan") -> StudyPlan:
    """Validate a plan dict (see the module docstring) and build a :class:`StudyPlan`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with keys name, base, grid, protocol, measure")
    known = {"name", "description", "base", "grid", "protocol", "measure"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"plan key {unknown[0]!r} is not known; allowed: {', '.join(sorted(known))}")
    base = data.get("base") or {}
    if not isinstance(base, dict) or set(base) - {"preset", "config", "overrides"}:
        raise ConfigError("plan base must be a mapping with keys preset, config, overrides")
    config = base.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError("plan base.config must be a mapping like a config file (model, data, optim, train)")
    base_overrides = tuple(_flatten("", config)) + _overrides(base.get("overrides"), "base.overrides")

    if "grid" not in data:  # name the file: the message below has no other anchor
        raise ConfigError(f"{source} is missing 'grid'; allowed: a plan with grid.placements and grid.depths")
    grid = data["grid"]
    if not isinstance(grid, dict):
        raise ConfigError("plan grid must be a mapping with placements, depths, ffn, lrs, seeds")
    grid_keys = {"placements", "depths", "ffn", "lrs", "seeds"}
    if set(grid) - grid_keys:
        bad = sorted(set(grid) - grid_keys)[0]
        raise ConfigError(f"plan grid.{bad} is not known; allowed: {', '.join(sorted(grid_keys))}")
    variants = []
    for item in _need(grid, "placements", "grid") or []:
        if isinstance(item, str):
            variant = PlacementVariant(item, item)
        elif isinstance(item, dict) and {"name", "placement"} <= set(item) \
                and set(item) <= {"name", "placement", "overrides", "ffn"}:
            only = item.get("ffn")
            if only is not None and (not isinstance(only, list) or not only):
                raise ConfigError(f"plan grid.placements[{item['name']}].ffn={only!r} is invalid: "
                                  "a non-empty list of grid.ffn names")
            variant = PlacementVariant(str(item["name"]), str(item["placement"]),
                                       _overrides(item.get("overrides"), f"grid.placements[{item['name']}]"),
                                       None if only is None else tuple(str(f) for f in only))
        else:
            raise ConfigError(f"plan grid.placements item {item!r} is invalid: a placement name, or "
                              "{name, placement, overrides}")
        if variant.placement not in PLACEMENTS:
            raise ConfigError(f"plan grid.placements item {variant.placement!r} is invalid; "
                              f"allowed: {', '.join(PLACEMENTS)}")
        if not variant.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"plan placement name {variant.name!r} is invalid: use letters, digits, _ - .")
        variants.append(variant)
    if not variants or len({v.name for v in variants}) != len(variants):
        raise ConfigError("plan grid.placements must be a non-empty list of distinct names")
    depths = _number_list(_need(grid, "depths", "grid"), "grid.depths", int)
    if any(d < 1 for d in depths):
        raise ConfigError(f"plan grid.depths={depths!r} is invalid: depths must be >= 1")
    ffn_raw = grid.get("ffn") or {"dense": []}
    if not isinstance(ffn_raw, dict) or not ffn_raw:
        raise ConfigError("plan grid.ffn must map names (e.g. dense, moe) to lists of overrides")
    ffn = {str(k): _overrides(v, f"grid.ffn.{k}") for k, v in ffn_raw.items()}
    for name in ffn:
        if not name.isalnum():
            raise ConfigError(f"plan grid.ffn name {name!r} is invalid: letters and digits only")
    for variant in variants:
        for name in variant.ffn or ():
            if name not in ffn:
                raise ConfigError(f"plan grid.placements[{variant.name}].ffn item {name!r} is invalid; "
                                  f"allowed: {', '.join(ffn)}")
    lrs = _number_list(grid.get("lrs", [1e-3]), "grid.lrs", float)
    if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ConfigError(f"plan grid.lrs={lrs!r} is invalid: learning rates must be positive")
    seeds = _number_list(grid.get("seeds", [0]), "grid.seeds", int)
    if any(s < 0 for s in seeds):
        raise ConfigError(f"plan grid.seeds={seeds!r} is invalid: seeds must be >= 0")

    protocol = data.get("protocol") or {}
    if not isinstance(protocol, dict):
        raise ConfigError("plan protocol must be a mapping with kind, search_seeds, shared_lr")
    kind = protocol.get("kind", "full")
    if kind not in PROTOCOLS:
        raise ConfigError(f"plan protocol.kind={kind!r} is invalid; allowed: {', '.join(PROTOCOLS)}")
    search_seeds = _number_list(protocol.get("search_seeds", seeds[:1]), "protocol.search_seeds", int)
    if not set(search_seeds) <= set(seeds):
        raise ConfigError(f"plan protocol.search_seeds={search_seeds!r} is invalid: must be among grid.seeds")
    known_protocol = {"kind", "search_seeds", "search_depths", "shared_lr", "shared_runs"}
    if set(protocol) - known_protocol:
        bad = sorted(set(protocol) - known_protocol)[0]
        raise ConfigError(f"plan protocol.{bad} is not known; allowed: {', '.join(sorted(known_protocol))}")
    search_depths = protocol.get("search_depths")
    if search_depths is not None:
        search_depths = _number_list(search_depths, "protocol.search_depths", int)
        if not set(search_depths) <= set(depths):
            raise ConfigError(f"plan protocol.search_depths={search_depths!r} is invalid: must be among "
                              "grid.depths")
    shared_runs = protocol.get("shared_runs", True)
    if not isinstance(shared_runs, bool):
        raise ConfigError(f"plan protocol.shared_runs={shared_runs!r} is invalid: must be true or false")
    shared_lr = protocol.get("shared_lr")
    if shared_lr is not None:
        shared_lr = float(shared_lr)
        if shared_lr not in lrs:
            raise ConfigError(f"plan protocol.shared_lr={shared_lr!r} is invalid: must be one of grid.lrs")

    measure_raw = data.get("measure") or {}
    allowed_measure = {"layer_stats", "batch_size", "prune_checkpoints"}
    if not isinstance(measure_raw, dict) or set(measure_raw) - allowed_measure:
        raise ConfigError(f"plan measure must be a mapping with keys {', '.join(sorted(allowed_measure))}")
    measure = MeasureOptions(**measure_raw)
    if not isinstance(measure.batch_size, int) or measure.batch_size < 1:
        raise ConfigError(f"plan measure.batch_size={measure.batch_size!r} is invalid: must be >= 1")

    name = str(data.get("name") or "sweep")
    plan = StudyPlan(name=name, placements=variants, depths=depths, ffn=ffn, lrs=lrs, seeds=seeds,
                     preset=base.get("preset"), base_overrides=base_overrides, protocol=kind,
                     search_seeds=search_seeds, search_depths=search_depths, shared_lr=shared_lr,
                     shared_runs=shared_runs, measure=measure,
                     description=str(data.get("description") or ""))
    check_plan(plan, source)  # no grid-owned key set outside the grid, no two runs under one id
    return plan


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
    return parse_plan(data, f"plan file {str(path)!r}")
