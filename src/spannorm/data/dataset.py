"""From a :class:`~spannorm.train.config.DataConfig` to token splits and batches.

Every corpus is read through one format, the token folder of :mod:`spannorm.data.shards` (memory-mapped
shards and ``index.json``):

- ``data.path`` naming a folder written by ``spannorm prepare`` is opened as it is; its own train and
  validation documents are the splits, and ``data.tokenizer`` must be the tokenizer it was prepared with;
- a text file or folder (and the embedded corpus, ``data.path`` null) is split by bytes (the last
  ``val_fraction``, starting at a line break) into train and validation text; each part is tokenized once
  and cached as a token folder with one shard per split under
  ``cache_dir/tokens/<content hash>-<tokenizer id>-val<fraction>-shards/``.

Training windows are drawn at random by a seeded :class:`WindowSampler` whose state can be saved and
restored exactly (over several shards a window may span two of them); validation windows are fixed and
evenly spaced.

:func:`data_fingerprint` identifies what a run trained on (the content's SHA-256, the tokenizer, the split
sizes); a run records it in ``summary.json`` and its checkpoints, and :func:`content_sha256` computes the same
hash from a config without tokenizing, so a sweep can tell when the data under a finished run has changed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spannorm.config import ConfigError
from spannorm.data import shards
from spannorm.data.corpus import EMBEDDED_NAME, embedded_corpus, read_corpus
from spannorm.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, bpe_tokenizer, fingerprint

DEFAULT_CACHE_DIR = "~/.cache/spannorm"
SPLITS = ("train", "val")


def resolve_cache_dir(cache_dir: str | None) -> Path:
    """The cache folder: ``cache_dir`` or ``~/.cache/spannorm``. A path that is, or lies under, a file is a
    :class:`ConfigError` naming ``data.cache_dir``."""
    folder = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == folder else f"lies under the file {str(existing)!r}"
                raise ConfigError(f"data.cache_dir={str(folder)!r} is invalid: it {where}; allowed: a folder "
                                  f"(made if missing), or null for {DEFAULT_CACHE_DIR}")
            break
    return folder


@dataclass
class TokenSplits:
    """The tokenized corpus: memory-mapped train and validation token arrays and their byte counts."""

    train: shards.TokenStream
    val: shards.TokenStream
    train_bytes: int
    val_bytes: int
    source: str
    """What the text came from: a path (a text file or folder, or a prepared token folder), or
    ``embedded:stdlib``."""
    corpus_hash: str
    """The SHA-256 of the text (all of it, before the split), or for a prepared token folder of its index's
    split entries, which list every shard's own SHA-256 (:func:`content_sha256`)."""
    prepared: bool = False
    """Whether the splits are a prepared token folder's (``spannorm prepare``), not text tokenized here."""

    def split(self, name: str) -> shards.TokenStream:
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not one of {SPLITS}")
        return self.train if name == "train" else self.val

    @property
    def val_bytes_per_token(self) -> float:
        return self.val_bytes / max(1, len(self.val))


def corpus_from_config(data_cfg) -> tuple[bytes, str]:
    """The corpus bytes and a description of where they came from."""
    if data_cfg.path is None:
        return embedded_corpus(data_cfg.embedded_max_bytes), f"embedded:{EMBEDDED_NAME}"
    return read_corpus(data_cfg.path), str(Path(data_cfg.path).expanduser())


def tokenizer_from_config(data_cfg, corpus: bytes | None = None, corpus_hash: str | None = None) -> Tokenizer:
    """The tokenizer named by ``data.tokenizer``. ``bpe`` needs the corpus (it is trained on it, then cached)."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "bpe":
        if corpus is None:
            corpus, _ = corpus_from_config(data_cfg)
        corpus_hash = corpus_hash or hashlib.sha256(corpus).hexdigest()
        return bpe_tokenizer(corpus, corpus_hash, data_cfg.bpe_vocab_size, resolve_cache_dir(data_cfg.cache_dir))
    return HFTokenizer.from_file(data_cfg.tokenizer)


def _index_sha256(index: dict[str, Any]) -> str:
    """A prepared token folder's content hash: the SHA-256 of its split entries (shard names, sizes, hashes)."""
    return hashlib.sha256(repr(index["splits"]).encode()).hexdigest()


