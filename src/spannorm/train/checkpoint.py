"""Checkpoints: safetensors weights, JSON trainer state, optimizer state as safetensors + JSON. No pickles.

A checkpoint is a folder ``RUN/checkpoints/step_00000100/`` (the names are those of
:mod:`spannorm.train.layout`) holding

- ``model.safetensors`` and ``model_config.json`` (the layout of :func:`spannorm.model.io.save_model`, so a
  checkpoint folder is also a model folder for :func:`spannorm.model.io.load_model`);
- ``optimizer.safetensors`` (every tensor of the optimizer state) and ``optimizer.json`` (the rest);
- ``trainer_state.json`` (step, token count, RNG states, the data sampler's position, and the state of every
  callback that has one, such as the spike-score history);
- ``run_config.json`` (the resolved :class:`~spannorm.train.config.RunConfig`);
- ``tokenizer.json`` when the tokenizer is not the byte tokenizer;
- ``checksums.json``, written last: the size and SHA-256 of every file above
  (:mod:`spannorm.model.checksums`), checked whenever the checkpoint is loaded.

Every file is written to a temporary name and renamed, inside a temporary folder that is itself renamed to
``step_XXXXXXXX`` once complete; only then is ``RUN/checkpoints/latest`` (the name of the newest checkpoint)
replaced. A kill at any moment therefore leaves the previous complete checkpoint loadable.

A step folder is written once per run configuration: a folder of the same step left by an earlier writer is
kept only when it is intact and was written under the same run config; otherwise it is replaced (a resume
with changed settings never names a checkpoint of other settings). A damaged checkpoint is refused with the
file named and the newest intact checkpoint of the run offered (:func:`resolve_checkpoint`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from spannorm.config import ConfigError
from spannorm.files import atomic_write, atomic_write_text
from spannorm.model.checksums import MANIFEST_NAME, CorruptCheckpoint, read_json_file, verify_folder, write_manifest
from spannorm.model.io import CONFIG_NAME, WEIGHTS_NAME, load_weights, save_model, save_tensors
from spannorm.train.layout import (
    CHECKPOINTS_DIR,
    LATEST_NAME,
    OPTIMIZER_META_NAME,
    OPTIMIZER_TENSORS_NAME,
    RUN_CONFIG_NAME,
    STATE_NAME,
    STEP_DIR_PATTERN,
    TOKENIZER_NAME,
    step_dir_name,
)

JSON_FILES = (STATE_NAME, RUN_CONFIG_NAME, OPTIMIZER_META_NAME, TOKENIZER_NAME)
"""The JSON files of a checkpoint folder, each parsed by :func:`verify_checkpoint`."""

write_hook: Callable[[str, Path], None] | None = None
"""Test hook, called as ``write_hook(phase, path)`` while a checkpoint is being written (phases:
``files_written`` before the folder rename, ``before_latest`` before the pointer is replaced). Tests use it
to pause a writer and kill it mid-write; it is None in normal use."""


def _hook(phase: str, path: Path) -> None:
    if write_hook is not None:
        write_hook(phase, path)


# ---------------------------------------------------------------------- optimizer state
def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (keyed ``"{param_index}.{name}"``) and JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        plain = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain[name] = value
        meta["state"][str(index)] = plain
    return tensors, meta


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict from :func:`optimizer_to_files`' output."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- RNG states
def rng_states() -> dict[str, Any]:
    """The torch CPU (and CUDA) generator states, base64-encoded for JSON."""
    states = {"torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii")
                                for s in torch.cuda.get_rng_state_all()]
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(states["torch_cpu"]))
    if "torch_cuda" in states and torch.cuda.is_available():
        for device, text in enumerate(states["torch_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(decode(text), device)


# ---------------------------------------------------------------------- writing
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR_PATTERN.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def is_complete(ckpt: Path) -> bool:
    return all((ckpt / name).is_file() for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME, RUN_CONFIG_NAME))


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], run_config: dict[str, Any],
                    tokenizer_json: str | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` of a run, point ``latest`` at it, and delete all but the newest ``keep``."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    if not _reusable(final, step, run_config):
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_model(model, tmp)
            tensors, meta = optimizer_to_files(optimizer)
            atomic_write(tmp / OPTIMIZER_TENSORS_NAME, lambda p: save_tensors(tensors, p, {"format": "pt"}))
            atomic_write_text(tmp / OPTIMIZER_META_NAME, json.dumps(meta))
            if tokenizer_json is not None:
                atomic_write_text(tmp / TOKENIZER_NAME, tokenizer_json)
            atomic_write_text(tmp / RUN_CONFIG_NAME, json.dumps(run_config, indent=2))
            atomic_write_text(tmp / STATE_NAME, json.dumps(trainer_state, indent=2))
            write_manifest(tmp, [p.name for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST_NAME
                                 and not p.name.startswith(".")])
            _hook("files_written", tmp)
            if final.exists():  # written by another writer or under other settings: never the one `latest` names
                old = root / f".{final.name}.old-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _hook("before_latest", final)
    atomic_write_text(root / LATEST_NAME, final.name + "\n")
    prune_checkpoints(run_dir, keep)
    return final


def _reusable(final: Path, step: int, run_config: dict[str, Any]) -> bool:
    """True when ``final`` is an intact checkpoint of ``step`` written under ``run_config`` (a resume that
    retraces the steps a killed writer had already saved); anything else there is replaced."""
    if not (final.is_dir() and is_complete(final) and (final / MANIFEST_NAME).is_file()):
        return False
    try:
        verify_checkpoint(final)
        saved_config = read_json_file(final / RUN_CONFIG_NAME)
        saved_step = read_json_file(final / STATE_NAME).get("step")
    except ConfigError:
        return False
    return saved_step == step and saved_config == json.loads(json.dumps(run_config))


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (never the one ``latest`` names), and
    temporary folders left by killed writers."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    latest = latest_checkpoint(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)
    for leftover in [*root.glob(".step_*.tmp-*"), *root.glob(".step_*.old-*")]:
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(leftover, ignore_errors=True)


def remove_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete what :func:`save_checkpoint` wrote under ``RUN/checkpoints`` (``step_*`` folders holding a
    checkpoint, ``latest``, leftovers of killed writers), and the folder itself once empty: a ``--overwrite``
    never deletes files of the user's that only sit in a folder named ``checkpoints``."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for path in root.iterdir():
        ours = (STEP_DIR_PATTERN.match(path.name) and path.is_dir() and (path / STATE_NAME).is_file()) \
            or path.name.startswith((".step_",)) or (path.name == LATEST_NAME and path.is_file())
        if not ours:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    with contextlib.suppress(OSError):
        root.rmdir()


# ---------------------------------------------------------------------- reading
def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names; if that is missing or incomplete, the newest complete one; else None."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_NAME
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if STEP_DIR_PATTERN.match(candidate.name) and candidate.is_dir() and is_complete(candidate):
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(ckpt: Path) -> None:
    """Raise :class:`CorruptCheckpoint` naming the first damaged file of a checkpoint or model folder
    (checksums, JSON files, tensor names and shapes)."""
    verify_folder(ckpt, JSON_FILES)


def newest_intact_checkpoint(run_dir: str | os.PathLike, *, before: Path | None = None) -> Path | None:
    """The newest checkpoint of a run that passes :func:`verify_checkpoint` (other than ``before``)."""
    for candidate in reversed(list_checkpoints(run_dir)):
        if before is not None and candidate.resolve() == before.resolve():
            continue
        try:
            verify_checkpoint(candidate)
        except ConfigError:
            continue
        return candidate
    return None


def checked_checkpoint(ckpt: Path, run_dir: Path | None, *, use_intact: bool = False,
                       flag: str | None = None) -> Path:
    """``ckpt`` when it is intact. When it is damaged: the newest intact checkpoint of ``run_dir`` if
    ``use_intact`` (a note on stderr says so), else :class:`CorruptCheckpoint` naming the damaged file and
    offering that intact checkpoint."""
    try:
        verify_checkpoint(ckpt)
        return ckpt
    except CorruptCheckpoint as err:
        intact = newest_intact_checkpoint(run_dir, before=ckpt) if run_dir is not None else None
        if intact is None:
            raise CorruptCheckpoint(err.path, err.reason + "; no intact checkpoint was found beside it") from None
        if use_intact:
            print(f"spannorm: note: {err}; using the newest intact checkpoint {intact}", file=sys.stderr)
            return intact
        allowed = f"{flag} to use it, or name that folder" if flag else "name that folder instead"
        raise CorruptCheckpoint(err.path, f"{err.reason}; the newest intact checkpoint is {str(intact)!r}; "
                                          f"allowed: {allowed}") from None


def resolve_checkpoint(path: str | os.PathLike, *, use_intact: bool = False) -> Path | None:
    """A run folder (its latest checkpoint), a checkpoint folder, or a model folder; None if none of these.
    A damaged one raises :class:`CorruptCheckpoint` (see :func:`checked_checkpoint`)."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(path)
        return None if latest is None else checked_checkpoint(latest, path, use_intact=use_intact)
    if (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file():
        in_run = path.parent.name == CHECKPOINTS_DIR and STEP_DIR_PATTERN.match(path.name)
        return checked_checkpoint(path, path.parent.parent if in_run else None, use_intact=use_intact)
    return None


def resume_checkpoint(run_dir: str | os.PathLike, *, use_intact: bool = False) -> Path | None:
    """The checkpoint a ``--resume`` continues from: the latest one, checked (see :func:`checked_checkpoint`,
    whose ``use_intact`` is ``--use-intact``); None when the run has none."""
    latest = latest_checkpoint(run_dir)
    return None if latest is None else checked_checkpoint(latest, Path(run_dir), use_intact=use_intact,
                                                          flag="--use-intact")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; :class:`CorruptCheckpoint` naming the file when it is not one."""
    return read_json_file(path)


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights (strictly) and optimizer state from a checkpoint folder; return its trainer state."""
    model.load_state_dict(load_weights(ckpt / WEIGHTS_NAME, device), strict=True)
    if optimizer is not None:
        tensors = load_weights(ckpt / OPTIMIZER_TENSORS_NAME, "cpu")
        meta = read_json(ckpt / OPTIMIZER_META_NAME)
        try:
            optimizer.load_state_dict(optimizer_from_files(tensors, meta))
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CorruptCheckpoint(ckpt / OPTIMIZER_META_NAME, f"does not fit the optimizer ({err})") from None
    return read_json(ckpt / STATE_NAME)


def metrics_lines_up_to(path: Path, step: int) -> list[str]:
    """The records of ``metrics.jsonl`` up to ``step`` (a killed run may have logged steps it never saved);
    a line cut by a kill, or otherwise unreadable, is dropped rather than failing the resume."""
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step:
            kept.append(line)
    return kept
