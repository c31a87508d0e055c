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
        - {name: post-lowlr, placement: post, lrs: [1.0e-4, 3.0e-4, 1.0e-3]}   # its own LR grid
        - name: peri-dtL      # overrides that depend on the depth: one list per grid depth, every depth named
          placement: peri
          overrides_by_depth: {6: [model.delta_t=0.288675], 24: [model.delta_t=0.144338],
                               48: [model.delta_t=0.102062]}
      depths: [6, 24, 48]
      ffn:                    # name -> overrides; "dense" and "moe" are the usual two
        dense: []
        moe: [model.moe.n_experts=4, model.moe.top_k=2]
      ffn_depths: {moe: [48]} # an FFN kind at these depths only (a kind not named here: every depth)
      lrs: [1.0e-3, 3.0e-3]
      seeds: [0, 1, 2]
    protocol:
      kind: full              # full: every lr x every seed; lr_search: see below
      search_seeds: [0]       # lr_search: the lr grid runs on these seeds only, at these depths ...
      search_depths: [6]      # (default: every depth; other depths take the nearest search depth's best lr)
      shared_lr: 3.0e-3       # ... then every seed runs at each cell's best lr and at this shared lr
      shared_runs: true
      bracket:                # a best LR at an edge of its grid adds one LR beyond that edge, and again,
        max_extensions: 2     # until the best is interior or this many were added (see lr_search.py)
        factor: null          # the step beyond an edge (null: the grid's own pattern)
      collapse_margin: null   # a search run ending within this many nats of the corpus's byte-unigram loss
                              # ranks like a diverged run, so a grid where no LR learned extends downward
                              # (null: off; needs a byte-level text corpus)
      order: stage            # stage: every LR search first; depth: the shallowest depth (then each FFN
                              # kind, in grid.ffn's order) first, so that whole depths finish early
      preregistered:          # one comparison fixed before any run (its declaration is recorded in the
        a: span               # sweep index at each start, so the report can show it came first)
        b: pre
        depth: 48
        ffn: dense
        which: best           # best: each side at its best LR; shared: both at the shared LR
        test: welch           # Welch's t-test, two-sided, at level alpha
        alpha: 0.05
        hypothesis: span ends below pre   # the claim in words, shown in the report
    measure:
      layer_stats: true       # per-layer moments and gradients after training, on a fixed val batch
      batch_size: 8
      prune_checkpoints: false  # delete a finished run's checkpoints once it has been measured

A *cell* is one (placement, depth, ffn) triple; its runs differ in learning rate and seed. Run ids are
``{placement}-L{depth}-{ffn}-lr{lr}-s{seed}``, e.g. ``span-L24-moe-lr3e-3-s1``; an LR added by bracketing is
a new run id, and a resumed sweep works out again, from the finished runs, which LRs were added.

A cell whose every search run ended at the corpus's byte-unigram loss learned nothing at any LR, and its
losses differ by noise: without more, its "best" LR is that noise, and may sit inside the grid (called
bracketed) or at the top (extended upward). ``protocol.collapse_margin`` (e.g. 0.1 nats, the report's "not
learned" margin) ranks a search run that ended within that margin of the unigram loss like a diverged run,
in the sweep and in the report alike (:func:`~spannorm.experiments.lr_search.rank_key`); such a grid ties, the
tie goes to the smallest LR, and bracketing extends it downward. A grid where some LR learned chooses as
without it (one search seed). The unigram loss is computed once per plan from the base's data, which must be
a byte-level text corpus: another tokenizer is refused when the plan is read, an unreadable corpus when the
sweep starts. The report's bracketing table names the search runs that ranked as collapsed.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from spannorm.config import (
    PLACEMENT_NAMES,
    ConfigError,
    Placement,
    refused_v1_spelling,
    upgrade_model_mapping,
    upgrade_override,
    upgrade_placement_name,
)
from spannorm.configuration import build, fail, parse_override
from spannorm.data.dataset import prepared_folder
from spannorm.experiments.lr_search import FINISHED, SearchState, bracket_search, rank_key, select_best_lr
from spannorm.experiments.plan_checks import check_plan, exact_lr_tag
from spannorm.experiments.unigram import UnigramReference, unigram_reference
from spannorm.train.config import DataConfig, resolve_config

