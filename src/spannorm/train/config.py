"""Run configuration: typed dataclasses for the model, the data, the optimizer and the training loop.

A run is resolved in layers: the dataclass defaults, then a named preset (``spannorm/presets/NAME.yaml``),
then a YAML config file, then dotted command-line overrides such as ``model.n_layers=24``. Every value is
coerced to its field's type and validated in one place, by :func:`spannorm.configuration.build`; errors are
:class:`ConfigError` with a one-line message that names the field, the value and what is allowed.

``train.init_from`` puts the checkpoint's model section between the preset and the config file. Reading a
checkpoint is the interop layer's job, above this one: :func:`resolve_config` takes the function that reads
it (``spannorm.interop.init_from.run_config_layer``) as an argument from the command that resolves the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from spannorm.config import ConfigError, ModelConfig, MoEConfig, says_names_1, upgrade_model_mapping, upgrade_override
from spannorm.configuration import MAX_SEED, build, check_fields, fail, merge, parse_override
from spannorm.configuration import apply_overrides as _apply_overrides
from spannorm.train.layout import CHECKPOINTS_DIR, CONFIG_NAME, METRICS_NAME, SUMMARY_NAME

Schedule = Literal["cosine", "wsd", "constant"]
Precision = Literal["fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
ProgressMode = Literal["auto", "bar", "plain", "none"]
ParallelMode = Literal["auto", "none", "ddp", "fsdp"]
SCHEDULES = typing.get_args(Schedule)
PRECISIONS = typing.get_args(Precision)
DEVICES = typing.get_args(Device)
PROGRESS_MODES = typing.get_args(ProgressMode)
PARALLEL_MODES = typing.get_args(ParallelMode)
TOKENIZER_KINDS = ("byte", "bpe")


MAX_MICRO_BATCH_TOKENS = 2**24
"""The most tokens (train.batch_size × model.context_length) one micro-batch may hold: 16,777,216, 32× a
GPT-2-small micro-batch of 512 × 1024. Larger steps are made with train.grad_accum. The bound refuses a typo
such as batch_size=1e8 before the run folder is written or the batch is allocated."""


def _check_positive_int(path: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        fail(path, value, f"must be an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}"))
    if maximum is not None and value > maximum:
        fail(path, value, f"must be an integer >= {minimum} and <= {maximum}")


def _check_number(path: str, value: Any, *, low: float, high: float = math.inf,
                  low_inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and value <= high
    if not ok:
        bound = ">=" if low_inclusive else ">"
        upper = "" if high == math.inf else f" and <= {high:g}"
        fail(path, value, f"must be a finite number {bound} {low:g}{upper}")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    path: str | None = None
    """A text file or a folder of text files. None: the embedded corpus (the standard library's source)."""
    tokenizer: str = "byte"
    """``byte`` (vocabulary 256), ``bpe`` (byte-level BPE trained locally on the corpus and cached), or the
    path of a Hugging Face ``tokenizer.json``. The model's vocab_size is set from the tokenizer."""
    bpe_vocab_size: int = 4096
    """Vocabulary size of a locally trained BPE tokenizer."""
    val_fraction: float = 0.1
    """The last fraction of the token stream is the validation split."""
    cache_dir: str | None = None
    """Where token caches and trained tokenizers live. None: ``~/.cache/spannorm``."""
    embedded_max_bytes: int = 4_000_000
    """How much of the embedded corpus to use."""

    def validate(self, prefix: str = "data") -> None:
        check_fields(self, prefix)
        if self.path is not None and not str(self.path).strip():
            fail(f"{prefix}.path", self.path, "must name a text file or folder, or be null (embedded corpus)")
        if self.tokenizer not in TOKENIZER_KINDS and not str(self.tokenizer).endswith(".json"):
            fail(f"{prefix}.tokenizer", self.tokenizer,
                  "allowed: byte, bpe, or the path of a tokenizer.json file")
        _check_positive_int(f"{prefix}.bpe_vocab_size", self.bpe_vocab_size, minimum=257)
        _check_number(f"{prefix}.val_fraction", self.val_fraction, low=0.0, high=0.5, low_inclusive=False)
        _check_positive_int(f"{prefix}.embedded_max_bytes", self.embedded_max_bytes)


@dataclass
class OptimConfig:
    """AdamW (weight decay on matrices only) and the learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr·min_lr_ratio."""
    schedule: Schedule = "cosine"
    """``cosine`` (warmup, then cosine decay), ``wsd`` (warmup, stable, then linear decay) or ``constant``."""
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """WSD only: the fraction of the steps spent in the final decay."""
    weight_decay: float = 0.1
    """Applied to parameters with two or more dimensions (matrices, embeddings, stacked experts) only."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: bool | None = None
    """PyTorch's fused AdamW kernel (one kernel for all parameters; it skips a non-finite step on the device,
    so a step that does not log reads nothing to the host): true or false, or None (the default) for the fused
    kernel on CUDA only. The fused kernel changes the last digits of fp32 losses against the for-loop kernel."""

    def validate(self, prefix: str = "optim") -> None:
        check_fields(self, prefix)
        _check_number(f"{prefix}.lr", self.lr, low=0.0, low_inclusive=False)
        _check_number(f"{prefix}.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _check_positive_int(f"{prefix}.warmup_steps", self.warmup_steps, minimum=0)
        _check_number(f"{prefix}.decay_fraction", self.decay_fraction, low=0.0, high=1.0)
        _check_number(f"{prefix}.weight_decay", self.weight_decay, low=0.0)
        _check_number(f"{prefix}.beta1", self.beta1, low=0.0, high=1.0)
        _check_number(f"{prefix}.beta2", self.beta2, low=0.0, high=1.0)
        _check_number(f"{prefix}.eps", self.eps, low=0.0, low_inclusive=False)
        _check_number(f"{prefix}.grad_clip", self.grad_clip, low=0.0)


@dataclass
class TrainConfig:
    """The training loop: budget, batch, precision, evaluation, checkpoints and display."""

    steps: int = 1000
    """Optimizer steps in the whole run (the schedule spans them; a resumed run continues to this step)."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seeds the model init, the window sampler and generation."""
    precision: Precision = "fp32"
    """``fp32`` or ``bf16`` (autocast on CPU and CUDA; weights and optimizer state stay fp32)."""
    device: Device = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    tf32: bool = True
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation); false: full fp32. Ignored on CPU."""
    activation_checkpointing: int = 0
    """Recompute every k-th block's activations (blocks 0, k, 2k, ...) in backward instead of keeping them:
    0 none, 1 every block. Same loss and gradients; less memory for about one more forward of those blocks."""
    loss_chunk_tokens: int = 0
    """Compute the loss this many tokens at a time, so that the logits are never all held (in fp32 or for
    backward); same FLOPs, equal loss up to summation order. 0: all logits at once."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for the ``mfu`` of metrics.jsonl; null: the device table (CUDA), or the measured
    peak when ``measure_peak`` is on, else ``mfu`` is null (``achieved_tflops`` is always logged)."""
    measure_peak: bool = False
    """Measure the peak by a calibration matmul at the start (about a second; for CPUs, which have no table)."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps, and at the end; 0: only at the end."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation (fixed, evenly spaced windows of the split)."""
    log_every: int = 10
    """Plain log lines (when not on a terminal) every this many steps."""
    checkpoint_every: int = 500
    """Write a checkpoint every this many steps, and at the end; 0: only at the end."""
    keep_checkpoints: int = 2
    """Keep the last K checkpoints."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``OUT/tensorboard``."""
    progress: ProgressMode = "auto"
    """``auto`` (a bar on a terminal, plain lines otherwise), ``bar``, ``plain`` or ``none``."""
    spike_window: int = 128
    """Steps of history for the spike score (SPEC §6): a value above mean + spike_sigmas·σ is a spike."""
    spike_sigmas: float = 6.0
    diagnostics_every: int = 0
    """Measure the stability statistics of SPEC §6 (:class:`spannorm.diagnostics.callback.DiagnosticsCallback`)
    every this many steps, into metrics.jsonl (``diag/...``) and TensorBoard; 0: off."""
    parallel: ParallelMode = "auto"
    """Data parallelism under torchrun: ``auto`` (DDP when WORLD_SIZE > 1), ``ddp``, ``fsdp`` (FSDP2
    ``fully_shard``) or ``none``; a run outside torchrun is one process. See docs/training.md."""
    init_from: str | None = None
    """Start from the weights in this folder: a spannorm model, checkpoint or run folder, or a Hugging Face
    Llama/Mistral/Qwen2 folder. The model section then starts from the checkpoint's (and data.tokenizer from
    its tokenizer.json); another placement converts it with new norms at identity (docs/interop.md)."""

    def validate(self, prefix: str = "train") -> None:
        check_fields(self, prefix)
        _check_positive_int(f"{prefix}.steps", self.steps)
        _check_positive_int(f"{prefix}.batch_size", self.batch_size)
        _check_positive_int(f"{prefix}.grad_accum", self.grad_accum)
        _check_positive_int(f"{prefix}.seed", self.seed, minimum=0, maximum=MAX_SEED)
        for name in ("eval_every", "log_every", "checkpoint_every", "diagnostics_every",
                     "activation_checkpointing", "loss_chunk_tokens"):
            _check_positive_int(f"{prefix}.{name}", getattr(self, name), minimum=0)
        _check_positive_int(f"{prefix}.eval_batches", self.eval_batches)
        if self.peak_tflops is not None:
            _check_number(f"{prefix}.peak_tflops", self.peak_tflops, low=0.0, low_inclusive=False)
        _check_positive_int(f"{prefix}.keep_checkpoints", self.keep_checkpoints)
        _check_positive_int(f"{prefix}.spike_window", self.spike_window, minimum=2)
        _check_number(f"{prefix}.spike_sigmas", self.spike_sigmas, low=0.0, low_inclusive=False)
        if self.init_from is not None and not str(self.init_from).strip():
            fail(f"{prefix}.init_from", self.init_from, "must name a checkpoint folder, or be null")



