"""Data-parallel training under ``torchrun``: DDP or FSDP2 (``fully_shard``), one process per device.

``torchrun --nproc_per_node=N -m spannorm train ...`` trains one model with N processes. The batch does not
depend on N: one optimizer step is ``train.batch_size`` × ``train.grad_accum`` sequences whatever the
world size. Every micro-batch of ``batch_size`` windows is drawn from the one seeded stream a single process
draws, and process r keeps rows ``[r·b/N, (r+1)·b/N)`` (:class:`RankSliceSampler`). N processes therefore
take the same optimizer steps as one (up to the order of floating-point sums), and a checkpoint written by N
processes resumes with M: the sampler state, the RNG state and the checkpoint files are the same for any N.

The trainer talks to the process group only through a parallel context: :class:`SingleProcess` (the
default; every hook is the single-process behaviour) or :class:`DataParallel` (under torchrun).
:func:`spannorm.launch.train_distributed` makes the context and the process group under torchrun.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, cast

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from spannorm.config import ConfigError
from spannorm.data.dataset import WindowSampler
from spannorm.data.shards import TokenStream
from spannorm.train import checkpoint as ckpt_io
from spannorm.train.config import PARALLEL_MODES

ENV_RANK, ENV_LOCAL_RANK, ENV_WORLD_SIZE = "RANK", "LOCAL_RANK", "WORLD_SIZE"
"""The variables torchrun sets in every process it starts."""


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a torchrun launch."""

    rank: int
    local_rank: int
    world_size: int


def launch_env() -> LaunchEnv | None:
    """The torchrun variables of this process, or None when it was not started by torchrun (or a launcher
    that sets RANK and WORLD_SIZE the same way)."""
    if ENV_WORLD_SIZE not in os.environ or ENV_RANK not in os.environ:
        return None
    rank, world_size = int(os.environ[ENV_RANK]), int(os.environ[ENV_WORLD_SIZE])
    return LaunchEnv(rank=rank, local_rank=int(os.environ.get(ENV_LOCAL_RANK, rank)), world_size=world_size)


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 of a launch: the process that prints and writes."""
    env = launch_env()
    return env is None or env.rank == 0


def resolve_parallel(parallel: str, world_size: int) -> str:
    """``none``, ``ddp`` or ``fsdp`` for ``train.parallel`` at this world size (``auto``: DDP when there is
    more than one process). Raises :class:`ConfigError` for ``none`` with several processes."""
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"train.parallel={parallel!r} is invalid: allowed: {', '.join(PARALLEL_MODES)}")
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise ConfigError(f"train.parallel='none' is invalid under torchrun with WORLD_SIZE={world_size}: every "
                          "process would train its own copy into the same folder; allowed: auto, ddp, fsdp")
    return parallel


def fully_shard_function():
    """``torch.distributed.fsdp.fully_shard`` (FSDP2); :class:`ConfigError` on a torch without it."""
    try:
        # Optional: torch < 2.6 has no FSDP2 (the ConfigError below); start-up time: it takes seconds to import.
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        raise ConfigError(f"train.parallel='fsdp' is invalid with torch {torch.__version__}: FSDP2 needs "
                          "torch >= 2.6; allowed: ddp") from None
    return fully_shard


def fsdp_mixed_precision(precision: str) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for ``train.precision``: for bf16, parameters all-gathered and used
    in bf16 and gradients reduce-scattered in fp32 (the sharded master weights and AdamW state stay fp32);
    for fp32, None (FSDP2's default: everything in the parameters' dtype, fp32)."""
    if precision != "bf16":
        return None
    # Start-up time: torch.distributed.fsdp takes seconds to import; only FSDP runs need it (after
    # fully_shard_function has checked that it exists).
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def backend_for(device: torch.device) -> str:
    """The process-group backend for a training device: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def check_batch_divides(batch_size: int, world_size: int) -> None:
    """Each process takes ``batch_size / world_size`` rows of every micro-batch, so it must divide."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} is invalid with WORLD_SIZE={world_size}: the "
                          f"micro-batch is split evenly over the processes; allowed: a multiple of {world_size}")