Protocol = Literal["full", "lr_search"]
PROTOCOLS = typing.get_args(Protocol)
StartOrder = Literal["stage", "depth"]


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
    lrs: tuple[float, ...] | None = None
    """This variant's own LR grid (None: ``grid.lrs``)."""
    overrides_by_depth: tuple[tuple[int, tuple[str, ...]], ...] = ()
    """(depth, overrides) pairs: overrides applied after ``overrides`` at that depth only."""

    def overrides_at(self, depth: int) -> tuple[str, ...]:
        return next((o for d, o in self.overrides_by_depth if d == depth), ())


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
                "preset": self.preset, "overrides": list(self.overrides), "placement_names": PLACEMENT_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunSpec":
        return cls(run_id=data["run_id"], cell=Cell(data["placement"], int(data["depth"]), data["ffn"]),
                   lr=float(data["lr"]), seed=int(data["seed"]), stage=data["stage"],
                   preset=data.get("preset"), overrides=tuple(stored_overrides(data)))


def stored_overrides(data: Mapping[str, Any]) -> list[str]:
    """The overrides of a stored run spec (a ``run.json``, a ledger line, an index record) in today's placement
    names: a spec stored before ``placement_names`` existed wrote version 1's (``model.placement=span_clean``
    is ``model.placement=span`` now; see :data:`spannorm.config.PLACEMENT_NAMES`). The display name
    (``placement``) and the run id are the plan's and stay as they were."""
    overrides = list(data.get("overrides") or ())
    if "placement_names" in data:
        return overrides
    return [upgrade_override(o) if isinstance(o, str) else o for o in overrides]


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
    ffn_depths: dict[str, list[int]] = field(default_factory=dict)
    """An FFN kind named here runs at these depths only."""
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
    max_extensions: int = 0
    """LR bracketing (``protocol.bracket``): at most this many LRs added beyond a search grid's edges."""
    bracket_factor: float | None = None
    start_order: StartOrder = "stage"
    preregistered: Preregistered | None = None
    placement_names: int = PLACEMENT_NAMES
    """The version of the placement names the plan was written in; its variants' placements and overrides are
    today's either way (see :class:`PlanFile`)."""
    collapse_margin: float | None = None
    """``protocol.collapse_margin``: a search run whose final val loss is within this many nats of the corpus's
    byte-unigram loss (or above it) ranks like a diverged run (None: off)."""
    _unigram: UnigramReference | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ the corpus's unigram reference
    def base_data(self) -> DataConfig | None:
        """The data config of the plan's base (None when it does not resolve here)."""
        try:
            return resolve_config(self.preset, None, list(self.base_overrides)).data
        except ConfigError:
            return None

    def unigram_reference(self) -> UnigramReference:
        """The byte-unigram loss of the base's corpus (:mod:`~spannorm.experiments.unigram`), computed once."""
        if self._unigram is None:
            data = self.base_data()
            self._unigram = (UnigramReference("unknown corpus", None, "the plan's base config does not resolve here")
                             if data is None else unigram_reference(data))
        return self._unigram

    def collapsed_above(self) -> float | None:
        """The final val loss above which a search run counts as collapsed (the unigram loss less
        ``collapse_margin``), or None with no ``collapse_margin``. Raises :class:`ConfigError` when the corpus
        has no unigram loss here, so a sweep fails at its start and a report before it ranks anything."""
        if self.collapse_margin is None:
            return None
        ref = self.unigram_reference()
        if ref.loss is None:
            raise ConfigError(f"plan.protocol.collapse_margin={self.collapse_margin!r} needs the byte-unigram loss "
                              f"of the corpus ({ref.corpus}), and it has none here: {ref.reason}; allowed: a "
                              "byte-level text corpus that can be read, or no collapse_margin")
        return ref.loss - self.collapse_margin

    # ------------------------------------------------------------------ cells and runs
    def cells(self) -> list[Cell]:
        return [Cell(p.name, d, f) for p in self.placements for d in self.depths for f in self.ffn
                if (p.ffn is None or f in p.ffn) and d in self.ffn_depths.get(f, self.depths)]

    def search_cell(self, cell: Cell) -> Cell:
        """The cell whose LR search decides ``cell``'s best LR (itself, under ``full``, at a search depth, or
        when its FFN kind runs at no search depth)."""
        runs_at = self.ffn_depths.get(cell.ffn, self.depths)
        depths = [d for d in (self.search_depths or self.depths) if d in runs_at]
        if self.protocol == "full" or cell.depth in depths or not depths:
            return cell
        nearest = min(depths, key=lambda d: (abs(d - cell.depth), -d))
        return Cell(cell.placement, nearest, cell.ffn)

    def grid_lrs(self, cell: Cell) -> list[float]:
        """The LR grid of ``cell``'s variant: its own ``lrs``, else ``grid.lrs``."""
        own = self.variant(cell.placement).lrs
        return list(own) if own is not None else list(self.lrs)

    def search_state(self, cell: Cell, results: Mapping[str, Mapping[str, Any]] | None = None) -> SearchState:
        """Where the LR search that decides ``cell``'s best LR stands, given ``results`` (``run_id ->
        record``): the LRs it asks for so far (bracketing extensions included) and, once every one of its
        runs has finished and no extension is due, the best LR."""
        results = results or {}
        seeds = self.seeds if self.protocol == "full" else self.search_seeds
        stage = "grid" if self.protocol == "full" else "search"
        search = self.search_cell(cell)

        def records_at(lr: float) -> list:
            return [results.get(self.run_spec(search, lr, s, stage).run_id) for s in seeds]

        return bracket_search(self.grid_lrs(search), records_at, self.max_extensions, self.bracket_factor,
                              self.collapsed_above())

    def search_specs(self, cell: Cell, results: Mapping[str, Mapping[str, Any]] | None = None) -> list[RunSpec]:
        """The runs of the LR search that decides ``cell``'s best LR, as far as ``results`` have extended it."""
        seeds = self.seeds if self.protocol == "full" else self.search_seeds
        stage = "grid" if self.protocol == "full" else "search"
        search = self.search_cell(cell)
        return [self.run_spec(search, lr, s, stage) for lr in self.search_state(cell, results).lrs for s in seeds]

    def best_lr(self, cell: Cell, results: Mapping[str, Mapping[str, Any]]) -> float | None:
        """``cell``'s best LR from its search runs' records, or None while any of them is unfinished (or while
        an extension of the search is still to run)."""
        return self.search_state(cell, results).best

    def variant(self, name: str) -> PlacementVariant:
        return next(p for p in self.placements if p.name == name)

    def start_rank(self, spec: RunSpec) -> tuple[int, ...]:
        """Where ``spec`` comes in the order runs are started, before its stage: () under ``order: stage``;
        under ``order: depth`` its depth's rank (shallowest first), then its FFN kind's rank in ``grid.ffn``."""
        if self.start_order == "stage":
            return ()
        return sorted(self.depths).index(spec.cell.depth), list(self.ffn).index(spec.cell.ffn)

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
            *variant.overrides_at(cell.depth),
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
            if self.protocol == "full" or self.search_cell(cell) == cell:
                for spec in self.search_specs(cell, results):
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
    lrs: list[float] | None = None
    """The variant's own LR grid (None: ``grid.lrs``)."""
    overrides_by_depth: dict[int, list[str]] | None = None
    """Overrides per depth, applied after ``overrides``; when given, it names every grid depth."""

    @classmethod
    def prepare_mapping(cls, data: Any, path: str) -> Any:
        """Refuse version 1's ``span_clean`` with what it is now (see :func:`spannorm.config.refused_v1_spelling`)."""
        if isinstance(data, dict):
            refused_v1_spelling({"placement": data.get("placement")}, path)
        return data

    def validate(self, prefix: str) -> None:
        if not self.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            fail(f"{prefix}.name", self.name, "use letters, digits, _ - .")
        _check_overrides(f"{prefix}.overrides", self.overrides)
        if self.ffn is not None and not self.ffn:
            fail(f"{prefix}.ffn", self.ffn, "a non-empty list of grid.ffn names")
        if self.lrs is not None:
            _check_distinct(f"{prefix}.lrs", self.lrs)
            if any(not lr > 0 for lr in self.lrs):
                fail(f"{prefix}.lrs", self.lrs, "learning rates must be positive")
        for depth, overrides in (self.overrides_by_depth or {}).items():
            _check_overrides(f"{prefix}.overrides_by_depth[{depth}]", overrides)


