"""`spannorm prepare` and prepared datasets: sources, documents kept apart, shards, resume, tokenizers,
training/eval reading them, and the one-line errors for bad input. All data is made here, tiny."""

from __future__ import annotations

import gzip
import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spannorm.cli.main import main
from spannorm.config import ConfigError
from spannorm.data import dataset as ds
from spannorm.data import prepare as prep
from spannorm.data import shards
from spannorm.data.tokenizer import ByteTokenizer, HFTokenizer, fingerprint
from spannorm.train.config import DataConfig

PARAGRAPHS = [p for p in inspect.getsource(textwrap).split("\n\n") if p.strip()]


def small(**kw) -> prep.PrepareOptions:
    kw.setdefault("shard_mb", 0.004)  # several units even for a few kilobytes
    return prep.PrepareOptions(**kw)


def quiet(*_args) -> None:
    return None


@pytest.fixture
def sources(tmp_path):
    """A folder with the four source kinds, and the list of documents it holds, in reading order."""
    folder = tmp_path / "src"
    folder.mkdir()
    docs = []
    for i in range(3):  # a.txt ... c.txt: one document per file
        text = PARAGRAPHS[i] + "\n"
        (folder / f"{chr(97 + i)}.txt").write_text(text)
        docs.append(text)
    with (folder / "d.jsonl").open("w") as handle:
        for p in PARAGRAPHS[3:40]:
            handle.write(json.dumps({"text": p, "id": 1}) + "\n")
            docs.append(p)
    (folder / "e.json").write_text(json.dumps([{"text": p} for p in PARAGRAPHS[40:45]]))
    docs += PARAGRAPHS[40:45]
    with gzip.open(folder / "f.jsonl.gz", "wt") as handle:
        for p in PARAGRAPHS[45:50]:
            handle.write(json.dumps({"text": p}) + "\n")
    docs += PARAGRAPHS[45:50]
    (folder / ".hidden.txt").write_text("never read")
    return folder, docs


def documents(dataset: shards.PreparedDataset, split: str, eos: int = 0) -> list[str]:
    """The documents of a byte-tokenized split: its tokens cut at the separator, decoded."""
    tokens = np.asarray(dataset.splits[split], dtype=np.uint8)
    assert tokens[0] == eos  # every document is preceded by the separator
    return [part.decode() for part in bytes(tokens).split(bytes([eos]))[1:]]


