"""The unigram reference of a study: the loss of a model that has learned the byte frequencies and nothing else.

A byte-level model that predicts every byte with the training split's byte frequencies has an expected loss
equal to the entropy of that distribution, H = -Σ p(b) ln p(b) nats. A run that ends near H has learned
letter frequencies only ("not learned"); the study asks its best baseline to end at least
:data:`LEARNED_MARGIN` nats below H at every depth.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from spannorm.config import ConfigError
from spannorm.data.dataset import corpus_from_config, prepared_folder, split_point

LEARNED_MARGIN = 1.2
"""The study's "models learn" criterion: the best baseline ends at least this many nats below the unigram loss."""
NOT_LEARNED_MARGIN = 0.1
"""A cell whose mean final val loss is above (unigram loss - this) is flagged "not learned"."""


def byte_unigram_loss(data: bytes) -> float:
    """The entropy (nats) of the byte distribution of ``data``: the loss of predicting its byte frequencies."""
    if not data:
        raise ValueError("the unigram loss of an empty text is undefined")
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log(p)).sum())


@dataclass(frozen=True)
class UnigramReference:
    """A corpus's unigram loss, or the reason it could not be computed."""

    corpus: str
    loss: float | None
    reason: str = ""
    train_bytes: int = 0
    sha256: str | None = None
    """The content hash of the corpus read here (the whole text, as a run's data fingerprint records it)."""


def corpus_label(data_cfg) -> str:
    """A short name for the configured corpus: the file name, or ``embedded Python source``."""
    if data_cfg.path is None:
        return "embedded Python source"
    return str(data_cfg.path).rstrip("/").rsplit("/", 1)[-1]


def unigram_reference(data) -> UnigramReference:
    """The byte-unigram loss of the training split of ``data`` (a :class:`~spannorm.train.config.DataConfig`),
    split as training splits it. Only a byte-level text corpus has one; other data come back with the
    reason."""
    label = corpus_label(data)
    if data.tokenizer != "byte":
        return UnigramReference(label, None, f"tokenizer {data.tokenizer!r}: the byte-unigram reference needs "
                                             "the byte tokenizer")
    if prepared_folder(data) is not None:
        return UnigramReference(label, None, "a prepared token folder: its text is not read here")
    try:
        corpus, _ = corpus_from_config(data)
    except (ConfigError, OSError) as err:
        return UnigramReference(label, None, f"the corpus cannot be read here ({str(err).splitlines()[0]})")
    train = corpus[:split_point(corpus, data.val_fraction)]
    return UnigramReference(label, byte_unigram_loss(train), train_bytes=len(train),
                            sha256=hashlib.sha256(corpus).hexdigest())


__all__ = ["LEARNED_MARGIN", "NOT_LEARNED_MARGIN", "UnigramReference", "byte_unigram_loss", "corpus_label",
           "unigram_reference"]