@dataclass
class PlanGrid:
    """``grid``: the placements, depths, FFN kinds, learning rates and seeds a study crosses."""

    placements: list[Any]
    """Placement names, or mappings :class:`PlanVariantEntry`."""
    depths: list[int]
    ffn: dict[str, list[str]] = field(default_factory=lambda: {"dense": []})
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    seeds: list[int] = field(default_factory=lambda: [0])
    ffn_depths: dict[str, list[int]] = field(default_factory=dict)
    """An FFN kind named here runs at these depths only (e.g. ``{moe: [48]}``)."""

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
        for name, depths in self.ffn_depths.items():
            if name not in self.ffn:
                fail(f"{prefix}.ffn_depths", name, f"allowed: a name of {prefix}.ffn ({', '.join(self.ffn)})")
            _check_distinct(f"{prefix}.ffn_depths.{name}", depths)
            if not set(depths) <= set(self.depths):
                fail(f"{prefix}.ffn_depths.{name}", depths, f"must be among {prefix}.depths")


@dataclass
class PlanBracket:
    """``protocol.bracket``: extend an LR search whose best LR is at an edge of its grid."""

    max_extensions: int = 2
    """At most this many LRs added to one cell's search, in all."""
    factor: float | None = None
    """The step beyond an edge (> 1); None continues the grid's own pattern."""

    def validate(self, prefix: str = "plan.protocol.bracket") -> None:
        if self.max_extensions < 0:
            fail(f"{prefix}.max_extensions", self.max_extensions, "must be >= 0")
        if self.factor is not None and not self.factor > 1:
            fail(f"{prefix}.factor", self.factor, "must be > 1, or null for the grid's own step")