def content_sha256(data_cfg) -> str:
    """The content hash a run on ``data_cfg`` records (:attr:`TokenSplits.corpus_hash`), without tokenizing:
    the text's SHA-256, or a prepared folder's index hash. Reads the text (or the folder's index); a missing
    or unreadable corpus raises as :func:`load_splits` would."""
    folder = prepared_folder(data_cfg)
    if folder is not None:
        return _index_sha256(shards.open_dataset(folder).index)
    corpus, _ = corpus_from_config(data_cfg)
    return hashlib.sha256(corpus).hexdigest()


def data_fingerprint(splits: TokenSplits, tokenizer: Tokenizer) -> dict[str, Any]:
    """What a run trained on, as JSON: ``source`` (a path or ``embedded:stdlib``), ``sha256`` (the content
    hash), ``hash_of`` (``text``, or ``token index`` for a prepared folder), the ``tokenizer``'s fingerprint,
    and the tokens in each split. The embedded corpus is the running interpreter's standard library, so its
    fingerprint also names the ``python`` version that made it."""
    record: dict[str, Any] = {
        "source": splits.source, "sha256": splits.corpus_hash,
        "hash_of": "token index" if splits.prepared else "text",
        "tokenizer": fingerprint(tokenizer),
        "train_tokens": len(splits.train), "val_tokens": len(splits.val)}
    if splits.source == f"embedded:{EMBEDDED_NAME}":
        record["python"] = platform.python_version()
    return record


def split_point(corpus: bytes, val_fraction: float) -> int:
    """The byte offset where validation text starts: the first line start at or after (1 - val_fraction)·n."""
    cut = int(len(corpus) * (1.0 - val_fraction))
    newline = corpus.find(b"\n", cut)
    if 0 <= newline < len(corpus) - 1:
        return newline + 1
    return cut


def prepared_folder(data_cfg) -> Path | None:
    """The token folder ``data.path`` names (a folder holding ``index.json``, or that file), or None."""
    if data_cfg.path is None:
        return None
    path = Path(data_cfg.path).expanduser()
    if path.name == shards.INDEX_NAME and path.is_file():
        path = path.parent
    return path if shards.is_dataset_folder(path) else None


def load_splits(data_cfg, tokenizer: Tokenizer | None = None, corpus: bytes | None = None,
                source: str | None = None) -> tuple[Tokenizer, TokenSplits]:
    """The tokenizer and memory-mapped splits of the configured data: a prepared token folder, or a text
    corpus tokenized once into the cache (see the module docstring). A given ``tokenizer`` (a checkpoint's)
    must be the one a prepared folder was made with."""
    folder = prepared_folder(data_cfg) if corpus is None else None
    if folder is not None:
        return _load_prepared(folder, data_cfg, tokenizer)
    if corpus is None and data_cfg.path is not None and (Path(data_cfg.path).expanduser() / ".prepare").is_dir():
        raise ConfigError(f"data.path={data_cfg.path!r} is an unfinished `spannorm prepare` (no index.json yet); "
                          "allowed: run the same prepare command again to finish it, then train on the folder")
    if corpus is None:
        corpus, source = corpus_from_config(data_cfg)
    corpus_hash = hashlib.sha256(corpus).hexdigest()
    if tokenizer is None:
        tokenizer = tokenizer_from_config(data_cfg, corpus, corpus_hash)
    cut = split_point(corpus, data_cfg.val_fraction)
    parts = {"train": corpus[:cut], "val": corpus[cut:]}
    key = f"{corpus_hash[:32]}-{tokenizer.id}-val{data_cfg.val_fraction:g}-shards"
    folder = resolve_cache_dir(data_cfg.cache_dir) / "tokens" / key
    if not (folder / shards.INDEX_NAME).is_file():
        _write_cache(folder, parts, tokenizer)
    dataset = shards.open_dataset(folder)
    return tokenizer, TokenSplits(train=dataset.splits["train"], val=dataset.splits["val"],
                                  train_bytes=len(parts["train"]), val_bytes=len(parts["val"]),
                                  source=source or "", corpus_hash=corpus_hash)


