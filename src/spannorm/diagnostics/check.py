"""``spannorm check``: screen a block design for stability before expensive training (SPEC §6, after Kan et
al.).

For each target (a placement, or a user's block factory ``package.module:factory``) and each depth, it

1. builds the model (placements with the library's default config plus any overrides, user blocks inside
   :class:`~spannorm.diagnostics.custom.CustomBlockLM`) and measures it at init on a fixed validation batch of
   the embedded corpus (byte-level), beside the theory's prediction for that batch;
2. trains it for K steps (:func:`short_training`) and measures it again on the same batch;
3. turns all of it into verdicts (:mod:`spannorm.diagnostics.verdicts`).

What one depth yields (:class:`~spannorm.diagnostics.check_results.DepthResult`, with its
:class:`~spannorm.diagnostics.check_results.TrainingTrace`) lives in
:mod:`spannorm.diagnostics.check_results`, below both this orchestrator and the verdicts that read it.

Every target trains through the same short loop, so that a user's block and the built-in placements are
treated identically: :func:`short_training` is the one place ``check`` trains. It uses the training stack's
optimizer settings (:class:`~spannorm.train.config.OptimConfig`: AdamW, β = (0.9, 0.95), weight decay on
matrices, linear warmup, clipping), its learning-rate schedule, its window sampler and its spike score; it
cannot use :func:`spannorm.launch.train` itself, which builds models only from a ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from spannorm.config import PLACEMENTS, ConfigError, ModelConfig
from spannorm.configuration import check_fields, fail
from spannorm.data.corpus import embedded_corpus
from spannorm.data.dataset import WindowSampler, eval_batches, split_point
from spannorm.diagnostics.check_results import DepthResult, TrainingTrace
from spannorm.diagnostics.custom import BlockFactory, BlockFactoryError, CustomBlockLM, load_block_factory
from spannorm.diagnostics.measure import measure
from spannorm.diagnostics.verdicts import Verdict, judge, worst
from spannorm.model import DecoderLM
from spannorm.theory.criterion import suggest_scaling
from spannorm.theory.meanfield import predict_init
from spannorm.train.callbacks import SpikeScore
from spannorm.train.config import OptimConfig
from spannorm.train.optimizer import build_optimizer
from spannorm.train.schedule import lr_for
from spannorm.train.trainer import training_objective


class CheckError(ConfigError):
    """Bad input to ``check`` (a target or a setting): one line naming what is wrong and what is allowed."""


@dataclass
class CheckSettings:
    """Everything ``check`` needs besides the targets. Defaults are the CLI's. Build it from a mapping with
    :func:`spannorm.configuration.build`, or directly; :meth:`validate` checks it either way."""

    depths: list[int] = field(default_factory=lambda: [4, 16, 64])
    steps: int = 50
    """K: training steps after the init measurement (0: init only)."""
    d_model: int = 64
    n_heads: int = 4
    seq_len: int = 64
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int | None = None
    """Linear warmup steps. None: a tenth of ``steps`` (at least 1)."""
    clip: float = 1.0
    """Gradient-norm clip threshold (0: no clipping; the fraction above it is still reported)."""
    weight_decay: float = 0.1
    seed: int = 0
    band: float = 4.0
    """Forward growth, gradient ratio and identity-path product are judged against [1/band, band]."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields applied to placement targets (e.g. {"scale_out_proj": False})."""
    device: Literal["cpu", "cuda"] = "cpu"
    suggest: bool = True
    """Run the stability criterion (a Δt or α suggestion) for placement targets."""

    def validate(self) -> None:
        check_fields(self)  # device among cpu, cuda; every float finite
        if not self.depths or any(not isinstance(L, int) or L < 1 for L in self.depths):
            fail("depths", self.depths, "give positive integers, e.g. 4,16,64")
        if self.steps < 0:
            fail("steps", self.steps, "must be >= 0")
        for name in ("d_model", "n_heads", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                fail(name, getattr(self, name), "must be >= 1")
        if self.seq_len < 2:
            fail("seq_len", self.seq_len, "must be >= 2")
        if not self.lr > 0:
            fail("lr", self.lr, "must be a positive number")
        for name in ("clip", "weight_decay"):
            if getattr(self, name) < 0:
                fail(name, getattr(self, name), "must be >= 0")
        if not self.band > 1:
            fail("band", self.band, "must be > 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            fail("warmup_steps", self.warmup_steps, "must be >= 0")
        if self.device == "cuda" and not torch.cuda.is_available():
            fail("device", self.device, "allowed: cpu (no CUDA device here)")
        self.depths = sorted(set(self.depths))

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    def optim_config(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, schedule="constant", warmup_steps=self.warmup,
                           weight_decay=self.weight_decay, grad_clip=self.clip)


# ------------------------------------------------------------------------------------------------ targets
@dataclass
class Target:
    """What ``check`` examines: a placement or a user's block factory."""

    name: str
    placement: str | None = None
    factory: BlockFactory | None = None

    @property
    def kind(self) -> str:
        return "placement" if self.placement is not None else "custom"

    def model_config(self, settings: CheckSettings, n_layers: int) -> ModelConfig | None:
        if self.placement is None:
            return None
        base = dict(d_model=settings.d_model, n_heads=settings.n_heads, context_length=settings.seq_len,
                    vocab_size=256, placement=self.placement)
        return ModelConfig.from_dict({**base, **settings.model_overrides, "n_layers": n_layers})

    def build(self, settings: CheckSettings, n_layers: int) -> nn.Module:
        torch.manual_seed(settings.seed)
        cfg = self.model_config(settings, n_layers)
        if cfg is not None:
            return DecoderLM(cfg)
        assert self.factory is not None
        return CustomBlockLM(self.factory, n_layers=n_layers, d_model=settings.d_model, n_heads=settings.n_heads)


def resolve_targets(names: list[str], settings: CheckSettings) -> list[Target]:
    """Placement names (or ``all``) and ``package.module:factory`` specs, validated before anything runs:
    configs are built, factories imported and their blocks' shapes checked."""
    targets: list[Target] = []
    for name in names:
        if name == "all":
            targets += [Target(p, placement=p) for p in PLACEMENTS]
        elif name in PLACEMENTS:
            targets.append(Target(name, placement=name))
        elif ":" in name:
            try:
                targets.append(Target(name, factory=load_block_factory(name)))
            except BlockFactoryError as err:
                raise CheckError(str(err)) from None
        else:
            raise CheckError(f"target {name!r} is neither a placement (allowed: {', '.join(PLACEMENTS)}, all) "
                             "nor a block factory package.module:factory")
    if not targets:
        raise CheckError("no target given: name a placement, all, or package.module:factory")
    for target in targets:
        if target.placement is not None:
            for L in settings.depths:
                target.model_config(settings, L)  # raises ConfigError naming the field
        else:
            if settings.model_overrides:
                raise CheckError(f"model overrides ({', '.join(settings.model_overrides)}) apply to placements, "
                                 f"not to the user block {target.name!r}")
            try:
                model = target.build(settings, min(settings.depths))
                assert isinstance(model, CustomBlockLM)  # a target without a placement is a user block
                model.check_shapes(min(settings.seq_len, 8))
            except BlockFactoryError as err:
                raise CheckError(f"{target.name}: {err}") from None
    return targets


# ------------------------------------------------------------------------------------------------ data
class CorpusBatches:
    """Byte-level windows of the embedded corpus, split as the trainer splits it (the last 10% is
    validation): seeded random training batches, and one fixed validation batch for every measurement."""

    def __init__(self, seq_len: int, batch_size: int):
        corpus = embedded_corpus()
        tokens = np.frombuffer(corpus, dtype=np.uint8)
        cut = split_point(corpus, 0.1)
        self.train, self.val = tokens[:cut], tokens[cut:]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch = next(eval_batches(self.val, seq_len, batch_size, max_batches=1))

    def sampler(self, seed: int) -> WindowSampler:
        return WindowSampler(self.train, self.seq_len, self.batch_size, seed)


# ------------------------------------------------------------------------------------------------ training
def short_training(model: nn.Module, sampler: WindowSampler, steps: int, optim: OptimConfig,
                   device: torch.device | str = "cpu") -> TrainingTrace:
    """Train ``model`` for ``steps`` AdamW steps on ``sampler``'s batches, in fp32, with ``optim``'s schedule
    and clipping. Stops at the first non-finite loss or gradient norm, before the optimizer step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, optim)
    moe_cfg = model.cfg.moe if isinstance(model, DecoderLM) else None
    trace = TrainingTrace(clip=optim.grad_clip)
    loss_spikes, grad_spikes = SpikeScore(), SpikeScore()
    max_norm = optim.grad_clip if optim.grad_clip > 0 else math.inf
    for step in range(steps):
        lr = lr_for(optim, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sampler.next_batch()
        out = model(inputs.to(device), targets.to(device))
        loss = out.loss.item()
        if not math.isfinite(loss):
            trace.diverged, trace.diverged_step = True, step + 1
            break
        optimizer.zero_grad(set_to_none=True)
        training_objective(out, moe_cfg).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            trace.diverged, trace.diverged_step = True, step + 1
            break
        optimizer.step()
        trace.losses.append(loss)
        trace.grad_norms.append(grad_norm)
        trace.lrs.append(lr)
        trace.loss_spikes += loss_spikes.update(loss)[1]
        trace.grad_spikes += grad_spikes.update(grad_norm)[1]
    optimizer.zero_grad(set_to_none=True)
    return trace


# ------------------------------------------------------------------------------------------------ running
@dataclass
class TargetResult:
    target: str
    kind: str
    depths: list[DepthResult]
    verdicts: list[Verdict]

    @property
    def overall(self) -> str:
        return worst(v.status for v in self.verdicts)


@dataclass
class CheckRun:
    settings: CheckSettings
    results: list[TargetResult]

    @property
    def overall(self) -> str:
        return worst(r.overall for r in self.results)


def check_depth(target: Target, n_layers: int, settings: CheckSettings, data: CorpusBatches,
                log: Callable[[str], None] = lambda _: None) -> DepthResult:
    """Measure ``target`` at one depth: init, prediction, suggestion, K steps, trained."""
    device = torch.device(settings.device)
    model = target.build(settings, n_layers).to(device)
    cfg = target.model_config(settings, n_layers)
    idx, tgt = (t.to(device) for t in data.eval_batch)
    log(f"{target.name} L={n_layers}: measuring at init")
    result = DepthResult(n_layers, init=measure(model, idx, tgt),
                         model_config=cfg.to_dict() if cfg is not None else None)
    if cfg is not None:
        result.prediction = predict_init(cfg, data.eval_batch[0], targets=data.eval_batch[1])
        if settings.suggest:
            result.suggestion = suggest_scaling(cfg, band=settings.band, seq_len=settings.seq_len)
    if settings.steps:
        log(f"{target.name} L={n_layers}: training {settings.steps} steps")
        result.training = short_training(model, data.sampler(settings.seed), settings.steps,
                                         settings.optim_config(), device)
        result.trained = measure(model, idx, tgt)
    return result


def run_check(target_names: list[str], settings: CheckSettings,
              log: Callable[[str], None] = lambda _: None) -> CheckRun:
    """Validate the targets and settings, then check every target at every depth. Raises
    :class:`CheckError` or :class:`~spannorm.config.ConfigError` on bad input before any work."""
    settings.validate()
    targets = resolve_targets(target_names, settings)
    data = CorpusBatches(settings.seq_len, settings.batch_size)
    results = []
    for target in targets:
        depths = [check_depth(target, L, settings, data, log) for L in settings.depths]
        results.append(TargetResult(target.name, target.kind, depths, judge(depths, settings.band)))
    return CheckRun(dataclasses.replace(settings), results)