Which = Literal["best", "shared"]
PreregisteredTest = Literal["welch"]


@dataclass
class Preregistered:
    """``protocol.preregistered``: one comparison fixed before any run: placement ``a`` against ``b`` at one
    depth and FFN kind, each at its best LR (``which: best``) or both at the shared LR, by ``test`` at
    level ``alpha`` (two-sided)."""

    a: str
    b: str
    depth: int
    ffn: str = "dense"
    which: Which = "best"
    test: PreregisteredTest = "welch"
    alpha: float = 0.05
    hypothesis: str = ""
    """The claim in words, as stated before the runs (shown in the report)."""

    def validate(self, prefix: str = "plan.protocol.preregistered") -> None:
        if not 0 < self.alpha < 1:
            fail(f"{prefix}.alpha", self.alpha, "must be between 0 and 1")
        if self.a == self.b:
            fail(f"{prefix}.b", self.b, "must differ from a")

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "depth": self.depth, "ffn": self.ffn, "which": self.which,
                "test": self.test, "alpha": self.alpha, "hypothesis": self.hypothesis}


@dataclass
class PlanProtocol:
    """``protocol``: which runs the grid asks for (see the module docstring)."""

    kind: Protocol = "full"
    search_seeds: list[int] | None = None
    """lr_search: the seeds the LR grid runs on (None: the first of grid.seeds)."""
    search_depths: list[int] | None = None
    shared_lr: float | None = None
    shared_runs: bool = True
    bracket: PlanBracket | None = None
    order: StartOrder = "stage"
    preregistered: Preregistered | None = None
    collapse_margin: float | None = None
    """A search run within this many nats of the byte-unigram loss ranks like a diverged run (None: off)."""

    def validate(self, prefix: str = "plan.protocol") -> None:
        for name in ("search_seeds", "search_depths"):
            if getattr(self, name) is not None:
                _check_distinct(f"{prefix}.{name}", getattr(self, name))
        if self.collapse_margin is not None and not self.collapse_margin > 0:
            fail(f"{prefix}.collapse_margin", self.collapse_margin,
                 "must be > 0 (nats below the byte-unigram loss), or null for off")


@dataclass
class PlanFile:
    """A plan file as written: the sections of the module docstring."""

    grid: PlanGrid
    placement_names: int = PLACEMENT_NAMES
    """The version of the placement names the plan is written in (:data:`spannorm.config.PLACEMENT_NAMES`): 1
    reads its placements and overrides with version 1's names (``span`` is today's ``span_post``,
    ``span_clean`` today's ``span``); the display names of ``grid.placements`` (and so run ids) stay as written."""
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
    by_depth = tuple((depth, tuple(overrides)) for depth, overrides in (entry.overrides_by_depth or {}).items())
    return PlacementVariant(entry.name, entry.placement, tuple(entry.overrides),
                            None if entry.ffn is None else tuple(entry.ffn),
                            None if entry.lrs is None else tuple(entry.lrs), by_depth)