def _dataset_tokenizer(folder: Path, entry: dict[str, Any], data_cfg, tokenizer: Tokenizer | None) -> Tokenizer:
    """The tokenizer to use with a prepared folder: the given one (a checkpoint's) or data.tokenizer's,
    which must have the folder's fingerprint."""
    own = f"--data.tokenizer={folder / entry['file']}" if entry.get("file") else "--data.tokenizer=byte"
    if tokenizer is None:
        if data_cfg.tokenizer == "bpe":
            raise ConfigError(f"data.tokenizer=bpe trains a tokenizer on text, but data.path={str(folder)!r} is "
                              f"a prepared dataset with its own tokenizer ({entry['name']}); allowed: {own}")
        tokenizer = ByteTokenizer() if data_cfg.tokenizer == "byte" else HFTokenizer.from_file(data_cfg.tokenizer)
        given, allowed = f"data.tokenizer={data_cfg.tokenizer}", f"{own} (the dataset's own)"
    else:
        given = f"the model's tokenizer ({tokenizer.id}, vocabulary {tokenizer.vocab_size})"
        allowed = ("a dataset prepared with the model's tokenizer (spannorm prepare --tokenizer=byte, or "
                   "--tokenizer=RUN/tokenizer.json)")
    if fingerprint(tokenizer) != entry["fingerprint"]:
        raise ConfigError(f"data.path={str(folder)!r} was prepared with tokenizer {entry['name']} "
                          f"({entry['fingerprint']}, vocabulary {entry['vocab_size']}) but {given} differs; "
                          f"allowed: {allowed}")
    return tokenizer


def _load_prepared(folder: Path, data_cfg, tokenizer: Tokenizer | None) -> tuple[Tokenizer, TokenSplits]:
    dataset = shards.open_dataset(folder)
    tokenizer = _dataset_tokenizer(folder, dataset.tokenizer, data_cfg, tokenizer)
    index_hash = _index_sha256(dataset.index)
    return tokenizer, TokenSplits(train=dataset.splits["train"], val=dataset.splits["val"],
                                  train_bytes=dataset.text_bytes("train"), val_bytes=dataset.text_bytes("val"),
                                  source=str(folder), corpus_hash=index_hash, prepared=True)


