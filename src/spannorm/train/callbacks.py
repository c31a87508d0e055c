"""Trainer callbacks: the declared :class:`Callback` base and the callbacks every run has.

The trainer calls each callback's hooks in list order:

- ``on_train_start(trainer)``: after the model, optimizer and (on resume) every state are restored;
- ``on_after_backward(trainer, step)``: after the backward pass of optimizer step ``step`` (1-based), before
  clipping, the non-finite check and the optimizer step;
- ``on_evaluation(trainer, step, record)``: after an evaluation; ``record`` holds ``val_loss`` and friends;
- ``on_step_end(trainer, step, record)``: after step ``step``; ``record`` is the dict about to be written
  to ``metrics.jsonl``, and a callback may add keys to it. Its losses and norms are read from the device only
  after a *reading step* (a logging, evaluation or checkpoint step, the last step, a stop, or a step some
  callback needs at once: :meth:`Callback.needs_step_end_at_once`); the ``on_step_end`` calls of the steps
  in between come then, in step order, so that a step that does not read holds no host sync;
- ``on_checkpoint(trainer, step, path)``: after checkpoint ``step`` was written to the folder ``path`` (rank 0
  writes it; under torchrun the other processes get the same path);
- ``on_train_end(trainer, summary)``: after ``summary.json`` is written.

``state_dict()`` / ``load_state_dict(state)`` carry a callback's state across a checkpoint: a callback whose
``state_dict()`` is not empty has it saved in the checkpoint's ``trainer_state.json`` under its
:attr:`Callback.state_key`, and given back on resume, so that it resumes exactly. A checkpoint without that key
(written before the callback existed) leaves the callback fresh.

Every run has, in this order: :class:`SpikeScores`, :class:`ProgressDisplay`, :class:`Throughput`,
:class:`ValidationRegression`, then the caller's callbacks, then :class:`MetricsWriter` (so that the record it
writes holds what every other callback added).
"""

from __future__ import annotations

import collections
import json
import math
import sys
from typing import Any, Iterable

from spannorm.hardware.devices import peak_memory_bytes
from spannorm.train import checkpoint as ckpt_io
from spannorm.train.progress import Progress

HOOKS = ("on_train_start", "on_after_backward", "on_evaluation", "on_step_end", "on_checkpoint", "on_train_end")
"""Every hook the trainer calls."""


