"""The data fingerprint: a run records what it trained on (content hash, tokenizer, split sizes), a resume on
other data says so, and a sweep refuses to add runs beside finished ones whose data has changed."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys

import pytest
import yaml

from helpers import TEXT, tiny_run_config, tiny_sweep_base
from spannorm.config import ConfigError
from spannorm.data import dataset as ds
from spannorm.data.prepare import PrepareOptions, prepare
from spannorm.data.tokenizer import ByteTokenizer, bpe_tokenizer, fingerprint
from spannorm.experiments.plan import parse_plan
from spannorm.experiments.report import build_report
from spannorm.experiments.results import load_results
from spannorm.experiments.runner import check_data_unchanged, run_sweep
from spannorm.launch import train
from spannorm.train.checkpoint import latest_checkpoint
from spannorm.train.config import DataConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_run_records_its_data_in_the_summary_and_every_checkpoint(tmp_path):
    cfg = tiny_run_config(tmp_path, "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2")
    train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    data = summary["data"]
    assert data["sha256"] == hashlib.sha256(TEXT).hexdigest() == ds.content_sha256(cfg.data)
    assert data["source"] == str(tmp_path / "corpus.txt") and data["hash_of"] == "text"
    assert data["tokenizer"] == "byte" and "python" not in data  # a file's content does not depend on Python
    assert data["train_tokens"] + data["val_tokens"] == len(TEXT)  # bytes are tokens
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["data"] == data


def test_the_embedded_corpus_names_the_python_that_made_it(tmp_path):
    cfg = DataConfig(embedded_max_bytes=20_000, cache_dir=str(tmp_path / "cache"))
    tokenizer, splits = ds.load_splits(cfg)
    data = ds.data_fingerprint(splits, tokenizer)
    assert data["source"] == "embedded:stdlib" and data["python"] == platform.python_version()
    assert data["sha256"] == ds.content_sha256(cfg)
    assert data["train_tokens"] + data["val_tokens"] == 20_000


def test_a_prepared_folder_is_identified_by_its_shard_hashes(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    folder = tmp_path / "tokens"
    prepare([text], folder, PrepareOptions(tokenizer="byte", document_split="line"), log=lambda _line: None)
    cfg = DataConfig(path=str(folder))
    tokenizer, splits = ds.load_splits(cfg)
    data = ds.data_fingerprint(splits, tokenizer)
    assert data["hash_of"] == "token index" and data["sha256"] == ds.content_sha256(cfg)
    assert data["sha256"] != hashlib.sha256(TEXT).hexdigest()
    assert isinstance(tokenizer, ByteTokenizer) and data["tokenizer"] == "byte"


def test_a_resume_on_edited_text_warns_and_a_moved_copy_does_not(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_run_config(tmp_path, "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2"), run)
    capsys.readouterr()
    moved = tmp_path / "moved" / "corpus.txt"  # the same bytes elsewhere: the same data
    moved.parent.mkdir()
    moved.write_bytes(TEXT)
    train(tiny_run_config(tmp_path, "train.steps=3", "train.checkpoint_every=3", "train.eval_every=3",
                          f"data.path={moved}"), run, resume=True)
    err = capsys.readouterr().err
    assert "other data" not in err and "data.path" in err  # the path is a changed setting, the data is not
    moved.write_bytes(TEXT.replace(b"e", b"E"))  # same size, other content
    train(tiny_run_config(tmp_path, "train.steps=4", "train.checkpoint_every=4", "train.eval_every=4",
                          f"data.path={moved}"), run, resume=True)
    err = capsys.readouterr().err
    old, new = hashlib.sha256(TEXT).hexdigest(), hashlib.sha256(TEXT.replace(b"e", b"E")).hexdigest()
    assert "resumed on other data than the checkpoint's" in err
    assert f"sha256 {old[:12]}... -> {new[:12]}..." in err and "train_tokens" not in err
    data = json.loads((run / "summary.json").read_text())["data"]
    assert data["sha256"] == new  # the data of its last stretch, and before it what it started on
    assert data["earlier"] == [{"sha256": old, "source": str(moved), "until_step": 3}]


def sweep_plan(tmp_path) -> dict:
    base = tiny_sweep_base(tmp_path / "cache")
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TEXT * 4)
    base["config"]["data"] = {"path": str(corpus), "cache_dir": str(tmp_path / "cache")}
    return {"name": "fingerprinted", "base": base,
            "grid": {"placements": ["pre"], "depths": [1], "ffn": {"dense": []}, "lrs": [3e-3], "seeds": [0]},
            "protocol": {"kind": "full"}}


def quiet(_line: str) -> None:
    pass


@pytest.mark.slow
def test_a_sweep_refuses_to_add_runs_beside_finished_ones_whose_data_changed(tmp_path):
    data = sweep_plan(tmp_path)
    ledger = tmp_path / "ledger.jsonl"
    first = run_sweep(parse_plan(data), tmp_path / "a", workers=0, log=quiet, ledger=ledger)
    assert first.executed == ["pre-L1-dense-lr3e-3-s0"] and not first.failed
    data["grid"]["seeds"] = [0, 1]  # one more seed: the same plan, extended
    (tmp_path / "corpus.txt").write_bytes(TEXT * 4 + b"one more line\n")
    kept, index = ledger.read_text(), (tmp_path / "a" / "index.json").read_text()
    message = (r"run pre-L1-dense-lr3e-3-s0 \(in .*\) trained on .*corpus\.txt with content sha256 [0-9a-f]{16}\.\.\., "
               r"but that data now hashes to [0-9a-f]{16}\.\.\.; .*allowed: the data it trained on, or a new --out")
    with pytest.raises(ConfigError, match=message):  # the folder's own summary
        run_sweep(parse_plan(data), tmp_path / "a", workers=0, log=quiet)
    with pytest.raises(ConfigError, match=message.replace(r"\(in .*\)", r"\(in ledger .*\)")):  # folder gone
        run_sweep(parse_plan(data), tmp_path / "b", workers=0, log=quiet, ledger=ledger)
    assert not (tmp_path / "b").exists() and ledger.read_text() == kept
    assert (tmp_path / "a" / "index.json").read_text() == index

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "spannorm", "sweep", str(plan_file), "--out", str(tmp_path / "c"),
                           "--ledger", str(ledger)], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "that data now hashes to" in proc.stderr and not (tmp_path / "c").exists()
    assert proc.stdout == ""  # refused before the setup line, and a dry run says the same
    proc = subprocess.run([sys.executable, "-m", "spannorm", "sweep", str(plan_file), "--out", str(tmp_path / "c"),
                           "--ledger", str(ledger), "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and "that data now hashes to" in proc.stderr, proc.stderr

    (tmp_path / "corpus.txt").write_bytes(TEXT * 4)  # the data restored: the sweep goes on
    again = run_sweep(parse_plan(data), tmp_path / "a", workers=0, log=quiet, ledger=ledger,
                      plan_text=yaml.safe_dump(data))
    assert again.executed == ["pre-L1-dense-lr3e-3-s1"] and again.skipped == ["pre-L1-dense-lr3e-3-s0"]

    # The report says what the runs trained on, and warns when that is not one corpus, or not the one read now.
    sha = hashlib.sha256(TEXT * 4).hexdigest()
    report = build_report(load_results([ledger]), tmp_path / "report").read_text()
    assert f"Data: content sha256 `{sha[:16]}` (2 runs), every one of 2 runs. The unigram loss above was " \
           "computed from the same text." in report and "Warning" not in report
    assert json.loads((tmp_path / "report" / "results.json").read_text())["data_sha256"] == {sha: 2}
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    for line in lines:
        if line["kind"] == "run" and line["spec"]["seed"] == 1:
            line["summary"]["data"]["sha256"] = "0" * 64
            line["summary"]["data"]["earlier"] = [{"sha256": sha, "source": "corpus.txt", "until_step": 2}]
    ledger.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "corpus.txt").write_bytes(TEXT * 5)
    report = build_report(load_results([ledger]), tmp_path / "report2").read_text()
    assert f"`{sha[:16]}` (1 run), `{'0' * 16}` (1 run), every one of 2 runs." in report
    assert "**Warning: the runs trained on 2 versions of this corpus**" in report
    assert "**Warning: 1 run(s) were resumed on other data than they started on** (pre-L1-dense-lr3e-3-s1)" in report
    assert f"**Warning: the corpus read now (sha256 `{hashlib.sha256(TEXT * 5).hexdigest()[:16]}`) is none of them**" \
           in report


def test_the_data_check_reads_unfinished_runs_checkpoints_tokenizer_files_and_unreadable_data(tmp_path):
    data = sweep_plan(tmp_path)
    corpus = tmp_path / "corpus.txt"
    spec, = parse_plan(data).expand({})
    runs_root = tmp_path / "out" / "runs"
    run_dir = runs_root / spec.run_id
    train(tiny_run_config(tmp_path, "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2",
                          f"data.path={corpus}"), run_dir)
    (run_dir / "summary.json").unlink()  # started, not finished: a sweep would resume it from its checkpoint
    check_data_unchanged([spec], runs_root, None)  # the same data: nothing to say
    corpus.write_bytes(TEXT * 4 + b"x")
    with pytest.raises(ConfigError, match=rf"run {spec.run_id} \(in {runs_root}\) trained on .* now hashes to"):
        check_data_unchanged([spec], runs_root, None)

    corpus.unlink()  # gone: refused while the run would still train, ignored once every run is finished
    with pytest.raises(ConfigError, match=r"but that data cannot be read now \(data\.path=.* is invalid"):
        check_data_unchanged([spec], runs_root, None)
    sha = hashlib.sha256(TEXT * 4).hexdigest()
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 2.0,
                                                      "data": {"source": str(corpus), "sha256": sha}}))
    check_data_unchanged([spec], runs_root, None)
    data["grid"]["seeds"] = [0, 1]  # beside it, a finished run from before fingerprints: still nothing to train
    old_spec = parse_plan(data).expand({})[1]
    (runs_root / old_spec.run_id).mkdir()
    (runs_root / old_spec.run_id / "summary.json").write_text(json.dumps({"status": "completed",
                                                                          "final_val_loss": 2.0}))
    check_data_unchanged([spec, old_spec], runs_root, None)
    data["grid"]["seeds"] = [0]

    corpus.write_bytes(TEXT * 4)  # a tokenizer.json edited since: the same text, other tokens
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text(bpe_tokenizer(TEXT * 4, sha, 300, tmp_path / "bpe").to_json())
    data["base"]["config"]["data"]["tokenizer"] = str(tokenizer_file)
    spec, = parse_plan(data).expand({})
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 2.0, "data": {
        "source": str(corpus), "sha256": sha, "tokenizer": "json-sha256:0123456789abcdef"}}))
    with pytest.raises(ConfigError, match=r"and tokenizer json-sha256:0123456789abcdef, but data\.tokenizer=.* is "
                                          r"now json-sha256:[0-9a-f]{16}; allowed: the tokenizer it trained with"):
        check_data_unchanged([spec], runs_root, None)
    tokenizer = bpe_tokenizer(TEXT * 4, sha, 300, tmp_path / "bpe")
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 2.0, "data": {
        "source": str(corpus), "sha256": sha, "tokenizer": fingerprint(tokenizer)}}))
    check_data_unchanged([spec], runs_root, None)