def _write_cache(folder: Path, parts: dict[str, bytes], tokenizer: Tokenizer) -> None:
    """Tokenize each split and write the token folder atomically (a temporary folder, then a rename)."""
    dtype = shards.token_dtype(tokenizer.vocab_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        splits = {}
        for name, text in parts.items():
            ids = tokenizer.encode(text)
            entries = [shards.write_shard(tmp / f"{name}-00000.bin", ids, dtype)] if len(ids) else []
            splits[name] = shards.split_entry(entries, documents=1, text_bytes=len(text))
        tokenizer_entry = {"name": tokenizer.id, "fingerprint": fingerprint(tokenizer),
                           "vocab_size": int(tokenizer.vocab_size), "eos_id": None, "file": None}
        shards.atomic_write_json(tmp / shards.INDEX_NAME, shards.new_index(tokenizer_entry, dtype, splits))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote the same cache first
            if not (folder / shards.INDEX_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_long_enough(splits: TokenSplits, context_length: int, field_name: str = "data.path") -> None:
    """Each split must hold at least one window of ``context_length`` + 1 tokens."""
    need = context_length + 1
    for name in SPLITS:
        have = len(splits.split(name))
        if have < need:
            raise ConfigError(
                f"{field_name}={splits.source!r} is too short: its {name} split has {have} tokens but one "
                f"window needs {need} (model.context_length={context_length} + 1); allowed: a longer corpus, "
                "a smaller model.context_length or another data.val_fraction")


def _to_batch(tokens: shards.TokenStream, starts: np.ndarray,
              context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([np.asarray(tokens[s:s + context_length + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(windows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class WindowSampler:
    """Random training windows from a seeded generator, resumable exactly through :meth:`state_dict`.

    Rank ``r`` of ``world_size`` data-parallel workers draws from its own stream (seeded with (seed, r)),
    so adding ranks never changes rank 0's windows."""

    def __init__(self, tokens: shards.TokenStream, context_length: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = np.random.default_rng([seed, rank])
        self.batches_drawn = 0
        self.n_starts = len(tokens) - context_length
        if self.n_starts < 1:
            raise ValueError(f"{len(tokens)} tokens hold no window of {context_length + 1}")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each of shape (batch_size, context_length), int64."""
        starts = self.generator.integers(0, self.n_starts, size=self.batch_size)
        self.batches_drawn += 1
        return _to_batch(self.tokens, starts, self.context_length)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable: the generator state and the number of batches drawn."""
        return {"bit_generator": self.generator.bit_generator.state, "batches_drawn": self.batches_drawn,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state["batches_drawn"])


class BatchesAhead:
    """The batches of ``sampler`` on ``device``, each one drawn and sent while the previous one is used: when
    :meth:`next_batch` hands out a batch, the next is drawn at once and its copy to the device is issued
    (``non_blocking``, from pinned host memory on CUDA), so that it travels while the current batch computes.

    The batches and their order are the sampler's own. :meth:`state_dict` is the sampler's state after the
    batches handed out so far (not after the one drawn ahead), so a checkpoint resumes exactly."""

    def __init__(self, sampler: WindowSampler, device: torch.device):
        self.sampler, self.device = sampler, device
        self.pin = device.type == "cuda"
        self._ahead: tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None
        """The batch drawn ahead, with the sampler's state from before it was drawn."""

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.sampler.next_batch()
        if self.pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) on the device; the batch after it is drawn and sent on its way."""
        batch = self._ahead[0] if self._ahead is not None else self._draw()
        state = self.sampler.state_dict()
        self._ahead = (self._draw(), state)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state after the batches handed out (:meth:`WindowSampler.state_dict`)."""
        return self._ahead[1] if self._ahead is not None else self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sampler; the batch drawn ahead, if any, is dropped."""
        self._ahead = None
        self.sampler.load_state_dict(state)


def eval_window_starts(tokens: shards.TokenStream, context_length: int, batch_size: int,
                       max_batches: int | None = None) -> np.ndarray:
    """The start offsets of the fixed, non-overlapping validation windows, evenly spaced over the split:
    ``max_batches · batch_size`` of them, or every window when ``max_batches`` is None."""
    n_windows = (len(tokens) - 1) // context_length
    wanted = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    if wanted < 1:
        return np.zeros(0, dtype=np.int64)
    picks = np.linspace(0, n_windows - 1, wanted).round().astype(np.int64)
    return np.unique(picks) * context_length


def window_batch(tokens: shards.TokenStream, starts: np.ndarray,
                 context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows starting at ``starts`` as (inputs, targets), each of shape (len(starts), context_length)."""
    return _to_batch(tokens, starts, context_length)


def eval_batches(tokens: shards.TokenStream, context_length: int, batch_size: int, max_batches: int | None = None):
    """Fixed, non-overlapping validation windows, evenly spaced over the split; yields (inputs, targets).

    ``max_batches`` None covers the whole split."""
    starts = eval_window_starts(tokens, context_length, batch_size, max_batches)
    for i in range(0, len(starts), batch_size):
        yield _to_batch(tokens, starts[i:i + batch_size], context_length)