class RankSliceSampler(WindowSampler):
    """Training windows for process ``rank`` of ``world_size``: the whole micro-batch of ``batch_size``
    windows is drawn from the stream a single process draws (seeded with (seed, 0)), and this process keeps
    rows ``[rank·b/N, (rank+1)·b/N)``. The generator state is the same in every process and for every N, so
    a checkpoint's sampler state resumes at any world size; with N = 1 this is exactly :class:`WindowSampler`."""

    def __init__(self, tokens: TokenStream, context_length: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        check_batch_divides(batch_size, world_size)
        super().__init__(tokens, context_length, batch_size, seed)  # the single-process stream
        self.rank, self.world_size = rank, world_size
        self.rows_per_rank = batch_size // world_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's inputs and targets, each of shape (batch_size / world_size, context_length)."""
        inputs, targets = super().next_batch()
        rows = slice(self.rank * self.rows_per_rank, (self.rank + 1) * self.rows_per_rank)
        return inputs[rows].contiguous(), targets[rows].contiguous()


class FullState:
    """A gathered, unsharded state dict standing in for a module or optimizer when a checkpoint is written:
    :func:`spannorm.train.checkpoint.save_checkpoint` reads only ``state_dict()`` (and a model's ``cfg``)."""

    def __init__(self, state: dict[str, Any], cfg: Any = None):
        self._state = state
        self.cfg = cfg

    def state_dict(self) -> dict[str, Any]:
        return self._state


class SingleProcess:
    """The parallel context of a run in one process: every hook does what the single-process trainer does."""

    mode = "none"
    rank = 0
    local_rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """The device this process trains on, given the configured one."""
        return device

    def build_model(self, build: Callable[[], torch.nn.Module], device: torch.device,
                    precision: str = "fp32") -> torch.nn.Module:
        """The freshly initialized model on ``device``: ``build()`` (seeded by the caller) moved there."""
        return build().to(device)

    def wrap_model(self, model: torch.nn.Module, compile: bool = False, precision: str = "fp32") -> torch.nn.Module:
        """The module the training step calls (``model`` itself stays the plain model)."""
        return cast(torch.nn.Module, torch.compile(model)) if compile else model  # typed as returning a callable

    def gradient_sync(self, forward_model: torch.nn.Module, enabled: bool):
        """A context for one micro-step's forward and backward; ``enabled=False`` skips the gradient
        all-reduce (accumulation micro-steps)."""
        return contextlib.nullcontext()

    def train_sampler(self, tokens: TokenStream, context_length: int, batch_size: int, seed: int) -> WindowSampler:
        return RankSliceSampler(tokens, context_length, batch_size, seed, rank=self.rank, world_size=self.world_size)

    def mean_over_ranks(self, *values: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Each tensor averaged over the processes (None stays None)."""
        return values

    def sum_over_ranks(self, *values: float) -> tuple[float, ...]:
        """Each number summed over the processes, in float64 (the numbers themselves in one process)."""
        return values

    def any_rank(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one."""
        return flag

    def agreed_stop(self, reason: str | None) -> str | None:
        """The stop request every process acts on: a reason on all of them when any one was asked to stop."""
        return reason

    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """What the checkpoint writer saves on rank 0: (model, optimizer) or unsharded stand-ins; (None,
        None) on other ranks. Under FSDP every process must call it (it gathers)."""
        return model, optimizer

    def load_checkpoint(self, ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        device: torch.device) -> dict[str, Any]:
        """Load a checkpoint's weights and optimizer state into this process; return its trainer state."""
        return ckpt_io.load_checkpoint(ckpt, model, optimizer, device=device)

    def barrier(self) -> None:
        """Wait for every process."""

    @contextlib.contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """A block that rank 0 runs before the others (it may fill a cache they then read); a
        :class:`ConfigError` raised in it on any process is raised, the same, on every process."""
        yield


class DataParallel(SingleProcess):
    """The parallel context of one process of a torchrun launch, with an initialized process group.

    ``mode="ddp"``: :class:`~torch.nn.parallel.DistributedDataParallel` around the model, gradients
    all-reduced on the last micro-step only (``no_sync`` before). ``mode="fsdp"``: FSDP2 ``fully_shard`` on
    every block and then on the root; parameters, gradients and optimizer state are sharded, gradients are
    reduce-scattered on every micro-step, and checkpoints are gathered into the single-process format."""

    def __init__(self, mode: str, rank: int, world_size: int, local_rank: int = 0):
        if mode not in ("ddp", "fsdp"):
            raise ValueError(f"mode {mode!r} is not 'ddp' or 'fsdp'")
        self.mode, self.rank, self.world_size, self.local_rank = mode, rank, world_size, local_rank
        self.device = torch.device("cpu")

    def place(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        return device

    def build_model(self, build: Callable[[], torch.nn.Module], device: torch.device,
                    precision: str = "fp32") -> torch.nn.Module:
        """Under FSDP2 the model is built on the meta device, sharded (:meth:`shard`), given empty sharded
        storage on ``device`` and filled from the single-process init: rank 0 alone builds ``build()`` on the
        CPU (the same seed and RNG draws as one process), and each tensor in turn is scattered so that every
        process receives its shard (:func:`copy_from_rank_zero`). No device ever holds more than its shards
        plus one full tensor; rank 0's host holds one full fp32 copy while it is copied. The CPU RNG state
        after the build is rank 0's on every process, as if each had built the model. Under DDP: ``build()``
        on every process."""
        if self.mode != "fsdp":
            return super().build_model(build, device, precision)
        with torch.device("meta"):
            model = build()
        self.shard(model, precision)
        model.to_empty(device=device)
        full = build() if self.is_main else None
        rng = torch.get_rng_state().to(device)  # NCCL broadcasts device tensors only
        dist.broadcast(rng, src=0)  # every process continues from the state one process would have
        torch.set_rng_state(rng.cpu())
        copy_from_rank_zero(model, full, device)
        return model

    def shard(self, model: torch.nn.Module, precision: str = "fp32") -> None:
        """FSDP2 ``fully_shard`` on every block, then on the root, with :func:`fsdp_mixed_precision`."""
        fully_shard = fully_shard_function()
        policy = fsdp_mixed_precision(precision)
        options: dict[str, Any] = {} if policy is None else {"mp_policy": policy}
        for block in cast(Iterable[torch.nn.Module], model.blocks):  # __getattr__ is typed Tensor | Module
            fully_shard(block, **options)
        fully_shard(model, **options)  # the root group: embedding, final norm, head

    def wrap_model(self, model: torch.nn.Module, compile: bool = False, precision: str = "fp32") -> torch.nn.Module:
        if self.mode == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # The only buffers (rotary tables) are constants: no broadcast before every forward.
            no_buffer_sync: dict[str, Any] = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})  # torch < 2.13
            wrapped: torch.nn.Module = DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)
        else:
            if not is_sharded(model):  # build_model shards; a model loaded from train.init_from is not yet
                self.shard(model, precision)
            wrapped = model
        return cast(torch.nn.Module, torch.compile(wrapped)) if compile else wrapped  # typed as a callable

    def gradient_sync(self, forward_model: torch.nn.Module, enabled: bool):
        if self.mode == "ddp" and not enabled:
            ddp = cast(DistributedDataParallel, getattr(forward_model, "_orig_mod", forward_model))  # under compile
            return ddp.no_sync()
        return contextlib.nullcontext()

    def mean_over_ranks(self, *values: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        # Start-up time: torch.distributed.tensor takes about a second to import; only FSDP runs need it.
        from torch.distributed.tensor import DTensor

        values = tuple(v.full_tensor() if isinstance(v, DTensor) else v for v in values)  # FSDP2's grad norm
        present = [v for v in values if v is not None]
        if not present:
            return values
        flat = torch.cat([v.detach().float().reshape(-1) for v in present]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        out: list[torch.Tensor | None] = []
        offset = 0
        for value in values:
            if value is None:
                out.append(None)
                continue
            n = value.numel()
            out.append(flat[offset:offset + n].reshape(value.shape))
            offset += n
        return tuple(out)

    def sum_over_ranks(self, *values: float) -> tuple[float, ...]:
        sums = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return tuple(sums.tolist())

    def any_rank(self, flag: bool) -> bool:
        mark = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(mark, op=dist.ReduceOp.MAX)
        return bool(mark.item() > 0)

    def agreed_stop(self, reason: str | None) -> str | None:
        if self.any_rank(reason is not None):
            return reason or "stop requested in another process"
        return None

    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        if self.mode == "ddp":  # replicated: rank 0's own model and optimizer are the full state
            return (model, optimizer) if self.is_main else (None, None)
        # Start-up time: torch.distributed.checkpoint takes seconds to import; only FSDP runs need it.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on rank 0 only
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.is_main:
            return None, None
        return FullState(model_state, cfg=model.cfg), FullState(optimizer_state_by_index(optimizer_state))

    def load_checkpoint(self, ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        device: torch.device) -> dict[str, Any]:
        if self.mode == "ddp":  # every process loads the same files into its replica
            return super().load_checkpoint(ckpt, model, optimizer, device)
        # Start-up time: torch.distributed.checkpoint takes seconds to import; only FSDP runs need it.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=True)  # every process holds the full dicts
        weights: dict[str, Any] = load_file(str(ckpt / ckpt_io.WEIGHTS_NAME), device="cpu")
        set_model_state_dict(model, weights, options=options)
        by_index = ckpt_io.optimizer_from_files(load_file(str(ckpt / ckpt_io.OPTIMIZER_TENSORS_NAME), device="cpu"),
                                                ckpt_io.read_json(ckpt / ckpt_io.OPTIMIZER_META_NAME))
        set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(by_index, model, optimizer),
                                 options=options)
        return ckpt_io.read_json(ckpt / ckpt_io.STATE_NAME)

    def barrier(self) -> None:
        dist.barrier()

    @contextlib.contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        if self.rank != 0:
            agree_on_error(None)  # turn 0: rank 0 runs the block
        message = None
        try:
            yield
        except ConfigError as err:
            message = str(err)
        if self.rank == 0:
            agree_on_error(message)  # turn 0
        agree_on_error(None if self.rank == 0 else message)  # turn 1: the others ran it


# ---------------------------------------------------------------------- sharded materialization
def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``fully_shard`` has been applied to ``model``."""
    # Start-up time: torch.distributed.fsdp takes seconds to import; only FSDP runs call this.
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@torch.no_grad()
def copy_from_rank_zero(model: torch.nn.Module, full: torch.nn.Module | None, device: torch.device) -> None:
    """Fill ``model`` (sharded by FSDP2, storage on ``device``) with rank 0's unsharded ``full`` (None on the
    other ranks), one tensor at a time: rank 0 scatters each parameter's shards (``distribute_tensor``,
    whose source is rank 0), and broadcasts each buffer (not sharded) whole. Every process must call it."""
    # Start-up time: torch.distributed.tensor takes about a second to import; only FSDP runs need it.
    from torch.distributed.tensor import DTensor, distribute_tensor

    sources: dict[str, torch.Tensor] = {}
    if full is not None:
        sources = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    for name, target in [*model.named_parameters(), *model.named_buffers()]:
        shape = target.shape  # a DTensor's shape is the full (global) shape
        if full is not None:
            value = sources[name].detach().to(device=device, dtype=target.dtype)
        else:
            value = torch.empty(shape, dtype=target.dtype, device=device)
        if isinstance(target, DTensor):  # rank 0 scatters the shards (the others' ``value`` is not read)
            target.to_local().copy_(distribute_tensor(value, target.device_mesh, target.placements).to_local())
        else:
            dist.broadcast(value, src=0)
            target.copy_(value)


# ---------------------------------------------------------------------- optimizer state keys
def optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (``get_optimizer_state_dict``) re-keyed by parameter
    index, numbered in param-group order as ``Optimizer.state_dict()`` does: the checkpoint format."""
    index_of: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        indices = []
        for name in group["params"]:
            index_of[name] = len(index_of)
            indices.append(index_of[name])
        groups.append({**group, "params": indices})
    return {"state": {index_of[name]: entries for name, entries in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict[str, Any], model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_index` for ``optimizer``, whose parameters belong to ``model``."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[int(i)]: entries for i, entries in state["state"].items()}, "param_groups": groups}


# ---------------------------------------------------------------------- agreeing on errors
def agree_on_error(message: str | None) -> None:
    """Raise the same :class:`ConfigError` in every process when any one of them failed (``message`` is this
    process's error, or None). Every process must call it."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    for found in messages:
        if found is not None:
            raise ConfigError(found)


__all__ = ["DataParallel", "FullState", "LaunchEnv", "RankSliceSampler", "SingleProcess", "backend_for",
           "agree_on_error", "check_batch_divides", "copy_from_rank_zero", "fsdp_mixed_precision",
           "is_main_process", "is_sharded", "launch_env", "optimizer_state_by_index", "optimizer_state_by_name",
           "resolve_parallel"]