@dataclass
class RunConfig:
    """Everything a training run needs. ``to_dict``/``from_dict`` round-trip through plain YAML/JSON types."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        micro_batch_tokens = self.train.batch_size * self.model.context_length
        if micro_batch_tokens > MAX_MICRO_BATCH_TOKENS:
            fail("train.batch_size", self.train.batch_size,
                 f"batch_size × model.context_length ({self.model.context_length}) = {micro_batch_tokens} tokens "
                 f"per micro-batch; allowed: at most {MAX_MICRO_BATCH_TOKENS} (use train.grad_accum for larger "
                 "steps)")

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.model.context_length

    def to_dict(self) -> dict[str, Any]:
        data = {**dataclasses.asdict(self), "model": self.model.to_dict()}  # model: optional fields only when set
        if self.optim.fused is None:  # unset: run configs stay as they were before the switch existed
            del data["optim"]["fused"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Build and validate a config from nested dicts (missing fields keep their defaults)."""
        return build(cls, data or {}, "")

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "RunConfig":
        """Build from a run config a checkpoint saved (``run_config.json``): as :meth:`from_dict`, with the model
        section read by :meth:`ModelConfig.from_saved` (the head it was trained with, also from before
        ``model.head_init`` existed)."""
        data = dict(data or {})
        if isinstance(data.get("model"), dict):
            data["model"] = ModelConfig.from_saved(data["model"]).to_dict()
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


