"""The training loop: AdamW, warmup + cosine/WSD, clipping, accumulation, bf16 autocast, evaluation,
checkpoints, exact resume, non-finite detection before the optimizer step, and the spike score of SPEC §6.

``train(cfg, out_dir)`` writes into ``out_dir``:

- ``config.yaml``: the resolved :class:`~spannorm.train.config.RunConfig`;
- ``metrics.jsonl``: one JSON object per optimizer step (``step``, ``train_loss``, ``lr``, ``grad_norm``,
  ``tokens``, ``tokens_per_s``, spike scores, MoE losses and per-expert load, and ``val_loss``/``val_ppl``/
  ``val_bpb`` on evaluation steps);
- ``tensorboard/``: TensorBoard event files;
- ``checkpoints/``: see :mod:`spannorm.train.checkpoint`;
- ``summary.json``: the :class:`RunSummary`.

Only rank 0 writes or displays anything. Under torchrun the same loop runs in every process, with DDP or FSDP2
behind the hooks of :mod:`spannorm.train.distributed`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from spannorm.config import ConfigError
from spannorm.data.dataset import TokenSplits, WindowSampler, check_long_enough, load_splits
from spannorm.data.tokenizer import HFTokenizer, Tokenizer
from spannorm.model.transformer import SpanNormLM
from spannorm.train import checkpoint as ckpt_io
from spannorm.train.config import RunConfig
from spannorm.train.distributed import SingleProcess
from spannorm.train.evaluation import EvalResult, autocast_context, evaluate
from spannorm.train.progress import Progress
from spannorm.train.schedule import lr_for

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
TENSORBOARD_DIR = "tensorboard"
VAL_REGRESSION_NATS = 0.1
"""A validation loss this far (nats) above the run's best so far gets a warning line: a run can fall back
toward the unigram loss with finite losses and no spike (SpanNorm at a too-high LR does), which neither
the non-finite check nor the spike score flags."""
RUN_OUTPUTS = (CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, TENSORBOARD_DIR, ckpt_io.CHECKPOINTS_DIR,
               ckpt_io.TOKENIZER_NAME)
"""Everything ``train`` writes into a run folder (and ``overwrite=True`` removes)."""


@dataclass
class RunSummary:
    """The outcome of a run, also written to ``summary.json``."""

    final_val_loss: float | None
    best_val_loss: float | None
    diverged: bool
    diverged_step: int | None
    steps: int
    """Optimizer steps completed (over all resumes)."""
    tokens: int
    """Training tokens processed (over all resumes)."""
    wall_s: float
    """Wall time of the whole run (over all resumes), evaluation and checkpoints included."""
    tokens_per_s: float
    """Training tokens per second of time spent in training steps (evaluation and checkpoints excluded)."""
    status: str = "completed"
    """``completed``, ``interrupted`` (stopped early, resumable) or ``diverged``."""
    final_train_loss: float | None = None
    final_val_bpb: float | None = None
    final_val_ppl: float | None = None
    message: str = ""
    checkpoint: str | None = None
    """The newest checkpoint folder, relative to the run folder."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Divergence(Exception):
    """A non-finite loss or gradient norm; raised inside the loop, turned into a diverged summary."""


class SpikeScore:
    """SPEC §6 spike score of a scalar series: z = (v - mean) / std over the previous ``window`` values;
    a spike is v > mean + sigmas·std. Needs at least 8 previous values."""

    MIN_HISTORY = 8

    def __init__(self, window: int = 128, sigmas: float = 6.0):
        self.history: collections.deque[float] = collections.deque(maxlen=window)
        self.sigmas = sigmas

    def update(self, value: float) -> tuple[float | None, bool]:
        z, spike = None, False
        if len(self.history) >= self.MIN_HISTORY:
            n = len(self.history)
            mean = math.fsum(self.history) / n
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in self.history) / n)
            z = (value - mean) / std if std > 0 else (0.0 if value == mean else math.copysign(math.inf, value - mean))
            spike = value > mean + self.sigmas * std
        self.history.append(value)
        return z, spike


