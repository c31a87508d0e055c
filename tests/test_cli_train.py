"""``spannorm train``, ``eval`` and ``generate`` from the command line: outputs, bad input, README main job."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TEXT
from spannorm.cli.main import main
from spannorm.inference import load_for_inference
from spannorm.train import checkpoint as ckpt_io

README = Path(__file__).resolve().parents[1] / "README.md"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_args(tmp_path, corpus, *extra: str) -> list[str]:
    return ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.context_length=32",
            f"--data.path={corpus}", f"--data.cache_dir={tmp_path / 'cache'}", "--train.batch_size=4",
            "--train.steps=4", "--train.eval_every=2", "--train.eval_batches=2", "--train.checkpoint_every=2",
            "--train.tensorboard=false", "--train.device=cpu", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    """One finished 4-step run, trained once for this module."""
    base = tmp_path_factory.mktemp("trained")
    corpus = base / "corpus.txt"
    corpus.write_bytes(TEXT)
    run = base / "run"
    assert main(["train", "--out", str(run), *tiny_args(base, corpus), "--train.progress=none"]) == 0
    return run


@pytest.fixture
def finished_run(trained_once, tmp_path) -> Path:
    """A private copy of the finished run (tests may resume or overwrite it)."""
    run = tmp_path / "run"
    shutil.copytree(trained_once, run)
    return run


def test_train_cli_writes_a_run_and_prints_the_summary(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    # Both override spellings work: --key=value and --key value.
    assert main(["train", "--out", str(run), *tiny_args(tmp_path, corpus), "--optim.lr", "2e-3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^step 4/4 loss \d+\.\d+ ", out, re.M)  # plain log lines when not on a terminal
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["status"] == "completed"
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    assert ckpt_io.latest_checkpoint(run).name == "step_00000004"


def test_resume_cli_continues_a_run_with_more_steps(finished_run, tmp_path, corpus, capsys):
    assert main(["train", "--out", str(finished_run), "--resume", "--train.steps=6", "--train.progress=plain"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000004 at step 4" in out
    steps = [json.loads(line)["step"] for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _bad_inputs(tmp_path: Path, corpus: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_bytes(b"print('hi')\n" * 3)
    return {
        "missing data path": ([f"--data.path={tmp_path / 'nope.txt'}"], "data.path="),
        "empty file": ([f"--data.path={empty}"], "the file is empty"),
        "corpus shorter than one context": ([f"--data.path={short}"], "is too short"),
        "unknown placement": (["--model.placement=sandwich"], "model.placement='sandwich' is invalid: allowed: pre"),
        "unknown config key": (["--model.n_layer=3"], "model.n_layer is not a known config key"),
        "unknown section": (["--optimizer.lr=3"], "optimizer is not a known config key"),
        "negative learning rate": (["--optim.lr=-1e-3"], "optim.lr=-0.001 is invalid: must be a finite number > 0"),
        "non-numeric value": (["--train.batch_size=lots"], "train.batch_size='lots' is invalid: must be an integer"),
        "non-numeric float": (["--optim.lr=fast"], "optim.lr='fast' is invalid: must be a number"),
        "stray word": (["oops"], "unexpected argument 'oops'"),
    }


BAD_INPUT_CASES = ["missing data path", "empty file", "corpus shorter than one context", "unknown placement",
                   "unknown config key", "unknown section", "negative learning rate", "non-numeric value",
                   "non-numeric float", "stray word"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, corpus, capsys, case):
    extra, fragment = _bad_inputs(tmp_path, corpus)[case]
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), *tiny_args(tmp_path, corpus), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("spannorm: error: ") and fragment in err, err
    assert re.search(r"allowed|must be|write |overrides look like", err)  # says what is allowed
    assert not run.exists()


def test_finished_run_is_not_overwritten_without_a_flag(finished_run, tmp_path, corpus, capsys):
    before = snapshot(finished_run)
    code = main(["train", "--out", str(finished_run), *tiny_args(tmp_path, corpus)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "already holds a completed run of 4 steps" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(finished_run) == before
    assert main(["train", "--out", str(finished_run), "--overwrite", *tiny_args(tmp_path, corpus),
                 "--train.steps=2"]) == 0
    assert json.loads((finished_run / "summary.json").read_text())["steps"] == 2
    assert [p.name for p in ckpt_io.list_checkpoints(finished_run)] == ["step_00000002"]


def test_resume_with_another_architecture_is_refused(finished_run, tmp_path, corpus, capsys):
    before = snapshot(finished_run)
    code = main(["train", "--out", str(finished_run), "--resume", *tiny_args(tmp_path, corpus),
                 "--model.n_layers=3", "--train.steps=6"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "cannot resume" in err and "model.n_layers=2" in err and "asks for 3" in err
    assert snapshot(finished_run) == before


def test_eval_reports_loss_perplexity_and_bits_per_byte(finished_run, capsys):
    capsys.readouterr()
    # With the trainer's evaluation settings (2 batches of 4 evenly spaced windows), eval sees the same
    # windows as the trainer's last evaluation and must agree with it.
    assert main(["eval", str(finished_run), "--json", "--max-batches", "2", "--batch-size", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert report["tokens"] == summary_val_tokens(finished_run) == 2 * 4 * 32
    assert report["corpus_sha256"] == summary["data"]["sha256"]  # scored on the data it trained on
    assert report["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert report["perplexity"] == pytest.approx(torch.tensor(report["loss"]).exp().item(), rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(report["loss"] / 0.6931471805599453)
    assert main(["eval", str(finished_run), "--max-batches", "0"]) == 0  # the whole validation split
    assert "loss" in capsys.readouterr().out
    assert main(["eval", str(finished_run), "--data.path=/does/not/exist"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["eval", str(finished_run), "--model.n_layers=3"]) == 2


def summary_val_tokens(run: Path) -> int:
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    return last["val_tokens"]


def test_generate_continues_the_prompt_reproducibly(finished_run, capsys):
    capsys.readouterr()
    args = ["generate", str(finished_run), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("def ")
    # Greedy decoding equals an argmax loop written here.
    assert main(["generate", str(finished_run), "--prompt", "def ", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    model, _, tokenizer, _ = load_for_inference(finished_run)
    ids = list(b"def ")
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy == tokenizer.decode(ids) + "\n"
    assert main(["generate", str(finished_run / "nothing-here")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def readme_main_job() -> str:
    block = README.read_text().split("# 1. install and run the main job", 1)[1]
    return block.strip().splitlines()[0]


def test_readme_main_job_runs_shortened(tmp_path, monkeypatch, capsys):
    line = readme_main_job()
    commands = [shlex.split(part) for part in line.split("&&")]
    assert commands[0][:2] == ["pip", "install"]
    train_cmd, generate_cmd = commands[1], commands[2]
    assert train_cmd[:4] == ["spannorm", "train", "--preset", "tiny"] and generate_cmd[:2] == ["spannorm", "generate"]
    monkeypatch.chdir(tmp_path)  # runs/tiny lands in the temporary folder
    short = ["--train.steps=3", "--train.batch_size=4", "--train.eval_every=0", "--train.eval_batches=1",
             "--model.context_length=32",
             "--data.embedded_max_bytes=200000", f"--data.cache_dir={tmp_path / 'cache'}"]
    assert main(train_cmd[1:] + short) == 0
    assert main(generate_cmd[1:] + ["--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("def ") or "\ndef " in out
    assert (tmp_path / "runs" / "tiny" / "summary.json").is_file()


def test_bpe_run_saves_its_tokenizer_and_reports_bits_per_byte(tmp_path, corpus, capsys):
    run = tmp_path / "bpe"
    assert main(["train", "--out", str(run), *tiny_args(tmp_path, corpus), "--train.steps=2",
                 "--data.tokenizer=bpe", "--data.bpe_vocab_size=300", "--train.progress=none"]) == 0
    capsys.readouterr()
    assert "vocab_size: 300" in (run / "config.yaml").read_text()
    latest = ckpt_io.latest_checkpoint(run)
    assert (latest / "tokenizer.json").is_file() and (run / "tokenizer.json").is_file()
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["val_bpb"] < record["val_loss"] / 0.6931471805599453 / 1.2  # BPE tokens span > 1.2 bytes
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, run_cfg, tokenizer, _ = load_for_inference(run)
    assert tokenizer.vocab_size == 300 and model.cfg.vocab_size == 300
    assert report["bits_per_byte"] < report["loss"] / 0.6931471805599453
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def ")