class Callback:
    """A trainer callback: override the hooks it needs (every hook does nothing here) and, when it keeps
    state that must survive a resume, :meth:`state_dict` and :meth:`load_state_dict`.

    The trainer also accepts objects that do not derive from this class, as long as every ``on_*`` method they
    have is one of :data:`HOOKS`; those have no state."""

    state_key: str | None = None
    """The key of this callback's state in ``trainer_state.json``; None: the class name."""

    def on_train_start(self, trainer: Any) -> None:
        """Training starts (after a resume has restored every state)."""

    def on_after_backward(self, trainer: Any, step: int) -> None:
        """The gradients of optimizer step ``step`` are there (before clipping and the optimizer step)."""

    def on_evaluation(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        """The model was evaluated after step ``step``; ``record`` holds the results."""

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        """Optimizer step ``step`` is done; ``record`` is about to be written to ``metrics.jsonl``."""

    def on_checkpoint(self, trainer: Any, step: int, path: Any) -> None:
        """Checkpoint ``step`` was written to the folder ``path``."""

    def on_train_end(self, trainer: Any, summary: Any) -> None:
        """The run ended (completed, interrupted or diverged) and ``summary.json`` was written."""

    def needs_step_end_at_once(self, step: int) -> bool:
        """Whether :meth:`on_step_end` of step ``step`` must run right after that step (it looks at the model,
        or may request a stop), which makes ``step`` a reading step: one host sync. False: its call may come
        later, at the next reading step, in step order. The default is True for a class that overrides
        ``on_step_end`` (every step then reads, as before reading steps existed), False otherwise."""
        return type(self).on_step_end is not Callback.on_step_end

    def state_dict(self) -> dict[str, Any]:
        """This callback's state, JSON-serializable; empty (nothing saved) by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def state_key(callback: Any) -> str:
    """Where ``callback``'s state sits in ``trainer_state.json``: its ``state_key``, or its class name."""
    return getattr(callback, "state_key", None) or type(callback).__name__


def needs_step_end_at_once(callback: Any, step: int) -> bool:
    """Whether ``callback`` needs ``on_step_end`` right after step ``step``: its own
    :meth:`Callback.needs_step_end_at_once`, or, for an object not derived from :class:`Callback` that lacks
    it, whether it has an ``on_step_end`` at all."""
    verdict = getattr(callback, "needs_step_end_at_once", None)
    if verdict is not None:
        return bool(verdict(step))
    return callable(getattr(callback, "on_step_end", None))


def has_state(callback: Any) -> bool:
    """Whether ``callback`` defines a ``state_dict`` of its own (the base class's is empty)."""
    method = getattr(type(callback), "state_dict", None)
    return callable(method) and method is not Callback.state_dict


def check_callbacks(callbacks: Iterable[Any], reserved: Iterable[str] = ()) -> list[Any]:
    """The callbacks as a list, after checking that every ``on_*`` method is a hook and that no two callbacks
    with a state of their own (nor a ``reserved`` trainer-state key) share a state key.
    Raises TypeError or ValueError with one line."""
    checked = list(callbacks)
    owners: dict[str, str] = {key: "the trainer" for key in reserved}
    for callback in checked:
        name = type(callback).__name__
        for attr in dir(callback):
            if attr.startswith("on_") and callable(getattr(callback, attr)) and attr not in HOOKS:
                raise TypeError(f"callback {name} has a method {attr}, which is not a hook; allowed: "
                                f"{', '.join(HOOKS)}")
        if has_state(callback):
            key = state_key(callback)
            if key in owners:
                raise ValueError(f"callback {name} saves its state under {key!r}, which {owners[key]} uses; "
                                 "allowed: another state_key")
            owners[key] = f"callback {name}"
    return checked


def callback_states(callbacks: Iterable[Any]) -> dict[str, Any]:
    """``{state_key: state_dict()}`` of every callback whose state is not empty."""
    states = {}
    for callback in callbacks:
        if has_state(callback):
            state = callback.state_dict()
            if state:
                states[state_key(callback)] = state
    return states


def load_callback_states(callbacks: Iterable[Any], saved: dict[str, Any]) -> None:
    """Give every callback its state from a checkpoint's trainer state; one without a saved state stays fresh."""
    for callback in callbacks:
        if has_state(callback) and state_key(callback) in saved:
            callback.load_state_dict(saved[state_key(callback)])


def should_log(step: int, log_every: int, total_steps: int) -> bool:
    """Whether step ``step`` is a logging step: every ``log_every`` steps and the last (every step when
    ``log_every`` is 0)."""
    return not log_every or step % log_every == 0 or step == total_steps


# ---------------------------------------------------------------------- spike scores
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


class SpikeScores(Callback):
    """Adds the spike scores of the training loss and the gradient norm to every record: ``loss_z``,
    ``loss_spike``, ``grad_norm_z``, ``grad_norm_spike`` (:class:`SpikeScore`). Spikes are logged, not acted on.
    Its state is both histories. It reads only the records, in step order, so it never needs a step at once:
    its scores are the same whether a step's record comes right after it or at the next reading step."""

    state_key = "spike_history"

    def __init__(self, window: int = 128, sigmas: float = 6.0):
        self.loss = SpikeScore(window, sigmas)
        self.grad_norm = SpikeScore(window, sigmas)

    def needs_step_end_at_once(self, step: int) -> bool:
        return False

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        loss_z, loss_spike = self.loss.update(record["train_loss"])
        grad_z, grad_spike = self.grad_norm.update(record["grad_norm"])
        record.update(loss_z=loss_z, loss_spike=loss_spike, grad_norm_z=grad_z, grad_norm_spike=grad_spike)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": list(self.loss.history), "grad_norm": list(self.grad_norm.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.history.clear()
        self.loss.history.extend(state["loss"])
        self.grad_norm.history.clear()
        self.grad_norm.history.extend(state["grad_norm"])


# ---------------------------------------------------------------------- achieved TFLOP/s and MFU
class Throughput(Callback):
    """Adds ``achieved_tflops`` (per device) and ``mfu`` to the record of every logging step (every
    ``log_every`` steps and the last; every step when ``log_every`` is 0), from the record's ``tokens_per_s``
    (the mean rate since the previous reading step) and the analytic training FLOPs per token
    (:func:`~spannorm.model.counting.flops_per_token`). Plain arithmetic on numbers the step already has on the
    host: no device sync is added.

    ``mfu`` divides by ``peak_tflops``: the user's ``train.peak_tflops``, else the device table's dense peak
    (CUDA), else a calibration matmul measured once at the start when ``train.measure_peak`` is on (CPU, about
    1 s); with none of these ``mfu`` is null. ``peak_source`` says which one was used. ``note``, when given,
    is printed at the start (a speed warning, such as bf16 on a CPU without bf16 units)."""

    def __init__(self, flops_per_token: int, world_size: int, total_steps: int, log_every: int,
                 peak_tflops: float | None, peak_source: str | None, note: str | None = None):
        self.flops_per_token, self.world_size = flops_per_token, world_size
        self.total_steps, self.log_every = total_steps, log_every
        self.peak_tflops, self.peak_source, self.note = peak_tflops, peak_source, note

    def on_train_start(self, trainer: Any) -> None:
        if self.note:
            trainer.progress.message(self.note)

    def should_log(self, step: int) -> bool:
        return should_log(step, self.log_every, self.total_steps)

    def needs_step_end_at_once(self, step: int) -> bool:
        return False  # a logging step reads anyway

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        if not self.should_log(step) or "tokens_per_s" not in record:
            return
        tflops = self.flops_per_token * record["tokens_per_s"] / self.world_size / 1e12
        record["achieved_tflops"] = tflops
        record["mfu"] = None if self.peak_tflops is None else tflops / self.peak_tflops


class PeakMemory(Callback):
    """Adds ``peak_mem_bytes``, this process's peak memory so far, to the record of every logging step (the
    steps :class:`Throughput` logs): the CUDA allocator's high-water mark on a GPU (a host-side counter read,
    no device sync), the process's peak resident set size on a CPU
    (:func:`~spannorm.hardware.devices.peak_memory_bytes`). Under torchrun it is rank 0's figure."""

    def __init__(self, device: Any, total_steps: int, log_every: int):
        self.device, self.total_steps, self.log_every = device, total_steps, log_every

    def should_log(self, step: int) -> bool:
        return should_log(step, self.log_every, self.total_steps)

    def needs_step_end_at_once(self, step: int) -> bool:
        return False  # a logging step reads anyway, so the figure is taken right after it

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        if self.should_log(step):
            record["peak_mem_bytes"] = peak_memory_bytes(self.device)


# ---------------------------------------------------------------------- the validation-regression warning
VAL_REGRESSION_NATS = 0.1
"""A validation loss this far (nats) above the run's best so far gets a warning line: a run can fall back
toward the unigram loss with finite losses and no spike (SpanNorm at a too-high LR does), which neither
the non-finite check nor the spike score flags."""


class ValidationRegression(Callback):
    """Adds ``val_above_best`` (the validation loss minus the run's best so far, this one included) to every
    evaluation's record, and prints a warning when the loss is more than ``nats`` above the best before it."""

    def __init__(self, nats: float = VAL_REGRESSION_NATS):
        self.nats = nats

    def on_evaluation(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        history = trainer.validation
        loss = record["val_loss"]
        record["val_above_best"] = loss - history.best_loss
        previous = history.previous_best_loss
        if previous is not None and loss > previous + self.nats:
            trainer.progress.warning(f"warning: step {step}: val_loss {loss:.4f} is {loss - previous:.3f} nats "
                                     f"above the run's best ({previous:.4f}); the run may be collapsing (no "
                                     "non-finite value or spike was detected)")


# ---------------------------------------------------------------------- what a run shows
class ProgressDisplay(Callback):
    """The progress bar or log lines of :class:`~spannorm.train.progress.Progress` (rank 0 only), the
    resume lines and a line per evaluation. Other callbacks print through :meth:`message`, and warnings
    through :meth:`warning`, which ``train.progress=none`` does not silence."""

    def __init__(self, mode: str, total_steps: int, log_every: int, enabled: bool = True):
        self.mode, self.total_steps, self.log_every, self.enabled = mode, total_steps, log_every, enabled
        self.progress: Progress | None = None

    def on_train_start(self, trainer: Any) -> None:
        self.progress = Progress(self.mode, self.total_steps, start_step=trainer.step, log_every=self.log_every,
                                 enabled=self.enabled)
        for line in trainer.resume_messages:
            self.message(line)
        for line in trainer.resume_warnings:
            self.warning(line)

    def message(self, text: str) -> None:
        """A line that stays (evaluations, checkpoints, warnings)."""
        if self.progress is not None:
            self.progress.message(text)

    def warning(self, text: str) -> None:
        """A line the user must see: with the progress display, like :meth:`message`; with
        ``train.progress=none`` (which silences progress, not warnings) on stderr. Rank 0 only."""
        if self.progress is None:
            return
        if self.progress.mode == "none":
            if self.enabled:
                print(text, file=sys.stderr, flush=True)
        else:
            self.progress.message(text)

    def on_evaluation(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        self.message(f"step {step}: val_loss {record['val_loss']:.4f} ppl {record['val_ppl']:.2f} "
                     f"bpb {record['val_bpb']:.4f}")

    def needs_step_end_at_once(self, step: int) -> bool:
        return False  # the bar moves at reading steps (logging, evaluation, checkpoint)

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.step(step, record)

    def on_train_end(self, trainer: Any, summary: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


# ---------------------------------------------------------------------- metrics.jsonl and TensorBoard
TENSORBOARD_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "train/tokens_per_s", "achieved_tflops": "train/achieved_tflops",
                    "mfu": "train/mfu", "loss_z": "train/loss_spike_z", "val_loss": "val/loss",
                    "val_ppl": "val/perplexity", "val_bpb": "val/bpb", "balance_loss": "moe/balance_loss",
                    "z_loss": "moe/z_loss"}
"""Record key -> TensorBoard tag of the scalars :class:`MetricsWriter` sends to TensorBoard (finite values
only); ``expert_load`` goes to ``moe/load_layer{L}/expert{E}``."""


class MetricsWriter(Callback):
    """Writes every step's record as one line of ``metrics.jsonl`` (non-finite floats as null) and its
    scalars to TensorBoard (:data:`TENSORBOARD_TAGS`); rank 0 only. On resume it first drops the records
    past the checkpoint (a killed run may have logged steps it never saved). ``tb`` is the TensorBoard writer
    (None when ``train.tensorboard`` is off or before training starts), for callbacks that add their own
    scalars."""

    def __init__(self, tags: dict[str, str] | None = None):
        self.tags = dict(TENSORBOARD_TAGS if tags is None else tags)
        self.tb: Any = None
        self._file: Any = None

    def on_train_start(self, trainer: Any) -> None:
        if not trainer.is_main:
            return
        metrics = trainer.run_folder.metrics
        if trainer.resume_from is not None and metrics.is_file():
            kept = ckpt_io.metrics_lines_up_to(metrics, trainer.step)  # a line cut by a kill is dropped
            ckpt_io.atomic_write_text(metrics, "".join(line + "\n" for line in kept))
        elif metrics.exists():
            metrics.unlink()
        self._file = metrics.open("a")
        if trainer.cfg.train.tensorboard:
            # train.tensorboard=false never needs it.
            # Start-up time: TensorBoard's import takes ~0.7 s.
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(trainer.run_folder.tensorboard),
                                    purge_step=trainer.step + 1 if trainer.resume_from is not None else None)

    def needs_step_end_at_once(self, step: int) -> bool:
        return False  # the lines come in step order, written at each reading step

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self.tb is None:
            return
        for key, tag in self.tags.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(tag, value, step)
        for layer, loads in enumerate(record.get("expert_load", ())):
            for expert, value in enumerate(loads):
                self.tb.add_scalar(f"moe/load_layer{layer}/expert{expert}", value, step)

    def on_train_end(self, trainer: Any, summary: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tb is not None:
            self.tb.close()


__all__ = ["Callback", "HOOKS", "MetricsWriter", "PeakMemory", "ProgressDisplay", "SpikeScore", "SpikeScores",
           "TENSORBOARD_TAGS", "Throughput", "VAL_REGRESSION_NATS", "ValidationRegression", "callback_states",
           "check_callbacks", "has_state", "load_callback_states", "needs_step_end_at_once", "should_log",
           "state_key"]