def _check_variant_depths(variant: PlacementVariant, depths: list[int], given: bool) -> None:
    """``overrides_by_depth``, when given, names exactly the grid's depths (a depth left out would run the
    variant without its depth's setting, a depth the grid lacks is a typo)."""
    if not given:
        return
    path = f"plan.grid.placements[{variant.name}].overrides_by_depth"
    named = [d for d, _ in variant.overrides_by_depth]
    missing = [d for d in depths if d not in named]
    extra = [d for d in named if d not in depths]
    if missing or extra:
        what = f"lacks depth {missing[0]}" if missing else f"names depth {extra[0]}, not in grid.depths"
        raise ConfigError(f"{path} {what}; allowed: one list of overrides for each of grid.depths "
                          f"{', '.join(map(str, depths))}")


def _check_preregistered(pre: Preregistered, variants: list[PlacementVariant], grid: PlanGrid) -> None:
    path = "plan.protocol.preregistered"
    names = [v.name for v in variants]
    for side in ("a", "b"):
        name = getattr(pre, side)
        if name not in names:
            fail(f"{path}.{side}", name, f"allowed: a name of grid.placements ({', '.join(names)})")
    if pre.depth not in grid.depths:
        fail(f"{path}.depth", pre.depth, f"allowed: one of grid.depths ({', '.join(map(str, grid.depths))})")
    if pre.ffn not in grid.ffn:
        fail(f"{path}.ffn", pre.ffn, f"allowed: one of grid.ffn ({', '.join(grid.ffn)})")
    if pre.depth not in grid.ffn_depths.get(pre.ffn, grid.depths):
        fail(f"{path}.depth", pre.depth, f"grid.ffn_depths runs {pre.ffn} at depths "
             f"{', '.join(map(str, grid.ffn_depths[pre.ffn]))} only")
    for side in ("a", "b"):
        variant = next(v for v in variants if v.name == getattr(pre, side))
        if variant.ffn is not None and pre.ffn not in variant.ffn:
            fail(f"{path}.ffn", pre.ffn, f"{variant.name} runs with {', '.join(variant.ffn)} only")


def _check_collapse_corpus(plan: StudyPlan) -> None:
    """``collapse_margin`` needs the byte-unigram loss: refuse, when the plan is read, a base whose data have
    none (another tokenizer, a prepared token folder). Reading the corpus waits for the first ranking (the
    sweep's start), where :meth:`StudyPlan.collapsed_above` refuses a corpus that cannot be read."""
    data = plan.base_data()
    if data is None:
        reason = "the plan's base config does not resolve"
    elif data.tokenizer != "byte":
        reason = f"tokenizer {data.tokenizer!r}: the byte-unigram loss needs the byte tokenizer"
    elif prepared_folder(data) is not None:
        reason = "a prepared token folder: its text is not read here"
    else:
        return
    raise ConfigError(f"plan.protocol.collapse_margin={plan.collapse_margin!r} needs the byte-unigram loss of "
                      f"the corpus, and it has none ({reason}); allowed: a byte-level text corpus, or no "
                      "collapse_margin")


def _upgrade_plan(data: dict[str, Any]) -> dict[str, Any]:
    """A plan dict written with version 1's placement names, with its placements and overrides in version 2's
    (the display names of ``grid.placements`` stay as written). Parts of odd shapes are left for validation."""
    def overrides(value: Any) -> Any:
        return [upgrade_override(o) if isinstance(o, str) else o for o in value] if isinstance(value, list) \
            else value

    def variant(item: Any) -> Any:
        if isinstance(item, str):
            return {"name": item, "placement": upgrade_placement_name(item)}
        if not isinstance(item, dict):
            return item
        item = {**item, "overrides": overrides(item.get("overrides", []))}
        if "placement" in item:
            item["placement"] = upgrade_placement_name(item["placement"])
        if isinstance(item.get("overrides_by_depth"), dict):
            item["overrides_by_depth"] = {d: overrides(o) for d, o in item["overrides_by_depth"].items()}
        return item

    data = dict(data)
    base = data.get("base")
    if isinstance(base, dict):
        base = {**base, "overrides": overrides(base.get("overrides", []))}
        config = base.get("config")
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            model = upgrade_model_mapping(config["model"])
            model.pop("placement_names", None)  # the plan's top-level key says it (and the grid owns it)
            base["config"] = {**config, "model": model}
        data["base"] = base
    grid = data.get("grid")
    if isinstance(grid, dict):
        grid = dict(grid)
        if isinstance(grid.get("placements"), list):
            grid["placements"] = [variant(item) for item in grid["placements"]]
        if isinstance(grid.get("ffn"), dict):
            grid["ffn"] = {name: overrides(o) for name, o in grid["ffn"].items()}
        data["grid"] = grid
    return data