def _is_existing_run(out_dir: Path) -> bool:
    return any((out_dir / name).exists() for name in (CONFIG_NAME, SUMMARY_NAME, METRICS_NAME)) or bool(
        ckpt_io.list_checkpoints(out_dir))


def _describe_run(out_dir: Path) -> str:
    summary = out_dir / SUMMARY_NAME
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
            return f"a {data.get('status', 'finished')} run of {data.get('steps', '?')} steps"
        except (OSError, ValueError):
            pass
    return "an unfinished run"


def _first_difference(a: dict[str, Any], b: dict[str, Any], prefix: str) -> tuple[str, Any, Any] | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, f"{prefix}.{key}")
            if found:
                return found
        elif va != vb:
            return f"{prefix}.{key}", va, vb
    return None


def _normalize_model_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A model config dict after a JSON round trip (placement_overrides keys become strings)."""
    from spannorm.config import ModelConfig

    return ModelConfig.from_dict(json.loads(json.dumps(data))).to_dict()


def _changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for section in ("data", "optim", "train"):
        for key in sorted(set(old.get(section, {})) | set(new.get(section, {}))):
            va, vb = old.get(section, {}).get(key), new.get(section, {}).get(key)
            if va != vb:
                changes.append(f"{section}.{key} {va!r} -> {vb!r}")
    return changes


def training_objective(out, moe_cfg) -> torch.Tensor:
    """The loss that is backpropagated: cross-entropy plus, for MoE models, the balance loss and router
    z-loss weighted by ``model.moe.balance_coef`` and ``model.moe.z_loss_coef``."""
    if moe_cfg is None or out.balance_loss is None:
        return out.loss
    return out.loss + moe_cfg.balance_coef * out.balance_loss + moe_cfg.z_loss_coef * out.z_loss


class Trainer:
    """One training run. Build with the resolved config and the run folder, then call :meth:`run`.

    Everything that can be wrong with the user's input is checked in the constructor, before anything is
    written into ``out_dir``; it raises :class:`ConfigError`."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 callbacks: Iterable[Any] = (), parallel: SingleProcess | None = None, use_intact: bool = False):
        cfg.validate()
        self.out_dir = Path(out_dir)
        self.parallel = parallel if parallel is not None else SingleProcess()
        self.rank, self.world_size = self.parallel.rank, self.parallel.world_size
        self.is_main = self.rank == 0
        self.callbacks = list(callbacks)
        if cfg.train.diagnostics_every:
            from spannorm.diagnostics.callback import DiagnosticsCallback

            self.callbacks.append(DiagnosticsCallback(cfg.train.diagnostics_every))
        self.resume = resume
        self.tb = None
        self._stop_reason: str | None = None

        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"out_dir={str(self.out_dir)!r} is invalid: it is a file; name a folder")
        existing = self.out_dir.is_dir() and _is_existing_run(self.out_dir)
        if existing and not resume and not overwrite:
            raise ConfigError(f"out_dir={str(self.out_dir)!r} already holds {_describe_run(self.out_dir)}; "
                              "allowed: --resume to continue it, --overwrite to replace it, or another --out")
        self.resume_from = ckpt_io.resume_checkpoint(self.out_dir, use_intact=use_intact) if (resume and existing) \
            else None  # a damaged latest checkpoint: refused, or with use_intact the newest intact one
        self.overwrite = overwrite and not resume

        if cfg.data.path is not None:  # config.yaml records where the text is, from any working folder
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, path=str(Path(cfg.data.path).expanduser().resolve())))
        # Data and tokenizer (may fill the shared token cache, never the run folder).
        self.tokenizer: Tokenizer
        self.splits: TokenSplits
        self.tokenizer, self.splits = load_splits(cfg.data)
        check_long_enough(self.splits, cfg.model.context_length)
        if cfg.train.init_from is not None:  # the checkpoint fixes vocab_size; the tokenizer must fit in it
            if self.resume_from is None:
                from spannorm.interop.init_from import check_init_target

                check_init_target(cfg.train.init_from, cfg.model, tokenizer_vocab_size=self.tokenizer.vocab_size)
        elif cfg.model.vocab_size != self.tokenizer.vocab_size:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                     vocab_size=self.tokenizer.vocab_size))
        self.cfg = cfg

        self.resumed_state: dict[str, Any] | None = None
        if self.resume_from is not None:
            saved = ckpt_io.read_json(self.resume_from / ckpt_io.RUN_CONFIG_NAME)
            diff = _first_difference(_normalize_model_dict(saved["model"]), cfg.model.to_dict(), "model")
            if diff:
                name, was, now = diff
                raise ConfigError(f"cannot resume {str(self.resume_from)!r}: it was trained with {name}={was!r} "
                                  f"but the config asks for {now!r}; allowed: the checkpoint's architecture "
                                  "(drop the model overrides) or a new --out")
            self.saved_run_config = saved
        self.device = self.parallel.place(self._resolve_device(cfg.train.device))

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _resolve_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' is invalid: no CUDA device is available; allowed: auto, cpu")
        return torch.device(name)

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        if cfg.train.init_from is not None and self.resume_from is None:
            from spannorm.interop.init_from import init_model_from

            self.model = init_model_from(cfg.train.init_from, cfg.model).to(self.device)
        else:
            self.model = SpanNormLM(cfg.model).to(self.device)
        self.model.train()
        self.forward_model = self.parallel.wrap_model(self.model, compile=cfg.train.compile)
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                           eps=cfg.optim.eps, **extra)
        self.sampler = self.parallel.train_sampler(self.splits.train, cfg.model.context_length,
                                                   cfg.train.batch_size, cfg.train.seed)
        self.loss_spikes = SpikeScore(cfg.train.spike_window, cfg.train.spike_sigmas)
        self.grad_spikes = SpikeScore(cfg.train.spike_window, cfg.train.spike_sigmas)
        self.step = 0
        self.tokens = 0
        self.train_time_s = 0.0
        self.wall_before_s = 0.0
        self.best_val_loss: float | None = None
        self.last_eval: dict[str, float] | None = None
        self.last_train_loss: float | None = None
        self.last_checkpoint: Path | None = None

    def _restore(self, ckpt: Path) -> None:
        state = self.parallel.load_checkpoint(ckpt, self.model, self.optimizer, device=self.device)
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.wall_before_s = float(state.get("wall_s", 0.0))
        self.best_val_loss = state.get("best_val_loss")
        self.last_eval = state.get("last_eval")
        self.last_train_loss = state.get("last_train_loss")
        self.sampler.load_state_dict(state["sampler"])
        self.loss_spikes.history.extend(state["spike_history"]["loss"])
        self.grad_spikes.history.extend(state["spike_history"]["grad_norm"])
        ckpt_io.restore_rng_states(state["rng"])
        self.last_checkpoint = ckpt
        self.resumed_state = state

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "train_time_s": self.train_time_s,
                "wall_s": self._wall_s(), "best_val_loss": self.best_val_loss, "last_eval": self.last_eval,
                "last_train_loss": self.last_train_loss, "sampler": self.sampler.state_dict(),
                "spike_history": {"loss": list(self.loss_spikes.history),
                                  "grad_norm": list(self.grad_spikes.history)},
                "rng": ckpt_io.rng_states()}

    def _wall_s(self) -> float:
        return self.wall_before_s + (time.perf_counter() - self._started)

    def _prepare_out_dir(self) -> None:
        if not self.is_main:
            return
        if self.overwrite:
            for name in RUN_OUTPUTS:
                path = self.out_dir / name
                if name == ckpt_io.CHECKPOINTS_DIR:
                    ckpt_io.remove_checkpoints(self.out_dir)  # only what save_checkpoint wrote
                elif path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.atomic_write_text(self.out_dir / CONFIG_NAME, self.cfg.to_yaml())
        if isinstance(self.tokenizer, HFTokenizer):
            ckpt_io.atomic_write_text(self.out_dir / ckpt_io.TOKENIZER_NAME, self.tokenizer.to_json())
        metrics = self.out_dir / METRICS_NAME
        if self.resume_from is not None and metrics.is_file():
            # Drop records past the checkpoint (a killed run may have logged steps it never saved).
            kept = ckpt_io.metrics_lines_up_to(metrics, self.step)
            ckpt_io.atomic_write_text(metrics, "".join(line + "\n" for line in kept))
        elif metrics.exists():
            metrics.unlink()
        summary = self.out_dir / SUMMARY_NAME
        if summary.exists():
            summary.unlink()
        self._metrics = metrics.open("a")
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR),
                                    purge_step=self.step + 1 if self.resume_from is not None else None)

    # ------------------------------------------------------------------ public helpers
    def sample_batch(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch (inputs, targets) on the training device. ``train`` draws (and advances) the
        training sampler; ``val`` draws random validation windows without touching any training state."""
        if split == "train":
            inputs, targets = self.sampler.next_batch()
        elif split == "val":
            if not hasattr(self, "_val_sampler"):
                self._val_sampler = WindowSampler(self.splits.val, self.cfg.model.context_length,
                                                  self.cfg.train.batch_size, self.cfg.train.seed + 1)
            inputs, targets = self._val_sampler.next_batch()
        else:
            raise ValueError(f"split {split!r} is not 'train' or 'val'")
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop after the current step, with a checkpoint (the run is then resumable)."""
        self._stop_reason = reason

    def evaluate(self) -> EvalResult:
        cfg = self.cfg
        return evaluate(self.forward_model, self.splits.val, cfg.model.context_length, cfg.train.batch_size,
                        max_batches=cfg.train.eval_batches, bytes_per_token=self.splits.val_bytes_per_token,
                        device=self.device, precision=cfg.train.precision)

    def _callbacks(self, method: str, *args: Any) -> None:
        for callback in self.callbacks:
            fn = getattr(callback, method, None)
            if fn is not None:
                fn(self, *args)

    # ------------------------------------------------------------------ one step
    def _train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        step_index = self.step  # 0-based index of the optimizer step being taken
        lr = lr_for(cfg.optim, step_index, cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        accum = cfg.train.grad_accum
        moe = cfg.model.moe
        loss_sum = torch.zeros((), device=self.device)
        balance_sum = torch.zeros((), device=self.device)
        z_sum = torch.zeros((), device=self.device)
        load_sum = None
        for micro_step in range(accum):
            with self.parallel.gradient_sync(self.forward_model, enabled=micro_step == accum - 1):
                inputs, targets = self.sample_batch("train")
                with autocast_context(self.device, cfg.train.precision):
                    out = self.forward_model(inputs, targets)
                objective = training_objective(out, moe)
                if moe is not None and out.balance_loss is not None:
                    balance_sum += out.balance_loss.detach().float()
                    z_sum += out.z_loss.detach().float()
                    load = out.expert_load.detach().float()
                    load_sum = load if load_sum is None else load_sum + load
                (objective / accum).backward()
                loss_sum += out.loss.detach().float()
        self._callbacks("on_after_backward", self.step + 1)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # global under DDP/FSDP2
        loss_sum, balance_sum, z_sum, load_sum, grad_norm = self.parallel.mean_over_ranks(
            loss_sum, balance_sum, z_sum, load_sum, grad_norm)  # means over processes; nan if nan anywhere
        train_loss = float(loss_sum) / accum
        grad_norm_value = float(grad_norm)
        if self.parallel.any_rank(not math.isfinite(train_loss) or not math.isfinite(grad_norm_value)):
            what = "loss" if not math.isfinite(train_loss) else "gradient norm"
            value = train_loss if not math.isfinite(train_loss) else grad_norm_value
            raise Divergence(f"step {self.step + 1}: non-finite {what} ({value}) detected before the optimizer "
                             f"step; weights are those after step {self.step}")
        self.optimizer.step()
        self.step += 1
        self.tokens += cfg.tokens_per_step  # the global batch, whatever the world size
        record: dict[str, Any] = {"step": self.step, "train_loss": train_loss, "lr": lr,
                                  "grad_norm": grad_norm_value, "tokens": self.tokens}
        loss_z, loss_spike = self.loss_spikes.update(train_loss)
        grad_z, grad_spike = self.grad_spikes.update(grad_norm_value)
        record.update(loss_z=loss_z, loss_spike=loss_spike, grad_norm_z=grad_z, grad_norm_spike=grad_spike)
        if load_sum is not None:
            record["balance_loss"] = float(balance_sum) / accum
            record["z_loss"] = float(z_sum) / accum
            record["expert_load"] = (load_sum / accum).tolist()
        self.last_train_loss = train_loss
        return record

    # ------------------------------------------------------------------ the loop
    def _write_record(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()
        if self.tb is not None:
            step = record["step"]
            for key, tag in (("train_loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                             ("tokens_per_s", "train/tokens_per_s"), ("loss_z", "train/loss_spike_z"),
                             ("val_loss", "val/loss"), ("val_ppl", "val/perplexity"), ("val_bpb", "val/bpb"),
                             ("balance_loss", "moe/balance_loss"), ("z_loss", "moe/z_loss")):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(tag, value, step)
            if "expert_load" in record:
                for layer, loads in enumerate(record["expert_load"]):
                    for expert, value in enumerate(loads):
                        self.tb.add_scalar(f"moe/load_layer{layer}/expert{expert}", value, step)

    def _save_checkpoint(self) -> None:
        model, optimizer = self.parallel.full_state(self.model, self.optimizer)  # FSDP: every process gathers
        if not self.is_main:
            return
        tokenizer_json = self.tokenizer.to_json() if isinstance(self.tokenizer, HFTokenizer) else None
        self.last_checkpoint = ckpt_io.save_checkpoint(
            self.out_dir, self.step, model, optimizer, self._trainer_state(), self.cfg.to_dict(),
            tokenizer_json=tokenizer_json, keep=self.cfg.train.keep_checkpoints)

    def _summary(self, status: str, message: str = "", diverged_step: int | None = None) -> RunSummary:
        last = self.last_eval or {}
        return RunSummary(
            final_val_loss=last.get("val_loss"), best_val_loss=self.best_val_loss,
            diverged=status == "diverged", diverged_step=diverged_step, steps=self.step, tokens=self.tokens,
            wall_s=self._wall_s(), tokens_per_s=self.tokens / self.train_time_s if self.train_time_s > 0 else 0.0,
            status=status, final_train_loss=self.last_train_loss, final_val_bpb=last.get("val_bpb"),
            final_val_ppl=last.get("val_ppl"), message=message,
            checkpoint=str(self.last_checkpoint.relative_to(self.out_dir)) if self.last_checkpoint else None)

    def run(self) -> RunSummary:
        """Train to ``cfg.train.steps`` (or until stopped or diverged) and return the summary."""
        self._started = time.perf_counter()
        self._build()
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self._prepare_out_dir()
        cfg = self.cfg
        progress = Progress(cfg.train.progress, cfg.train.steps, start_step=self.step,
                            log_every=cfg.train.log_every, enabled=self.is_main)
        self.progress = progress
        if self.resume_from is not None:
            progress.message(f"resumed from {self.resume_from} at step {self.step}")
            changes = _changed_settings(self.saved_run_config, cfg.to_dict())
            if changes:
                progress.message("resumed with changed settings (losses will differ from an uninterrupted "
                                 "run): " + "; ".join(changes))
        self._callbacks("on_train_start")
        status, message, diverged_step = "completed", "", None
        previous_handler = self._install_sigint()
        try:
            while self.step < cfg.train.steps:
                started = time.perf_counter()
                try:
                    record = self._train_step()
                except Divergence as err:
                    status, message, diverged_step = "diverged", str(err), self.step + 1
                    if self.last_checkpoint is not None:
                        message += f"; last good checkpoint: {self.last_checkpoint}"
                    else:
                        message += "; no checkpoint was written before it"
                    break
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
                self.train_time_s += elapsed
                record["tokens_per_s"] = cfg.tokens_per_step / elapsed
                final = self.step == cfg.train.steps
                every = cfg.train.eval_every
                if final or (every and self.step % every == 0):
                    result = self.evaluate()
                    record.update(result.to_dict())
                    self.last_eval = {k: v for k, v in result.to_dict().items()}
                    previous_best = self.best_val_loss
                    if self.best_val_loss is None or result.loss < self.best_val_loss:
                        self.best_val_loss = result.loss
                    record["val_above_best"] = result.loss - self.best_val_loss
                    self._callbacks("on_eval", self.step, record)
                    progress.message(f"step {self.step}: val_loss {result.loss:.4f} ppl {result.perplexity:.2f} "
                                     f"bpb {result.bits_per_byte:.4f}")
                    if previous_best is not None and result.loss > previous_best + VAL_REGRESSION_NATS:
                        progress.message(f"warning: step {self.step}: val_loss {result.loss:.4f} is "
                                         f"{result.loss - previous_best:.3f} nats above the run's best "
                                         f"({previous_best:.4f}); the run may be collapsing (no non-finite value "
                                         "or spike was detected)")
                self._callbacks("on_step_end", self.step, record)
                self._write_record(record)
                progress.step(self.step, record)
                every = cfg.train.checkpoint_every
                stop_reason = self.parallel.agreed_stop(self._stop_reason)  # the same in every process
                if final or (every and self.step % every == 0) or stop_reason:
                    self._save_checkpoint()
                if stop_reason and not final:
                    status, message = "interrupted", f"{stop_reason} after step {self.step}"
                    break
        finally:
            self._restore_sigint(previous_handler)
            progress.close()
        if status == "completed":
            message = f"completed {self.step} steps"
        summary = self._summary(status, message, diverged_step)
        if self.is_main:
            ckpt_io.atomic_write_text(self.out_dir / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2) + "\n")
            self._metrics.close()
            if self.tb is not None:
                self.tb.close()
        self._callbacks("on_train_end", summary)
        return summary

    def _install_sigint(self):
        """Ctrl-C stops after the current step with a checkpoint; a second Ctrl-C interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_reason:
                raise KeyboardInterrupt
            self.request_stop("interrupted (Ctrl-C)")

        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _restore_sigint(previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          callbacks: Iterable[Any] = (), use_intact: bool = False) -> RunSummary:
    """Train ``cfg`` into ``out_dir`` and return the :class:`RunSummary` (also on divergence, with
    ``diverged=True``). Raises :class:`ConfigError` for bad input, before writing anything.

    Under torchrun every process calls it; see :func:`spannorm.train.distributed.train_distributed`."""
    from spannorm.train import distributed

    if distributed.launch_env() is not None:
        return distributed.train_distributed(cfg, out_dir, resume=resume, overwrite=overwrite, callbacks=callbacks)
    return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite, callbacks=callbacks, use_intact=use_intact).run()


__all__ = ["Divergence", "RunSummary", "SpikeScore", "Trainer", "train", "training_objective"]