# ---------------------------------------------------------------------- presets, files, overrides
def preset_names() -> list[str]:
    """Names of the presets shipped in ``spannorm/presets``."""
    folder = resources.files("spannorm") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The nested dict of a named preset."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"preset {name!r} does not exist; allowed: {', '.join(names)}")
    text = (resources.files("spannorm") / "presets" / f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The nested dict of a YAML config file (also accepts a directory, for its ``config.yaml``). A run folder's
    (one with checkpoints, a summary or metrics) is a config spannorm saved: its model section is read as
    :meth:`ModelConfig.from_saved` reads one, so that a run written before placement names 2 continues as the
    model it is."""
    path = Path(path)
    if path.is_dir():
        data = load_config_file(path / CONFIG_NAME)
        model = data.get("model")
        run_folder = ((path / CHECKPOINTS_DIR).is_dir() or (path / SUMMARY_NAME).is_file()
                      or (path / METRICS_NAME).is_file())
        if run_folder and isinstance(model, dict) and "placement_names" not in model:
            data = {**data, "model": upgrade_model_mapping(model)}
        return data
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; name a YAML file with model/data/optim/train")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping with keys model, data, optim, train")
    model = data.get("model")
    if isinstance(model, dict) and says_names_1(model.get("placement_names")):
        data = {**data, "model": upgrade_model_mapping(model)}  # read here, so later layers use today's names
    return data


def upgrade_override_layer(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Dotted overrides as given; where one of them is ``model.placement_names=1``, all of them read with version
    1's names (see :data:`spannorm.config.PLACEMENT_NAMES`) and rewritten in today's, that one dropped."""
    def is_v1(text: str) -> bool:
        key, _, value = text.partition("=")
        return key.strip().removeprefix("--") == "model.placement_names" and says_names_1(value)

    if not any(is_v1(o) for o in overrides):
        return list(overrides)
    return [upgrade_override(o.strip().removeprefix("--")) for o in overrides if not is_v1(o)]


def _check_keys(data: dict[str, Any], source: str) -> None:
    for key in data:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key} in {source} is not a known config section{hint}; "
                              f"allowed: {', '.join(SECTIONS)}")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply dotted overrides (``section.field=value``) to a nested run-config dict. Values stay strings;
    :func:`RunConfig.from_dict` coerces them. Unknown keys fail here, so the message names the override."""
    return _apply_overrides(data, overrides, RunConfig)


InitFromLayer = Callable[[str], dict[str, Any]]
"""Reads the config layer of a ``train.init_from`` checkpoint: its model section, and its tokenizer as
``data.tokenizer`` (``spannorm.interop.init_from.run_config_layer``)."""


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = (),
                   init_from_layer: InitFromLayer | None = None) -> RunConfig:
    """Defaults, then the preset, then the config file, then the dotted overrides; validated.

    With ``train.init_from`` (from any layer) and ``init_from_layer``, the layer that function reads from the
    checkpoint (its model section and tokenizer) goes between the preset and the config file: a preset is a
    recipe for training, so it never resizes the model being continued, while a config file and overrides,
    which the user wrote for this run, still win. Without ``init_from_layer`` the checkpoint is not read."""
    preset_layer: dict[str, Any] = {}
    if preset:
        preset_layer = load_preset(preset)
        _check_keys(preset_layer, f"preset {preset!r}")
    explicit: dict[str, Any] = {}
    if config_file:
        explicit = load_config_file(config_file)
        _check_keys(explicit, f"config file {str(config_file)!r}")
    explicit = apply_overrides(explicit, upgrade_override_layer(overrides))
    data = merge(preset_layer, explicit)
    init_from = (data.get("train") or {}).get("init_from")
    # A missing folder is reported by the trainer, except on resume, which needs only the run's own checkpoint.
    if (init_from_layer is not None and isinstance(init_from, str) and init_from.strip()
            and Path(init_from).exists()):
        data = merge(merge(preset_layer, init_from_layer(init_from)), explicit)
    return RunConfig.from_dict(data)


__all__ = ["DataConfig", "MoEConfig", "OptimConfig", "RunConfig", "TrainConfig", "apply_overrides",
           "load_config_file", "load_preset", "parse_override", "preset_names", "resolve_config"]