def parse_plan(data: Any, source: str = "plan", placement_names: int = PLACEMENT_NAMES) -> StudyPlan:
    """Validate a plan dict (see the module docstring) and build a :class:`StudyPlan`. ``placement_names`` is
    the version of the names of a plan that does not say (a plan text stored before the key existed: 1)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with keys name, base, grid, protocol, measure")
    names = data.get("placement_names", placement_names)
    if names not in (1, PLACEMENT_NAMES) or isinstance(names, bool):
        fail("plan.placement_names", names, f"allowed: 1 (version 1's names) or {PLACEMENT_NAMES} (today's)")
    if names == 1:
        data = _upgrade_plan(data)
    plan = build(PlanFile, {**data, "placement_names": names}, "plan")
    grid, protocol = plan.grid, plan.protocol
    variants = [_variant(item, i) for i, item in enumerate(grid.placements)]
    if not variants or len({v.name for v in variants}) != len(variants):
        fail("plan.grid.placements", [v.name for v in variants], "must be a non-empty list of distinct names")
    for item, variant in zip(grid.placements, variants):
        _check_variant_depths(variant, grid.depths, isinstance(item, dict) and item.get("overrides_by_depth")
                              is not None)
    bracket = protocol.bracket
    if bracket is not None and bracket.max_extensions > 0:
        short = next((v.name for v in variants if len(v.lrs if v.lrs is not None else grid.lrs) < 2), None)
        if short is not None:
            raise ConfigError(f"plan.protocol.bracket needs an LR grid of two or more LRs to extend, and "
                              f"{short!r} has one; allowed: more grid.lrs (or the variant's lrs), or no bracket")
    if protocol.preregistered is not None:
        _check_preregistered(protocol.preregistered, variants, grid)
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
                     ffn_depths=dict(grid.ffn_depths),
                     preset=plan.base.preset, base_overrides=base_overrides, protocol=protocol.kind,
                     search_seeds=search_seeds, search_depths=protocol.search_depths,
                     shared_lr=protocol.shared_lr, shared_runs=protocol.shared_runs, measure=plan.measure,
                     description=plan.description or "",
                     max_extensions=0 if bracket is None else bracket.max_extensions,
                     bracket_factor=None if bracket is None else bracket.factor, start_order=protocol.order,
                     preregistered=protocol.preregistered, collapse_margin=protocol.collapse_margin,
                     placement_names=names)
    check_plan(study, source)  # no grid-owned key set outside the grid, no two runs under one id
    if study.collapse_margin is not None:
        _check_collapse_corpus(study)
    return study


def load_plan(path: str | Path, placement_names: int = PLACEMENT_NAMES) -> StudyPlan:
    """Read and validate a plan YAML file (``placement_names``: see :func:`parse_plan`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plan file {str(path)!r} does not exist")
    return parse_plan_text(path.read_text(), f"plan file {str(path)!r}", placement_names)


def parse_plan_text(text: str, source: str, placement_names: int = PLACEMENT_NAMES) -> StudyPlan:
    """Parse and validate a plan's YAML text; errors start with ``source`` (where the text came from).
    ``placement_names``: the version of the names of a plan that does not say (see :func:`parse_plan`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ConfigError(f"{source} is not valid YAML: {first}") from None
    try:
        return parse_plan(data, source, placement_names)
    except ConfigError as err:
        if str(err).startswith(source):
            raise
        raise ConfigError(f"{source}: {err}") from None

__all__ = ["FINISHED", "PROTOCOLS", "Cell", "MeasureOptions", "PlacementVariant", "Preregistered", "RunSpec",
           "StudyPlan", "format_lr", "load_plan", "parse_plan", "parse_plan_text", "rank_key",
           "select_best_lr", "stored_overrides"]
"""``FINISHED``, ``rank_key`` and ``select_best_lr`` live in :mod:`~spannorm.experiments.lr_search`; they are
re-exported here, where the sweep and the report have always imported them."""
