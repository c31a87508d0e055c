"""``spannorm generate``: several prompts, a prompts file, n samples, stop strings, JSON output, the device
default with its CPU fallback, the speed line, and bad input (one line, exit 2)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from spannorm.cli.main import main
from spannorm.config import ModelConfig
from spannorm.data.tokenizer import train_bpe
from spannorm.inference import Sampling, generate_batch, load_for_inference, run_device
from spannorm.model import SpanNormLM
from spannorm.model.io import save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    save_model(SpanNormLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, context_length=32, placement="span",
                                      tie_embeddings=False)), folder)
    return folder


def test_greedy_json_output_equals_generate_batch(model_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("the cat\n\nsat on\n")
    assert main(["generate", str(model_dir), "--prompt", "def ", "--prompts-file", str(prompts_file),
                 "--temperature", "0", "--max-new-tokens", "6", "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(0, 0), (1, 0), (2, 0)]
    model, _, tokenizer, _ = load_for_inference(model_dir)
    expected = generate_batch(model, [list(b"def "), list(b"the cat"), list(b"sat on")], 6, Sampling(0.0))
    assert [r["tokens"] for r in rows] == [c.tokens for c in expected.completions]
    assert [r["text"] for r in rows] == [tokenizer.decode(c.tokens) for c in expected.completions]
    speed = captured.err.strip().splitlines()[-1]
    assert speed.startswith("18 tokens in ") and "tokens/s (3 samples, KV cache, cpu)" in speed


def test_n_samples_per_prompt_are_printed_under_headers_and_reproduce(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "ab", "--prompt", "xyz", "-n", "2", "--max-new-tokens", "8",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("=== prompt")]
    assert headers[0].startswith("=== prompt 1, sample 1") and headers[3].startswith("=== prompt 2, sample 2")
    assert len(headers) == 4
    assert main(args + ["--no-cache"]) == 0
    assert capsys.readouterr().out == out  # same tokens without the cache


def test_a_stop_string_cuts_the_text(model_dir, capsys):
    base = ["generate", str(model_dir), "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "12",
            "--json"]
    assert main(base) == 0
    free = json.loads(capsys.readouterr().out)
    stop = free["text"][4:6]
    assert main(base + ["--stop", stop]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["stop"] == "string" and cut["text"] == free["text"].split(stop, 1)[0]
    assert main(base + ["--stop-token", str(free["tokens"][2])]) == 0
    by_token = json.loads(capsys.readouterr().out)
    first_stop = free["tokens"].index(free["tokens"][2])
    assert by_token["stop"] == "token" and by_token["tokens"] == free["tokens"][:first_stop + 1]


def test_cuda_asked_for_without_cuda_falls_back_to_the_cpu_with_a_note(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", str(model_dir), "--device", "cuda", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "note: --device is cuda, which is not available here; running on the CPU"
    run = model_dir.parent / "run_ckpt"
    shutil.copytree(model_dir, run, dirs_exist_ok=True)
    (run / "run_config.json").write_text(json.dumps({"train": {"device": "cuda"}}))
    assert run_device(run) == ("cpu", "note: the run's device is cuda, which is not available here; "
                                      "running on the CPU")
    assert run_device(model_dir) == ("cpu", None)  # a bare model folder: auto


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "nan"], "--temperature=nan is invalid"),
    (["--temperature", "-0.5"], "--temperature=-0.5 is invalid"),
    (["--temperature", "inf"], "--temperature=inf is invalid"),
    (["--top-p", "0"], "--top-p=0.0 is invalid"),
    (["--top-p", "1.5"], "--top-p=1.5 is invalid"),
    (["-n", "0"], "--num-samples=0"),
    (["--stop-token", "256"], "--stop-token=[256] is invalid"),
    (["--prompts-file", "/does/not/exist"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(model_dir, extra, message, capsys):
    assert main(["generate", str(model_dir), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err


def test_a_prompts_file_that_is_not_utf8_is_refused(model_dir, tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"fine\nbad \xff\xfe bytes\n")
    assert main(["generate", str(model_dir), "--prompts-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("line 2 is not UTF-8; allowed: a UTF-8 text file, one prompt per line")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(model_dir, tmp_path, capsys):
    folder = tmp_path / "mismatch"
    shutil.copytree(model_dir, folder)
    tokenizer = train_bpe(inspect.getsource(json.decoder).encode() * 3, 300)
    assert tokenizer.vocab_size == 300
    (folder / "tokenizer.json").write_text(tokenizer.to_json())
    before = sorted(p.name for p in folder.iterdir())
    assert main(["generate", str(folder), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its tokenizer has 300 tokens, its model a vocabulary of 256" in err
    assert sorted(p.name for p in folder.iterdir()) == before
