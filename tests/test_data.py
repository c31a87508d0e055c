"""Data pipeline: corpora from disk, tokenizers, the content-keyed token cache, splits and window sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import TEXT
from spannorm.config import ConfigError
from spannorm.data import dataset as ds
from spannorm.data.corpus import embedded_corpus, read_corpus
from spannorm.data.tokenizer import ByteTokenizer, HFTokenizer
from spannorm.train.config import DataConfig


def data_cfg(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "naïve café 🐍\n\tdef f(): pass"
    ids = tok.encode(text.encode())
    assert ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_split_is_deterministic_at_a_line_start_and_tokens_match_text(tmp_path, corpus):
    tok, splits = ds.load_splits(data_cfg(tmp_path, corpus))
    cut = ds.split_point(TEXT, 0.1)
    assert TEXT[cut - 1:cut] == b"\n" and abs(cut - 0.9 * len(TEXT)) < 200
    assert bytes(np.asarray(splits.train, dtype=np.uint8)) == TEXT[:cut]
    assert bytes(np.asarray(splits.val, dtype=np.uint8)) == TEXT[cut:]
    assert splits.train.dtype == np.uint16
    assert isinstance(splits.train, np.memmap)
    assert splits.val_bytes_per_token == 1.0


def test_cache_is_reused_and_keyed_by_content(tmp_path, corpus, monkeypatch):
    cfg = data_cfg(tmp_path, corpus)
    ds.load_splits(cfg)
    folders = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(folders) == 1 and "byte" in folders[0].name

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this corpus")

    monkeypatch.setattr(ByteTokenizer, "encode", refuse)
    _, again = ds.load_splits(cfg)  # served from the cache
    assert len(again.train) + len(again.val) == len(TEXT)
    monkeypatch.undo()
    corpus.write_bytes(TEXT + b"# one more line\n")
    _, changed = ds.load_splits(cfg)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2
    assert len(changed.train) + len(changed.val) == len(TEXT) + 16


def test_folder_corpus_joins_text_files_in_order_and_skips_binary_and_hidden(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second\n")
    (folder / "a.txt").write_text("first\n")
    (folder / "sub" / "c.md").write_text("third\n")
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02")
    (folder / ".hidden").write_text("secret\n")
    assert read_corpus(folder) == b"first\n\nsecond\n\nthird\n"


def _missing(tmp_path):
    return tmp_path / "nope.txt"


def _empty_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    return tmp_path / "empty.txt"


def _binary_only_folder(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "blob.bin").write_bytes(b"\x00\x01")
    return tmp_path / "dir"


@pytest.mark.parametrize("make, fragment", [
    (_missing, "no such file or folder"),
    (_empty_file, "the file is empty"),
    (_binary_only_folder, "the folder holds no text files"),
])
def test_bad_paths_raise_one_line_errors(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as err:
        read_corpus(path)
    assert fragment in str(err.value) and "data.path=" in str(err.value) and "\n" not in str(err.value)


def test_too_short_corpus_is_rejected_for_the_context(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 300 + b"\n" + b"y" * 30)
    _, splits = ds.load_splits(data_cfg(tmp_path, path))
    ds.check_long_enough(splits, 16)
    with pytest.raises(ConfigError, match=r"too short: its val split has \d+ tokens but one window needs 65"):
        ds.check_long_enough(splits, 64)


def test_sampler_is_seeded_resumable_and_shifts_targets(tmp_path, corpus):
    _, splits = ds.load_splits(data_cfg(tmp_path, corpus))
    a = ds.WindowSampler(splits.train, 32, 4, seed=7)
    b = ds.WindowSampler(splits.train, 32, 4, seed=7)
    x1, y1 = a.next_batch()
    x2, _ = b.next_batch()
    assert x1.shape == (4, 32) and (x1 == x2).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()
    text = bytes(x1[0].tolist())
    assert text in TEXT
    state = a.state_dict()
    json.dumps(state)  # JSON-serializable
    expected = [a.next_batch()[0] for _ in range(3)]
    c = ds.WindowSampler(splits.train, 32, 4, seed=7)
    c.load_state_dict(json.loads(json.dumps(state)))
    assert all((c.next_batch()[0] == e).all() for e in expected)
    assert c.batches_drawn == 4
    other_seed = ds.WindowSampler(splits.train, 32, 4, seed=8).next_batch()[0]
    other_rank = ds.WindowSampler(splits.train, 32, 4, seed=7, rank=1, world_size=2).next_batch()[0]
    assert not (other_seed == x1).all() and not (other_rank == x1).all()


def test_eval_batches_are_fixed_non_overlapping_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(ds.eval_batches(tokens, 10, 8))
    inputs = np.concatenate([x.numpy() for x, _ in batches])
    assert len(inputs) == 99  # every window of the split
    assert (inputs[:, 0] == np.arange(0, 990, 10)).all()
    few = np.concatenate([x.numpy() for x, _ in ds.eval_batches(tokens, 10, 4, max_batches=2)])
    assert len(few) == 8 and few[0, 0] == 0 and few[-1, 0] == 980  # evenly spread over the split
    assert [x[:, 0].tolist() for x, _ in ds.eval_batches(tokens, 10, 4, max_batches=2)] == \
           [x[:, 0].tolist() for x, _ in ds.eval_batches(tokens, 10, 4, max_batches=2)]


def test_bpe_is_trained_once_cached_and_lossless(tmp_path, corpus):
    cfg = data_cfg(tmp_path, corpus, tokenizer="bpe", bpe_vocab_size=400)
    tok, splits = ds.load_splits(cfg)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400 and tok.id.startswith("bpe400-")
    assert tok.decode(splits.val) == TEXT[ds.split_point(TEXT, 0.1):].decode()
    assert splits.val_bytes_per_token > 1.2  # merges make tokens longer than one byte
    saved = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert len(saved) == 1
    tok2, _ = ds.load_splits(cfg)
    assert tok2.id == tok.id and (tok2.encode(TEXT[:500]) == tok.encode(TEXT[:500])).all()
    from_disk = ds.tokenizer_from_config(data_cfg(tmp_path, corpus, tokenizer=str(saved[0])))
    assert from_disk.id.startswith("file-") and (from_disk.encode(TEXT[:500]) == tok.encode(TEXT[:500])).all()


def test_tokenizer_json_errors(tmp_path, corpus):
    with pytest.raises(ConfigError, match="no such file"):
        ds.tokenizer_from_config(data_cfg(tmp_path, corpus, tokenizer=str(tmp_path / "t.json")))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a tokenizers JSON file"):
        ds.tokenizer_from_config(data_cfg(tmp_path, corpus, tokenizer=str(tmp_path / "bad.json")))


def test_embedded_corpus_is_real_python_source():
    text = embedded_corpus(200_000)
    assert len(text) == 200_000 and b"def " in text and b"import " in text
