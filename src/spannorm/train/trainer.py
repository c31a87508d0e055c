"""The training loop: AdamW, warmup + cosine/WSD, clipping, accumulation, bf16 autocast, evaluation,
checkpoints, exact resume, and non-finite detection before the optimizer step.

:class:`Trainer` is built from named steps (run folder, data, model config, resume check, device, model,
optimizer); :meth:`Trainer.run` asks them when to act. What a run records and shows is done by callbacks
(:mod:`spannorm.train.callbacks`): the spike scores of SPEC §6, the validation-regression warning, the
progress display and the writer of ``metrics.jsonl`` and TensorBoard. A run writes into its folder (names in
:mod:`spannorm.train.layout`):

- ``config.yaml``: the resolved :class:`~spannorm.train.config.RunConfig`;
- ``metrics.jsonl``: one JSON object per optimizer step (``step``, ``train_loss``, ``lr``, ``grad_norm``,
  ``tokens``, ``tokens_per_s``, spike scores, MoE losses and per-expert load; ``achieved_tflops``, ``mfu``
  and ``peak_mem_bytes`` on logging steps; ``val_loss``/``val_ppl``/``val_bpb``/``val_above_best`` on evaluation steps);
- ``tensorboard/``: TensorBoard event files;
- ``checkpoints/``: see :mod:`spannorm.train.checkpoint`;
- ``summary.json``: the :class:`RunSummary`, with the fingerprint of the data the run trained on
  (:func:`~spannorm.data.dataset.data_fingerprint`), which every checkpoint's trainer state records too.

A step holds no host sync unless it is a *reading step* (:meth:`Trainer.should_read`): the losses and norms
stay on the device, and the non-finite check stops the update on the device where the optimizer can (see
:meth:`Trainer._train_step`); each reading step reads every step since the last one in one transfer. The
training batches are drawn one ahead (:class:`~spannorm.data.dataset.BatchesAhead`).

Only rank 0 writes or displays anything. Under torchrun the same loop runs in every process, with DDP or FSDP2
behind the hooks of :mod:`spannorm.train.distributed`; :func:`spannorm.launch.train` is the entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from spannorm.config import ConfigError, ModelConfig
from spannorm.data.dataset import (
    BatchesAhead,
    TokenSplits,
    WindowSampler,
    check_long_enough,
    data_fingerprint,
    load_splits,
)
from spannorm.data.tokenizer import HFTokenizer, Tokenizer
from spannorm.hardware.calibrate import MEASURED, measured_peak_tflops
from spannorm.hardware.devices import bf16_cpu_note, device_name, matmul_precision, peak_tflops
from spannorm.model.counting import flops_per_token
from spannorm.model.transformer import DecoderLM
from spannorm.train import checkpoint as ckpt_io
from spannorm.train.callbacks import (
    MetricsWriter,
    PeakMemory,
    ProgressDisplay,
    SpikeScores,
    Throughput,
    ValidationRegression,
    callback_states,
    check_callbacks,
    load_callback_states,
    needs_step_end_at_once,
    should_log,
)
from spannorm.train.config import RunConfig
from spannorm.train.distributed import SingleProcess
from spannorm.train.evaluation import EvalResult, autocast_context, evaluate
from spannorm.train.layout import RunFolder
from spannorm.train.optimizer import build_optimizer, load_keeping_kernel, uses_fused
from spannorm.train.schedule import lr_for

TRAINER_STATE_KEYS = ("step", "tokens", "train_time_s", "wall_s", "best_val_loss", "last_eval", "last_train_loss",
                      "sampler", "data", "rng")
"""The trainer's own keys in ``trainer_state.json``; every other key is a callback's state."""


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
    data: dict[str, Any] | None = None
    """What the run trained on (:func:`~spannorm.data.dataset.data_fingerprint`): source, content SHA-256,
    tokenizer and split sizes; after a resume on other data, ``earlier`` lists the data of the steps before it
    (``sha256``, ``source``, ``until_step``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PendingStep:
    """An optimizer step whose losses and norms are still on the device; the next reading step reads them."""

    step: int
    lr: float
    tokens: int
    values: tuple[torch.Tensor, ...]
    """On the device: the loss summed over the micro-batches and the gradient norm (means over processes), and
    for MoE models the summed balance and z-losses and the mean per-expert load."""


def _nested(flat: list[float], shape: tuple[int, ...]) -> list[Any]:
    """``flat`` as the nested lists ``Tensor.tolist`` gives for a tensor of ``shape`` (one dimension or more)."""
    if len(shape) <= 1:
        return flat
    size = math.prod(shape[1:])
    return [_nested(flat[i:i + size], shape[1:]) for i in range(0, len(flat), size)]


def _is_existing_run(run: RunFolder) -> bool:
    return any(path.exists() for path in (run.config, run.summary, run.metrics)) or bool(
        ckpt_io.list_checkpoints(run.root))


def _describe_run(run: RunFolder) -> str:
    summary = run.summary
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
    """A saved model config dict after a JSON round trip (placement_overrides keys become strings), with the
    defaults of its time for the fields it predates (:meth:`ModelConfig.from_saved`)."""
    return ModelConfig.from_saved(json.loads(json.dumps(data))).to_dict()


def _changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The data/optim/train settings that differ between a checkpoint's run config and the new one. A field
    the checkpoint does not record (it predates the field) counts as its default, so it is not a change."""
    defaults = RunConfig().to_dict()
    changes = []
    for section in ("data", "optim", "train"):
        for key in sorted(set(old.get(section, {})) | set(new.get(section, {}))):
            va = old.get(section, {}).get(key, defaults.get(section, {}).get(key))
            vb = new.get(section, {}).get(key)
            if va != vb:
                changes.append(f"{section}.{key} {va!r} -> {vb!r}")
    return changes


def _short(value: Any) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else str(value)


def _changed_data(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """How the data a checkpoint trained on (its trainer state's fingerprint) differs from the data now, in
    words; None when it does not, or when the checkpoint predates fingerprints. A moved file with the same
    content is the same data."""
    if not isinstance(old, dict):
        return None
    changed = [key for key in ("sha256", "tokenizer", "train_tokens", "val_tokens") if old.get(key) != new.get(key)]
    if not changed:
        return None
    if old.get("python") != new.get("python"):  # the embedded corpus is the interpreter's standard library
        changed.append("python")
    parts = [f"{key} {_short(old.get(key))} -> {_short(new.get(key))}" for key in changed]
    return f"{old.get('source')} -> {new.get('source')}: " + "; ".join(parts)


def training_objective(out, moe_cfg) -> torch.Tensor:
    """The loss that is backpropagated: cross-entropy plus, for MoE models, the balance loss and router
    z-loss weighted by ``model.moe.balance_coef`` and ``model.moe.z_loss_coef``."""
    if moe_cfg is None or out.balance_loss is None:
        return out.loss
    return out.loss + moe_cfg.balance_coef * out.balance_loss + moe_cfg.z_loss_coef * out.z_loss


def resolve_device(name: str) -> torch.device:
    """The device of ``train.device``: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' is invalid: no CUDA device is available; allowed: auto, cpu")
    return torch.device(name)


@dataclass
class ValidationHistory:
    """The run's evaluations so far: the latest results, the best (lowest) validation loss, and the best before
    the latest evaluation."""

    last: dict[str, float] | None = None
    best_loss: float | None = None
    previous_best_loss: float | None = None

    def add(self, result: EvalResult) -> None:
        self.last = result.to_dict()
        self.previous_best_loss = self.best_loss
        if self.best_loss is None or result.loss < self.best_loss:
            self.best_loss = result.loss


@contextlib.contextmanager
def ctrl_c_requests_stop(trainer: Trainer) -> Iterator[None]:
    """While inside: Ctrl-C asks ``trainer`` to stop after the current step (with a checkpoint); a second Ctrl-C
    interrupts at once. The previous handler is put back on leaving. Only the main thread can install it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_reason:
            raise KeyboardInterrupt
        trainer.request_stop("interrupted (Ctrl-C)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class InitFrom:
    """How the trainer reads ``train.init_from`` (a checkpoint of another library or another run). The train
    layer cannot read one itself: :func:`spannorm.launch.train` hands in :mod:`spannorm.interop.init_from`'s.

    ``check(path, model_cfg, tokenizer_vocab_size=...)`` raises :class:`ConfigError` (reading configs only)
    unless ``build(path, model_cfg)`` can make the model to start from."""

    check: Callable[..., None]
    build: Callable[[str, ModelConfig], DecoderLM]


class Trainer:
    """One training run. Build with the resolved config and the run folder, then call :meth:`run`.

    The constructor is the list of build steps below. Everything that can be wrong with the user's input is
    checked by the first five, before the model is built and before anything is written into ``out_dir``;
    they raise :class:`ConfigError`. ``callbacks`` (:mod:`spannorm.train.callbacks`) run after the spike scores,
    the progress display and the validation-regression warning, and before the metrics writer. The trainer
    builds no optional callback itself: :func:`spannorm.launch.train` adds the diagnostics one, and hands in
    ``init_from``, the reader of ``train.init_from`` checkpoints (needed only when the config names one)."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 callbacks: Iterable[Any] = (), parallel: SingleProcess | None = None,
                 init_from: InitFrom | None = None, use_intact: bool = False):
        cfg.validate()
        self.init_from = init_from
        callbacks = check_callbacks(callbacks, reserved=TRAINER_STATE_KEYS)
        self.parallel = parallel if parallel is not None else SingleProcess()
        self.rank, self.world_size = self.parallel.rank, self.parallel.world_size
        self.is_main = self.rank == 0
        # Under torchrun rank 0 goes first (it may fill the token cache or train a tokenizer that the others
        # then read), and every process raises the same ConfigError when any one fails.
        with self.parallel.rank_zero_first():
            self.run_folder, self.resume_from, self.overwrite = self._build_run_folder(out_dir, resume, overwrite,
                                                                                           use_intact)
            cfg, self.tokenizer, self.splits = self._build_data(cfg)
            self.data = data_fingerprint(self.splits, self.tokenizer)
            self.cfg = self._build_model_config(cfg)
            self.saved_run_config = self._check_resume()
            self.device = self._build_device()
        self.model, self.forward_model = self._build_model()
        self.optimizer = build_optimizer(self.model, self.cfg.optim, fused=uses_fused(self.cfg.optim, self.device))
        self.sampler = self.parallel.train_sampler(self.splits.train, self.cfg.model.context_length,
                                                   self.cfg.train.batch_size, self.cfg.train.seed)
        self.batches = BatchesAhead(self.sampler, self.device)
        self.callbacks = self._build_callbacks(callbacks)
        self.out_dir = self.run_folder.root
        self.step = 0
        self.tokens = 0
        self.train_time_s = 0.0
        self.wall_before_s = 0.0
        self.validation = ValidationHistory()
        self.last_train_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.resume_messages: list[str] = []
        self.resume_warnings: list[str] = []  # shown even with train.progress=none
        self.stop_reason: str | None = None
        self._pending: list[PendingStep] = []  # the steps since the last reading step
        self._pending_since = 0.0  # perf_counter at the start of the first of them
        self._non_finite: torch.Tensor | None = None  # on the device: a pending step had a non-finite value

    # ------------------------------------------------------------------ build steps
    @staticmethod
    def _build_run_folder(out_dir: str | Path, resume: bool, overwrite: bool,
                          use_intact: bool = False) -> tuple[RunFolder, Path | None, bool]:
        """The run folder, the checkpoint to resume from (None: a fresh run) and whether to replace what the
        folder holds. Only checks: nothing is written before :meth:`run`."""
        run = RunFolder(Path(out_dir))
        if run.root.exists() and not run.root.is_dir():
            raise ConfigError(f"out_dir={str(run.root)!r} is invalid: it is a file; name a folder")
        existing = run.root.is_dir() and _is_existing_run(run)
        if existing and not resume and not overwrite:
            raise ConfigError(f"out_dir={str(run.root)!r} already holds {_describe_run(run)}; "
                              "allowed: --resume to continue it, --overwrite to replace it, or another --out")
        # A damaged latest checkpoint is refused, naming the file, or with use_intact the newest intact one is used.
        resume_from = ckpt_io.resume_checkpoint(run.root, use_intact=use_intact) if (resume and existing) else None
        return run, resume_from, overwrite and not resume

    @staticmethod
    def _build_data(cfg: RunConfig) -> tuple[RunConfig, Tokenizer, TokenSplits]:
        """The tokenizer and the token splits (they may fill the shared token cache, never the run folder);
        the config records where the text is as an absolute path, valid from any working folder."""
        if cfg.data.path is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, path=str(Path(cfg.data.path).expanduser().resolve())))
        tokenizer, splits = load_splits(cfg.data)
        check_long_enough(splits, cfg.model.context_length)
        return cfg, tokenizer, splits

    def _build_model_config(self, cfg: RunConfig) -> RunConfig:
        """The model config: its vocabulary is the tokenizer's, unless ``train.init_from`` names a checkpoint,
        which fixes it (then the tokenizer must fit in it)."""
        if cfg.train.init_from is not None:
            if self.resume_from is None:
                if self.init_from is None:
                    raise ValueError("train.init_from is set but the Trainer was given no init_from reader; "
                                     "train with spannorm.launch.train, which hands one in")
                self.init_from.check(cfg.train.init_from, cfg.model, tokenizer_vocab_size=self.tokenizer.vocab_size)
            return cfg
        if cfg.model.vocab_size != self.tokenizer.vocab_size:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size))
        return cfg

    def _check_resume(self) -> dict[str, Any] | None:
        """The run config of the checkpoint to resume (None for a fresh run), after checking that it trained
        the architecture the config asks for."""
        if self.resume_from is None:
            return None
        saved = ckpt_io.read_json(self.resume_from / ckpt_io.RUN_CONFIG_NAME)
        diff = _first_difference(_normalize_model_dict(saved["model"]), self.cfg.model.to_dict(), "model")
        if diff:
            name, was, now = diff
            raise ConfigError(f"cannot resume {str(self.resume_from)!r}: it was trained with {name}={was!r} "
                              f"but the config asks for {now!r}; allowed: the checkpoint's architecture "
                              f"(drop the model overrides, or set --{name}={was}) or a new --out")
        return saved

    def _build_device(self) -> torch.device:
        device = self.parallel.place(resolve_device(self.cfg.train.device))
        if device.type == "cuda":  # process-wide settings, set either way so that tf32=false means fp32
            torch.backends.cuda.matmul.allow_tf32 = self.cfg.train.tf32
            torch.backends.cudnn.allow_tf32 = self.cfg.train.tf32
        return device

    def _build_model(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The model (seeded with ``train.seed``, or the ``train.init_from`` weights) and the module the
        training step calls (wrapped for DDP/FSDP and torch.compile)."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        if cfg.train.init_from is not None and self.resume_from is None:
            assert self.init_from is not None  # checked by _build_model_config
            model = self.init_from.build(cfg.train.init_from, cfg.model).to(self.device)
        else:
            model = self.parallel.build_model(lambda: DecoderLM(cfg.model), self.device, cfg.train.precision)
        model.train()
        model.activation_checkpointing = cfg.train.activation_checkpointing
        model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
        return model, self.parallel.wrap_model(model, compile=cfg.train.compile, precision=cfg.train.precision)

    def _build_callbacks(self, callbacks: list[Any]) -> list[Any]:
        train = self.cfg.train
        self.progress = ProgressDisplay(train.progress, train.steps, train.log_every, enabled=self.is_main)
        self.metrics = MetricsWriter()
        throughput = Throughput(flops_per_token(self.cfg.model), self.world_size, train.steps, train.log_every,
                                *self._mfu_peak(), note=bf16_cpu_note(self.device, train.precision))
        return [SpikeScores(train.spike_window, train.spike_sigmas), self.progress, throughput,
                PeakMemory(self.device, train.steps, train.log_every), ValidationRegression(), *callbacks, self.metrics]

    def _mfu_peak(self) -> tuple[float | None, str | None]:
        """The peak TFLOP/s per device that ``mfu`` divides by, and its source (see :class:`Throughput`)."""
        train = self.cfg.train
        precision = matmul_precision(self.device, train.precision)
        if train.peak_tflops is not None:
            return train.peak_tflops, "train.peak_tflops"
        if self.device.type == "cuda":
            peak = peak_tflops(device_name(self.device), precision)
            if peak is not None:
                return peak, "device table"
        if train.measure_peak:
            return measured_peak_tflops(self.device, precision), MEASURED
        return None, None

    # ------------------------------------------------------------------ state
    def _restore(self, ckpt: Path) -> None:
        state = load_keeping_kernel(self.optimizer, lambda: self.parallel.load_checkpoint(
            ckpt, self.model, self.optimizer, device=self.device))  # the kernel optim.fused asks for now
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.wall_before_s = float(state.get("wall_s", 0.0))
        self.validation = ValidationHistory(last=state.get("last_eval"), best_loss=state.get("best_val_loss"))
        self.last_train_loss = state.get("last_train_loss")
        self.batches.load_state_dict(state["sampler"])
        load_callback_states(self.callbacks, state)
        ckpt_io.restore_rng_states(state["rng"])
        self.last_checkpoint = ckpt
        self.resume_messages = [f"resumed from {ckpt} at step {self.step}"]
        changes = _changed_settings(self.saved_run_config or {}, self.cfg.to_dict())
        if changes:
            self.resume_warnings.append("resumed with changed settings (losses will differ from an uninterrupted "
                                        "run): " + "; ".join(changes))
        saved_data = state.get("data")
        changed_data = _changed_data(saved_data, self.data)
        if changed_data:
            self.resume_warnings.append(f"resumed on other data than the checkpoint's (losses will differ from an "
                                        f"uninterrupted run): {changed_data}")
        if isinstance(saved_data, dict):  # the data of earlier stretches of this run stay on record
            earlier = list(saved_data.get("earlier") or [])
            if changed_data:
                earlier.append({"sha256": saved_data.get("sha256"), "source": saved_data.get("source"),
                                "until_step": self.step})
            if earlier:
                self.data = {**self.data, "earlier": earlier}

    def _trainer_state(self) -> dict[str, Any]:
        state = {"step": self.step, "tokens": self.tokens, "train_time_s": self.train_time_s,
                 "wall_s": self._wall_s(), "best_val_loss": self.validation.best_loss,
                 "last_eval": self.validation.last, "last_train_loss": self.last_train_loss,
                 "sampler": self.batches.state_dict(), "data": self.data}
        state.update(callback_states(self.callbacks))
        state["rng"] = ckpt_io.rng_states()
        return state

    def _wall_s(self) -> float:
        return self.wall_before_s + (time.perf_counter() - self._started)

    def _prepare_run_folder(self) -> None:
        """Clear what ``overwrite`` replaces, write ``config.yaml`` (and the tokenizer), drop an old summary."""
        if not self.is_main:
            return
        run = self.run_folder
        if self.overwrite:
            for path in run.outputs():
                if path.name == ckpt_io.CHECKPOINTS_DIR:
                    ckpt_io.remove_checkpoints(run.root)  # only what save_checkpoint wrote
                elif path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        run.root.mkdir(parents=True, exist_ok=True)
        ckpt_io.atomic_write_text(run.config, self.cfg.to_yaml())
        if isinstance(self.tokenizer, HFTokenizer):
            ckpt_io.atomic_write_text(run.tokenizer, self.tokenizer.to_json())
        if run.summary.exists():
            run.summary.unlink()

    # ------------------------------------------------------------------ public helpers
    @property
    def tb(self) -> Any:
        """The TensorBoard writer (None when ``train.tensorboard`` is off, off rank 0, or before training)."""
        return self.metrics.tb

    def sample_batch(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch (inputs, targets) on the training device. ``train`` draws (and advances) the
        training sampler; ``val`` draws random validation windows without touching any training state."""
        if split == "train":
            return self.batches.next_batch()  # already on the device
        if split != "val":
            raise ValueError(f"split {split!r} is not 'train' or 'val'")
        if not hasattr(self, "_val_sampler"):
            self._val_sampler = WindowSampler(self.splits.val, self.cfg.model.context_length,
                                              self.cfg.train.batch_size, self.cfg.train.seed + 1)
        inputs, targets = self._val_sampler.next_batch()
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop after the current step, with a checkpoint (the run is then resumable). Under torchrun the
        processes agree on it at the next reading step (:meth:`should_read`)."""
        self.stop_reason = reason

    def evaluate(self) -> EvalResult:
        cfg = self.cfg
        return evaluate(self.forward_model, self.splits.val, cfg.model.context_length, cfg.train.batch_size,
                        max_batches=cfg.train.eval_batches, bytes_per_token=self.splits.val_bytes_per_token,
                        device=self.device, precision=cfg.train.precision, parallel=self.parallel)

    def should_evaluate(self, step: int) -> bool:
        """Evaluate after step ``step``: every ``train.eval_every`` steps and at the last."""
        every = self.cfg.train.eval_every
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    def should_checkpoint(self, step: int) -> bool:
        """Checkpoint after step ``step``: every ``train.checkpoint_every`` steps and at the last."""
        every = self.cfg.train.checkpoint_every
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    def should_read(self, step: int) -> bool:
        """Read the losses and norms of the steps so far to the host after step ``step`` (a device sync): at a
        logging, evaluation or checkpoint step, the last step, a step some callback needs at once
        (:func:`~spannorm.train.callbacks.needs_step_end_at_once`), and after a stop request in a single
        process. Under torchrun a stop is agreed at reading steps only, which every process knows alike."""
        train = self.cfg.train
        return (should_log(step, train.log_every, train.steps) or self.should_evaluate(step)
                or self.should_checkpoint(step) or any(needs_step_end_at_once(cb, step) for cb in self.callbacks)
                or (self.world_size == 1 and self.stop_reason is not None))

    def skips_update_on_device(self) -> bool:
        """Whether the optimizer can skip a step on the device, given a flag tensor (``found_inf``, the
        protocol of ``torch.amp.GradScaler``; PyTorch's fused AdamW, which the trainer uses on CUDA or with
        ``optim.fused=true``): then the non-finite check needs no host read. Otherwise each step reads one
        flag (the CPU's for-loop AdamW)."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            fn = getattr(callback, hook, None)
            if fn is not None:
                fn(self, *args)

    # ------------------------------------------------------------------ one step
    def _train_step(self) -> bool:
        """One optimizer step, its losses and norms left on the device (a :class:`PendingStep`). Returns True
        when they must be read now: a non-finite value that the optimizer cannot skip on the device.

        The non-finite guard must stop the update, so it sits before the optimizer step. Its flag stays raised
        until the next reading step, and every step it covers is skipped: with the fused AdamW the optimizer
        skips them on the device (weights, moments and step count unchanged), so no step reads; otherwise
        this step reads the flag (its one host read) and does not call the optimizer. The reading step then
        finds the first non-finite step and goes back to the step before it (:meth:`_read_pending`)."""
        cfg = self.cfg
        if not self._pending:
            self._pending_since = time.perf_counter()
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
        self._call("on_after_backward", self.step + 1)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # global under DDP/FSDP2
        loss_sum, balance_sum, z_sum, load_sum, grad_norm = self.parallel.mean_over_ranks(
            loss_sum, balance_sum, z_sum, load_sum, grad_norm)  # means over processes; nan if nan anywhere
        assert loss_sum is not None and grad_norm is not None
        non_finite = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))  # the same in every process
        self._non_finite = non_finite if self._non_finite is None else self._non_finite | non_finite
        read_now = False
        if self.skips_update_on_device():
            scaled: Any = self.optimizer  # GradScaler's protocol: step() reads an attribute AdamW does not declare
            scaled.found_inf = self._non_finite.float()
            try:
                self.optimizer.step()
            finally:
                del scaled.found_inf
        elif bool(self._non_finite):  # this step's one host read: the optimizer cannot skip on the device
            read_now = True
        else:
            self.optimizer.step()
        self.step += 1
        self.tokens += cfg.tokens_per_step  # the global batch, whatever the world size
        values = (loss_sum, grad_norm)
        if load_sum is not None:
            assert balance_sum is not None and z_sum is not None
            values += (balance_sum, z_sum, load_sum / accum)
        self._pending.append(PendingStep(self.step, lr, self.tokens, values))
        return read_now

    def _read_pending(self) -> tuple[list[dict[str, Any]], str | None]:
        """The records of the pending steps, in step order, read from the device in one transfer (the reading
        step's host sync). ``tokens_per_s`` is their mean rate: the time from the start of the first to this
        read, which waited for the device. A non-finite loss or gradient norm ends the list: that step and
        the ones after it were not applied (see :meth:`_train_step`), so the trainer goes back to the step
        before it and returns the divergence message with the records before it (None when all are finite)."""
        pending, self._pending, self._non_finite = self._pending, [], None
        flat = torch.cat([value.detach().double().reshape(-1) for p in pending for value in p.values]).tolist()
        elapsed = time.perf_counter() - self._pending_since
        self.train_time_s += elapsed
        tokens_per_s = self.cfg.tokens_per_step * len(pending) / elapsed
        accum = self.cfg.train.grad_accum
        records: list[dict[str, Any]] = []
        offset = 0
        for p in pending:
            numbers = flat[offset:offset + sum(value.numel() for value in p.values)]
            offset += len(numbers)
            train_loss, grad_norm = numbers[0] / accum, numbers[1]
            if not math.isfinite(train_loss) or not math.isfinite(grad_norm):
                undone = self.step - (p.step - 1)
                self.step -= undone
                self.tokens -= undone * self.cfg.tokens_per_step
                what = "loss" if not math.isfinite(train_loss) else "gradient norm"
                value = train_loss if not math.isfinite(train_loss) else grad_norm
                return records, (f"step {p.step}: non-finite {what} ({value}) detected before the optimizer "
                                 f"step; weights are those after step {self.step}")
            record: dict[str, Any] = {"step": p.step, "train_loss": train_loss, "lr": p.lr, "grad_norm": grad_norm,
                                      "tokens": p.tokens}
            if len(p.values) > 2:
                record["balance_loss"] = numbers[2] / accum
                record["z_loss"] = numbers[3] / accum
                record["expert_load"] = _nested(numbers[4:], tuple(p.values[4].shape))
            record["tokens_per_s"] = tokens_per_s
            self.last_train_loss = train_loss
            records.append(record)
        return records, None

    def _evaluate(self, record: dict[str, Any]) -> None:
        result = self.evaluate()
        record.update(result.to_dict())
        self.validation.add(result)
        self._call("on_evaluation", self.step, record)

    def _save_checkpoint(self) -> None:
        model, optimizer = self.parallel.full_state(self.model, self.optimizer)  # FSDP: every process gathers
        if self.is_main:
            tokenizer_json = self.tokenizer.to_json() if isinstance(self.tokenizer, HFTokenizer) else None
            self.last_checkpoint = ckpt_io.save_checkpoint(
                self.run_folder.root, self.step, model, optimizer, self._trainer_state(), self.cfg.to_dict(),
                tokenizer_json=tokenizer_json, keep=self.cfg.train.keep_checkpoints)
        self._call("on_checkpoint", self.step, self.run_folder.checkpoint(self.step))

    # ------------------------------------------------------------------ the loop
    def run(self) -> RunSummary:
        """Train to ``cfg.train.steps`` (or until stopped or diverged) and return the summary."""
        self._started = time.perf_counter()
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self._prepare_run_folder()
        self._call("on_train_start")
        status, message, diverged_step = "completed", "", None
        with ctrl_c_requests_stop(self):
            while self.step < self.cfg.train.steps:
                read_now = self._train_step()
                if not (read_now or self.should_read(self.step)):
                    continue  # no host sync: the step's values stay on the device
                records, divergence = self._read_pending()
                for earlier in records if divergence else records[:-1]:  # the steps that did not read, in order
                    self._call("on_step_end", earlier["step"], earlier)
                if divergence:
                    status, message, diverged_step = "diverged", self._with_last_good(divergence), self.step + 1
                    break
                record = records[-1]
                if self.should_evaluate(self.step):
                    self._evaluate(record)
                self._call("on_step_end", self.step, record)
                stop_reason = self.parallel.agreed_stop(self.stop_reason)  # the same in every process
                if self.should_checkpoint(self.step) or stop_reason:
                    self._save_checkpoint()
                if stop_reason and self.step < self.cfg.train.steps:
                    status, message = "interrupted", f"{stop_reason} after step {self.step}"
                    break
        if status == "completed":
            message = f"completed {self.step} steps"
        return self._finish(status, message, diverged_step)

    def _with_last_good(self, message: str) -> str:
        if self.last_checkpoint is not None:
            return message + f"; last good checkpoint: {self.last_checkpoint}"
        return message + "; no checkpoint was written before it"

    def _finish(self, status: str, message: str, diverged_step: int | None) -> RunSummary:
        last = self.validation.last or {}
        summary = RunSummary(
            final_val_loss=last.get("val_loss"), best_val_loss=self.validation.best_loss,
            diverged=status == "diverged", diverged_step=diverged_step, steps=self.step, tokens=self.tokens,
            wall_s=self._wall_s(), tokens_per_s=self.tokens / self.train_time_s if self.train_time_s > 0 else 0.0,
            status=status, final_train_loss=self.last_train_loss, final_val_bpb=last.get("val_bpb"),
            final_val_ppl=last.get("val_ppl"), message=message,
            checkpoint=str(self.last_checkpoint.relative_to(self.run_folder.root)) if self.last_checkpoint else None,
            data=self.data)
        if self.is_main:
            ckpt_io.atomic_write_text(self.run_folder.summary, json.dumps(summary.to_dict(), indent=2) + "\n")
        self._call("on_train_end", summary)
        return summary


__all__ = ["PendingStep", "RunSummary", "Trainer", "ValidationHistory", "ctrl_c_requests_stop", "resolve_device",
           "training_objective"]