def test_prepare_keeps_every_document_whole_in_exactly_one_split(tmp_path, sources):
    folder, docs = sources
    index = prep.prepare([folder], tmp_path / "out", small(val_fraction=0.3), log=quiet)
    dataset = shards.open_dataset(tmp_path / "out")
    train, val = documents(dataset, "train"), documents(dataset, "val")
    assert sorted(train + val) == sorted(docs)  # nothing lost, nothing duplicated, each whole
    assert train == [d for d in docs if d in train] and val  # reading order kept within a split
    assert index["splits"]["train"]["documents"] == len(train) and index["splits"]["val"]["documents"] == len(val)
    assert index["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val)
    assert len(index["splits"]["train"]["shards"]) > 1  # small units: several shards
    assert index["tokenizer"]["fingerprint"] == "byte" and index["dtype"] == "uint16"
    assert [s["path"].rsplit("/", 1)[1] for s in index["sources"]] == ["a.txt", "b.txt", "c.txt", "d.jsonl",
                                                                       "e.json", "f.jsonl.gz"]
    assert all(len(s["sha256"]) == 64 for s in index["sources"])
    assert shards.verify_dataset(tmp_path / "out") == sum(len(index["splits"][s]["shards"]) for s in shards.SPLITS)
    assert not list((tmp_path / "out").glob(".*"))  # no state or temporary files left


def test_split_depends_on_the_document_not_its_position(tmp_path, sources):
    folder, docs = sources
    prep.prepare([folder], tmp_path / "one", small(val_fraction=0.3), log=quiet)
    jsonl = tmp_path / "shuffled.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs + docs)))  # duplicates too
    prep.prepare([jsonl], tmp_path / "two", small(val_fraction=0.3), log=quiet)
    val_one = set(documents(shards.open_dataset(tmp_path / "one"), "val"))
    two = shards.open_dataset(tmp_path / "two")
    assert set(documents(two, "val")) == val_one
    assert not set(documents(two, "train")) & val_one  # a duplicated document never straddles the splits


def test_workers_write_the_same_shards_as_one_process(tmp_path, sources):
    folder, _ = sources
    one = prep.prepare([folder], tmp_path / "w1", small(), workers=1, log=quiet)
    two = prep.prepare([folder], tmp_path / "w2", small(), workers=2, log=quiet)
    assert one["splits"] == two["splits"]


def test_a_killed_prepare_resumes_keeping_finished_shards(tmp_path, sources, monkeypatch):
    folder, _ = sources
    reference = prep.prepare([folder], tmp_path / "ref", small(), log=quiet)
    real = prep._tokenize_unit
    calls = []

    def dies_after_two(unit, pieces):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed mid-run
        calls.append(unit)
        return real(unit, pieces)

    monkeypatch.setattr(prep, "_tokenize_unit", dies_after_two)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([folder], out, small(), log=quiet)
    assert not (out / shards.INDEX_NAME).exists()  # not a dataset yet
    with pytest.raises(ConfigError, match="is an unfinished `spannorm prepare`"):  # and never read as one
        ds.load_splits(DataConfig(path=str(out), cache_dir=str(tmp_path / "cache")))
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[01].bin")}
    assert kept
    resumed = []
    monkeypatch.setattr(prep, "_tokenize_unit", lambda unit, pieces: resumed.append(unit) or real(unit, pieces))
    index = prep.prepare([folder], out, small(), log=quiet)
    assert 0 not in resumed and 1 not in resumed and resumed  # finished units were not redone
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[01].bin")} == kept
    assert index["splits"] == reference["splits"]
    with pytest.raises(ConfigError, match="already holds a dataset of other sources or options"):
        prep.prepare([folder], out, small(val_fraction=0.2), log=quiet)


def test_bpe_trained_from_the_sources_with_an_eos_token(tmp_path, sources):
    folder, docs = sources
    index = prep.prepare([folder], tmp_path / "bpe", small(tokenizer="bpe", bpe_vocab_size=400, bpe_sample_mb=0.01),
                         log=quiet)
    tok = HFTokenizer.from_file(tmp_path / "bpe" / "tokenizer.json")
    entry = index["tokenizer"]
    assert entry["vocab_size"] == 400 and entry["fingerprint"] == fingerprint(tok)
    assert entry["eos_id"] == tok.tokenizer.token_to_id(prep.BPE_EOS_TOKEN)
    dataset = shards.open_dataset(tmp_path / "bpe")
    ids = np.asarray(dataset.splits["train"]).astype(np.int64)
    cuts = np.flatnonzero(ids == entry["eos_id"])
    assert len(cuts) == index["splits"]["train"]["documents"] and cuts[0] == 0
    first = tok.decode(ids[1:cuts[1]])
    assert first in docs  # byte-level BPE is lossless
    # the same tokenizer.json given to another prepare is the same tokenizer, with the same separator
    again = prep.prepare([folder], tmp_path / "json", small(tokenizer=str(tmp_path / "bpe" / "tokenizer.json")),
                         log=quiet)
    assert again["tokenizer"]["fingerprint"] == entry["fingerprint"] and again["splits"] == index["splits"]


def test_training_reads_a_prepared_dataset_across_shards(tmp_path, sources):
    folder, _ = sources
    prep.prepare([folder], tmp_path / "out", small(), log=quiet)
    tok, splits = ds.load_splits(DataConfig(path=str(tmp_path / "out" / "index.json")))  # or the folder
    assert isinstance(tok, ByteTokenizer) and isinstance(splits.train, shards.ShardedTokens)
    whole = np.concatenate(splits.train.shards)
    assert len(splits.train) == len(whole)
    boundary = int(splits.train.offsets[1])
    assert np.array_equal(splits.train[boundary - 5:boundary + 7], whole[boundary - 5:boundary + 7])
    sampler = ds.WindowSampler(splits.train, 64, 8, seed=3)
    state = sampler.state_dict()
    inputs, targets = sampler.next_batch()
    sampler.load_state_dict(state)
    again, _ = sampler.next_batch()
    assert np.array_equal(inputs.numpy(), again.numpy())  # resumable exactly
    assert np.array_equal(inputs[:, 1:].numpy(), targets[:, :-1].numpy())
    starts = np.random.default_rng([3, 0]).integers(0, len(whole) - 64, size=8)
    assert np.array_equal(inputs.numpy(), np.stack([whole[s:s + 64] for s in starts]).astype(np.int64))
    assert splits.val_bytes_per_token < 1.0  # separators are tokens without text bytes


def test_a_text_corpus_is_cached_in_the_same_token_format(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(PARAGRAPHS))
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
    _, splits = ds.load_splits(cfg)
    (folder,) = (tmp_path / "cache" / "tokens").iterdir()
    dataset = shards.open_dataset(folder)
    assert np.array_equal(dataset.splits["train"], splits.train) and np.array_equal(dataset.splits["val"], splits.val)


def test_tokenizer_mismatch_is_refused_with_the_dataset_tokenizer_named(tmp_path, sources):
    folder, _ = sources
    prep.prepare([folder], tmp_path / "bpe", small(tokenizer="bpe", bpe_vocab_size=300), log=quiet)
    with pytest.raises(ConfigError, match=r"prepared with tokenizer bpe300 .* but data.tokenizer=byte differs; "
                                          r"allowed: --data.tokenizer=.*tokenizer.json"):
        ds.load_splits(DataConfig(path=str(tmp_path / "bpe")))
    with pytest.raises(ConfigError, match="the model's tokenizer .* differs"):
        ds.load_splits(DataConfig(path=str(tmp_path / "bpe")), tokenizer=ByteTokenizer())
    tok, _ = ds.load_splits(DataConfig(path=str(tmp_path / "bpe"), tokenizer=str(tmp_path / "bpe/tokenizer.json")))
    assert tok.vocab_size == 300


@pytest.mark.parametrize("damage, word", [(lambda p: p.write_bytes(b""), "empty"),
                                          (lambda p: p.write_bytes(p.read_bytes()[:-2]), "corrupt"),
                                          (lambda p: p.unlink(), "missing")])
def test_a_bad_shard_is_named(tmp_path, sources, damage, word):
    folder, _ = sources
    prep.prepare([folder], tmp_path / "out", small(), log=quiet)
    damage(tmp_path / "out" / "train-00001.bin")
    with pytest.raises(ConfigError, match=f"shard train-00001.bin is {word}") as err:
        ds.load_splits(DataConfig(path=str(tmp_path / "out")))
    assert "\n" not in str(err.value)


def test_a_flipped_byte_is_caught_by_verify(tmp_path, sources):
    folder, _ = sources
    prep.prepare([folder], tmp_path / "out", small(), log=quiet)
    shard = tmp_path / "out" / "val-00000.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="shard val-00000.bin is corrupt"):
        shards.verify_dataset(tmp_path / "out")


def test_records_without_the_text_field_stop_or_are_skipped_and_counted(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "one"}\n{"body": "two"}\nnot json\n{"text": "three"}\n')
    with pytest.raises(ConfigError, match=r"x.jsonl' line 2 has no string field 'text'.*--on-bad-record=skip"):
        prep.prepare([jsonl], tmp_path / "stop", small(), log=quiet)
    assert not (tmp_path / "stop").exists()  # stopped before any shard was done: nothing left behind
    not_json = tmp_path / "y.jsonl"
    not_json.write_text('{"text": "one"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"y.jsonl' line 2 is not JSON; allowed: one JSON object per line"):
        prep.prepare([not_json], tmp_path / "stop", small(), log=quiet)
    assert not (tmp_path / "stop").exists()
    index = prep.prepare([jsonl], tmp_path / "skip", small(on_bad_record="skip", val_fraction=0.0), log=quiet)
    assert index["bad_records"] == 2 and index["splits"]["train"]["documents"] == 2
    assert documents(shards.open_dataset(tmp_path / "skip"), "train") == ["one", "three"]
    other = prep.prepare([jsonl], tmp_path / "body", small(text_field="body", on_bad_record="skip",
                                                            val_fraction=0.0), log=quiet)
    assert other["splits"]["train"]["documents"] == 1


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": PARAGRAPHS[:20]}), tmp_path / "t.parquet")
    index = prep.prepare([tmp_path / "t.parquet"], tmp_path / "out", small(text_field="content", val_fraction=0.0),
                         log=quiet)
    assert documents(shards.open_dataset(tmp_path / "out"), "train") == PARAGRAPHS[:20]
    with pytest.raises(ConfigError, match="has no column 'text'"):
        prep.prepare([tmp_path / "t.parquet"], tmp_path / "out2", small(), log=quiet)
    assert index["splits"]["train"]["tokens"] == sum(len(p.encode()) + 1 for p in PARAGRAPHS[:20])


def test_one_text_file_is_split_into_paragraph_or_line_documents(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(PARAGRAPHS) + "\n")
    with pytest.raises(ConfigError, match="is one document.*--documents=paragraph"):
        prep.prepare([path], tmp_path / "one", small(), log=quiet)
    index = prep.prepare([path], tmp_path / "para", small(document_split="paragraph", val_fraction=0.0), log=quiet)
    got = documents(shards.open_dataset(tmp_path / "para"), "train")
    assert [d.strip("\n") for d in got] == [p.strip("\n") for p in PARAGRAPHS]
    assert index["splits"]["train"]["documents"] == len(PARAGRAPHS)


def test_existing_token_files_are_described_with_a_stated_tokenizer(tmp_path):
    folder = tmp_path / "nanogpt"
    folder.mkdir()
    text = "\n".join(PARAGRAPHS).encode()
    np.frombuffer(text[:9000], dtype=np.uint8).astype(np.uint16).tofile(folder / "train.bin")
    np.frombuffer(text[9000:12000], dtype=np.uint8).astype(np.uint16).tofile(folder / "val.bin")
    with pytest.raises(ConfigError, match="is invalid: it is binary .*spannorm prepare --tokens"):
        ds.load_splits(DataConfig(path=str(folder / "train.bin"), cache_dir=str(tmp_path / "cache")))
    prep.describe_token_files(folder, "byte", log=quiet)
    tok, splits = ds.load_splits(DataConfig(path=str(folder)))
    assert bytes(np.asarray(splits.val, dtype=np.uint8)) == text[9000:12000]
    assert splits.val_bytes == 3000 and isinstance(tok, ByteTokenizer)
    big = tmp_path / "big"
    big.mkdir()
    np.array([5, 300, 7], dtype=np.uint16).tofile(big / "train.bin")
    np.array([5, 6], dtype=np.uint16).tofile(big / "val.bin")
    with pytest.raises(ConfigError, match="holds id 300, beyond the vocabulary of --tokenizer=byte"):
        prep.describe_token_files(big, "byte", log=quiet)
    assert not (big / shards.INDEX_NAME).exists()


def _file(name: str, data: bytes):
    def make(folder):
        (folder / name).write_bytes(data)
        return folder / name
    return make


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "nothing", "does not exist"),
    (_file("x.bin", b"\1\2"), ".bin holds token ids"),
    (_file("x.dat", b"ab\0cd"), "binary (a NUL byte"),
])
def test_bad_sources_are_one_line_errors_and_nothing_is_written(tmp_path, capsys, make, fragment):
    source = make(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not out.exists()


def test_prepare_cli_then_train_and_eval_on_it(tmp_path, sources, capsys):
    folder, _ = sources
    out = tmp_path / "data"
    assert main(["prepare", str(folder), "--out", str(out), "--shard-mb", "0.004", "--workers", "2"]) == 0
    assert "prepared" in capsys.readouterr().out
    assert main(["prepare", "--verify", str(out)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), f"--data.path={out}", "--train.steps=2",
                 "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.context_length=32",
                 "--train.batch_size=2", "--train.eval_batches=1", "--train.progress=none"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--split", "all", "--batch-size", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    index = json.loads((out / "index.json").read_text())
    total = index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
    assert report["device"] == "cpu" and report["tokens"] == (total - 1) // 32 * 32  # every window
    assert main(["eval", str(run), "--json"]) == 0
    val_report = json.loads(capsys.readouterr().out)
    assert val_report["tokens"] == (index["splits"]["val"]["tokens"] - 1) // 32 * 32


def test_hugging_face_datasets_sources_made_locally(tmp_path):
    datasets = pytest.importorskip("datasets")
    from spannorm.data.sources import HFSource

    records = [{"text": p, "n": i} for i, p in enumerate(PARAGRAPHS[:30])]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(saved))
    options = small(val_fraction=0.0)
    index = prep.prepare([HFSource(str(saved))], tmp_path / "from_disk", options, log=quiet)
    assert documents(shards.open_dataset(tmp_path / "from_disk"), "train") == PARAGRAPHS[:30]
    assert index["sources"][0]["hf"] == str(saved)
    with pytest.raises(ConfigError, match="has no split 'test'; allowed: --hf-split=train"):
        prep.prepare([HFSource(str(saved), split="test")], tmp_path / "bad", options, log=quiet)
    parquet = tmp_path / "pq"
    parquet.mkdir()
    datasets.Dataset.from_list(records).to_parquet(str(parquet / "part-0.parquet"))
    streamed = prep.prepare([HFSource(str(parquet))], tmp_path / "streamed", options, log=quiet)
    assert streamed["splits"] == index["splits"]


def test_data_md_commands_run(tmp_path, monkeypatch, capsys):
    """docs/data.md's first snippet, on a small folder of text, with the training shortened."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = doc.split("```bash\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"part{i}.txt").write_text("\n\n".join(PARAGRAPHS[i::4]))
    short = ["--train.steps=2", "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2",
             "--train.batch_size=2", "--train.eval_batches=1", "--train.progress=none"]
    lines = [line.split() for line in block.strip().splitlines()]
    assert [line[1] for line in lines] == ["prepare", "prepare", "train", "eval"]
    for words in lines:
        args = words[1:] + (short if words[1] == "train" else [])
        assert main(args) == 0, words
    assert "shards match their checksums" in capsys.readouterr().out


def test_zstd_compressed_jsonl(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    data = "".join(json.dumps({"text": p}) + "\n" for p in PARAGRAPHS[:10]).encode()
    (tmp_path / "x.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    prep.prepare([tmp_path / "x.jsonl.zst"], tmp_path / "out", small(val_fraction=0.0), log=quiet)
    assert documents(shards.open_dataset(tmp_path / "out"), "train") == PARAGRAPHS[:10]
