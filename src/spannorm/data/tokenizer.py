"""Tokenizers: byte-level (vocabulary 256, the default), byte-level BPE trained locally with Hugging Face
``tokenizers`` (cached by corpus hash), and any ``tokenizer.json`` from disk.

Every tokenizer has an ``id`` string that, with the corpus hash, keys the token cache, and a
:func:`fingerprint` that a prepared dataset records so a model is never fed another tokenizer's ids."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
from tokenizers import Tokenizer as _HF
from tokenizers import decoders, models, pre_tokenizers, trainers

from spannorm.config import ConfigError
from spannorm.files import atomic_write_text


class Tokenizer(Protocol):
    """What the data pipeline, ``eval`` and ``generate`` need from a tokenizer."""

    id: str
    vocab_size: int

    def encode(self, text: bytes) -> np.ndarray: ...

    def decode(self, ids: list[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """Each byte is a token: vocabulary 256, lossless for any input, one byte per token."""

    id = "byte"
    vocab_size = 256
    eos_id = 0
    """Prepared datasets separate documents with byte 0 (NUL), which text never holds (a source with a NUL
    byte is refused as binary), so the vocabulary stays 256."""

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode("utf-8")
        return np.frombuffer(text, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (for example byte-level BPE)."""

    ENCODE_CHUNK_BYTES = 1 << 20

    def __init__(self, tokenizer, tokenizer_id: str):
        self.tokenizer = tokenizer
        self.id = tokenizer_id
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.tokenizer={str(path)!r} is invalid: no such file; "
                              "allowed: byte, bpe, or the path of a tokenizer.json file")
        raw = path.read_bytes()
        try:
            tok = _HF.from_str(raw.decode("utf-8"))
        except Exception as err:  # tokenizers raises its own exception type
            raise ConfigError(f"data.tokenizer={str(path)!r} is invalid: not a tokenizers JSON file "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        return cls(tok, "file-" + hashlib.sha256(raw).hexdigest()[:16])

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def encode(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        chunks = _split_lines(text, self.ENCODE_CHUNK_BYTES)
        encoded = self.tokenizer.encode_batch(chunks, add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encoded]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _split_lines(text: str, chunk_chars: int) -> list[str]:
    """Split text into chunks of about ``chunk_chars`` characters, each ending at a newline when possible."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            newline = text.find("\n", end)
            end = len(text) if newline < 0 else newline + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def train_bpe(corpus: bytes, vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on ``corpus`` (decoded as UTF-8, invalid bytes replaced)."""
    text = corpus.decode("utf-8", errors="replace")
    return train_bpe_from_iterator(_split_lines(text, 1 << 16), vocab_size)


def train_bpe_from_iterator(texts: Iterable[str], vocab_size: int,
                            special_tokens: tuple[str, ...] = ()) -> HFTokenizer:
    """Train a byte-level BPE tokenizer from an iterator of texts (streamed: memory grows with the number of
    distinct words, not with the corpus); ``special_tokens`` take the first ids."""
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, "")


def bpe_tokenizer(corpus: bytes, corpus_hash: str, vocab_size: int, cache_dir: Path) -> HFTokenizer:
    """The BPE tokenizer of a corpus, trained once and cached as ``cache_dir/tokenizers/bpe{V}-{hash}.json``."""
    tokenizer_id = f"bpe{vocab_size}-{corpus_hash[:16]}"
    path = cache_dir / "tokenizers" / f"{tokenizer_id}.json"
    if path.is_file():
        return HFTokenizer(_HF.from_file(str(path)), tokenizer_id)
    trained = train_bpe(corpus, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, trained.to_json())
    return HFTokenizer(trained.tokenizer, tokenizer_id)


EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


def eos_id(tokenizer: Tokenizer, eos_token: str | None = None) -> int | None:
    """The id that separates documents: byte 0 for the byte tokenizer; for a ``tokenizers`` tokenizer the
    id of ``eos_token``, or of the first of :data:`EOS_CANDIDATES` in its vocabulary (None if none is)."""
    if isinstance(tokenizer, ByteTokenizer):
        return ByteTokenizer.eos_id
    assert isinstance(tokenizer, HFTokenizer)  # the two kinds of tokenizer there are
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    for token in candidates:
        found = tokenizer.tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return None


def fingerprint(tokenizer: Tokenizer) -> str:
    """What identifies a tokenizer across files: ``byte``, or the SHA-256 of its serialized JSON."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    assert isinstance(tokenizer, HFTokenizer)  # the two kinds of tokenizer there are
    return "json-sha256:" + hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:16]


def load_tokenizer_json(path: str | Path) -> HFTokenizer:
    """A tokenizer saved as ``tokenizer.json`` (for example next to a checkpoint)."""
    return HFTokenizer.from_file(path)
