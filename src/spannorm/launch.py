"""Launching a training run: :func:`train`, the Python API and what ``spannorm train`` calls, in one process
or in every process of a torchrun launch (:func:`train_distributed`).

This is the layer above the trainer (:mod:`spannorm.train.trainer`), the parallel contexts
(:mod:`spannorm.train.distributed`) and the diagnostics (:mod:`spannorm.diagnostics.callback`): it builds the
callbacks the config asks for (``train.diagnostics_every``) and the parallel context torchrun asks for, and
hands them to the :class:`~spannorm.train.trainer.Trainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch.distributed as dist

from spannorm.config import ConfigError
from spannorm.diagnostics.callback import DiagnosticsCallback
from spannorm.interop.init_from import check_init_target, init_model_from
from spannorm.train.config import RunConfig
from spannorm.train.distributed import (
    DataParallel,
    backend_for,
    check_batch_divides,
    fully_shard_function,
    launch_env,
    resolve_parallel,
)
from spannorm.train.trainer import InitFrom, RunSummary, Trainer, resolve_device

INIT_FROM = InitFrom(check=check_init_target, build=init_model_from)
"""The reader of ``train.init_from`` checkpoints (Hugging Face or spannorm) that every run is given."""


def config_callbacks(cfg: RunConfig) -> list[Any]:
    """The optional callbacks ``cfg`` turns on: the diagnostics of ``train.diagnostics_every``."""
    if cfg.train.diagnostics_every:
        return [DiagnosticsCallback(cfg.train.diagnostics_every)]
    return []


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          callbacks: Iterable[Any] = (), use_intact: bool = False) -> RunSummary:
    """Train ``cfg`` into ``out_dir`` and return the :class:`~spannorm.train.trainer.RunSummary` (also on
    divergence, with ``diverged=True``). Raises :class:`ConfigError` for bad input, before writing anything.

    ``callbacks`` (:mod:`spannorm.train.callbacks`) run in the given order, followed by those the config turns
    on (:func:`config_callbacks`). Under torchrun every process calls it; see :func:`train_distributed`.
    ``use_intact``: resume from the newest intact checkpoint when the latest one is damaged."""
    if launch_env() is not None:
        return train_distributed(cfg, out_dir, resume=resume, overwrite=overwrite, callbacks=callbacks,
                                 use_intact=use_intact)
    return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite,
                   callbacks=[*callbacks, *config_callbacks(cfg)], init_from=INIT_FROM, use_intact=use_intact).run()


def train_distributed(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                      callbacks: Iterable[Any] = (), use_intact: bool = False) -> RunSummary:
    """Run the :class:`~spannorm.train.trainer.Trainer` in this process of a torchrun launch and return the
    :class:`~spannorm.train.trainer.RunSummary` (the same in every process; rank 0 writes the files).

    Initializes the process group from torchrun's variables (NCCL on CUDA, gloo on CPU) unless one is
    already initialized, and destroys it at the end if it made it. Bad input raises :class:`ConfigError` in
    every process before anything is written."""
    env = launch_env()
    if env is None:
        raise RuntimeError("train_distributed needs torchrun's RANK and WORLD_SIZE variables")
    callbacks = [*callbacks, *config_callbacks(cfg)]
    mode = resolve_parallel(cfg.train.parallel, env.world_size)
    if mode == "none":
        return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite, callbacks=callbacks,
                       init_from=INIT_FROM, use_intact=use_intact).run()
    check_batch_divides(cfg.train.batch_size, env.world_size)
    if mode == "fsdp":
        fully_shard_function()
        if cfg.train.diagnostics_every:  # it reads weights outside forward; FSDP2 shards them
            raise ConfigError(f"train.diagnostics_every={cfg.train.diagnostics_every} is invalid with "
                              "train.parallel='fsdp': the stability diagnostics need whole weights; allowed: "
                              "train.parallel=ddp, or train.diagnostics_every=0")
    device = resolve_device(cfg.train.device)
    parallel = DataParallel(mode, env.rank, env.world_size, env.local_rank)
    parallel.place(device)
    made_group = not dist.is_initialized()
    if made_group:
        dist.init_process_group(backend_for(device), device_id=parallel.device if device.type == "cuda" else None)
    try:
        trainer = Trainer(cfg, out_dir, resume=resume, overwrite=overwrite, callbacks=callbacks, parallel=parallel,
                          init_from=INIT_FROM, use_intact=use_intact)
        summary = trainer.run()
        parallel.barrier()  # every process returns once rank 0 has written the summary
        return summary
    finally:
        if made_group:
            dist.destroy_process_group()


__all__ = ["config_callbacks", "train", "train_distributed"]
