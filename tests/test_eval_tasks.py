"""``spannorm eval RUN --tasks``: lm-evaluation-harness tasks written locally (YAML over local JSONL files),
whose scores equal a hand computation with the model's own forward; the exported Hugging Face folder under the
harness's own ``--model hf`` gives the same scores; and bad input (unknown task, missing extra, a folder that
is not ours): one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from spannorm.cli.eval_tasks import format_scores
from spannorm.cli.main import main
from spannorm.config import ModelConfig
from spannorm.inference import load_for_inference
from spannorm.inference.scoring import continuation_window, rolling_windows, score_windows
from spannorm.model import SpanNormLM
from spannorm.model.io import save_model

SRC = Path(__file__).resolve().parents[1] / "src"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    save_model(SpanNormLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, context_length=64, placement="span",
                                      tie_embeddings=False)), folder)
    return folder


def by_hand(model: SpanNormLM, ids: list[int], n_scored: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) over the last ``n_scored`` tokens, from one plain forward."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)
    targets = torch.tensor(ids[1:])
    return float(logprobs.gather(-1, targets[:, None])[-n_scored:].sum())


def test_scoring_equals_a_plain_forward(model_dir):
    model, _, _, _ = load_for_inference(model_dir)
    context, continuation = list(b"The cat sat"), list(b" on the mat")
    [(logprob, greedy)] = score_windows(model, [continuation_window(context, continuation, 32)])
    assert logprob == pytest.approx(by_hand(model, context + continuation, len(continuation)), abs=1e-4)
    assert score_windows(model, [([5], []), continuation_window(context, continuation, 32)])[0] == (0.0, True)
    # A context longer than the window is cut from the left.
    long_context = list(b"x" * 40)
    inputs, targets = continuation_window(long_context, continuation, 32)
    assert len(inputs) == 32 and targets == continuation
    # Rolling windows predict each token once; the last window takes a full context.
    tokens = list(range(1, 71))
    windows = rolling_windows(tokens, 10, 32)
    assert [t for _, t in windows] == [tokens[:32], tokens[32:64], tokens[64:]]
    assert windows[0][0] == [10] + tokens[:31] and windows[2][0] == tokens[37:69]


def write_tasks(folder: Path, model: SpanNormLM, rolling_prefix: int = 10) -> dict[str, float]:
    """Three local tasks (multiple choice, rolling perplexity, generation) and their expected scores; a rolling
    text is conditioned on the token ``rolling_prefix`` (ours: the newline; the harness's HF model: bos)."""
    folder.mkdir()
    questions = ["2+2", "sky", "cat", "sun", "tea", "one"]
    choices = ["red", "four", "mat", "hot"]
    mc_docs, hits = [], 0
    for index, question in enumerate(questions):
        context = f"Q: {question}\nA:"
        scores = [by_hand(model, list(context.encode()) + list(f" {c}".encode()), len(c) + 1) for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        answer = best if index % 3 else (best + 1) % len(choices)  # the model is right on 4 of 6
        hits += answer == best
        mc_docs.append({"question": question, "choices": choices, "answer": answer})
    texts = ["a short text", "another, longer text that still fits the window"]
    rolling_docs = [{"text": t} for t in texts]
    logprob = sum(by_hand(model, [rolling_prefix] + list(t.encode()), len(t.encode())) for t in texts)
    bits_per_byte = -logprob / sum(len(t.encode()) for t in texts) / math.log(2)
    prompt = "Once"
    ids = list(prompt.encode())
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = bytes(ids[len(prompt):]).decode("utf-8", errors="replace")
    gen_docs = [{"prompt": prompt, "target": greedy}, {"prompt": prompt, "target": greedy + "!"}]
    for name, docs in (("mc", mc_docs), ("rolling", rolling_docs), ("gen", gen_docs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "local_mc.yaml").write_text(
        f"task: local_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    (folder / "local_rolling.yaml").write_text(
        f"task: local_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'rolling.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    (folder / "local_gen.yaml").write_text(
        f"task: local_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\u0000\"]\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return {"local_mc": hits / len(questions), "local_rolling": bits_per_byte, "local_gen": 0.5}


def run_cli(*args: str, home: Path, module: str = "spannorm") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(home),
               OMP_NUM_THREADS="1")
    command = ["eval", *args] if module == "spannorm" else list(args)
    return subprocess.run([sys.executable, "-m", module, *command], capture_output=True, text=True, env=env,
                          timeout=600)


def test_local_tasks_score_what_a_hand_computation_gives(model_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="the optional extra 'eval'")
    model, _, _, _ = load_for_inference(model_dir)
    expected = write_tasks(tmp_path / "tasks", model)
    assert 0 < expected["local_mc"] < 1
    done = run_cli(str(model_dir), "--tasks", "local_mc,local_rolling,local_gen", "--include-path",
                   str(tmp_path / "tasks"), "--batch-size", "3", "--json", home=tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])["tasks"]
    assert report["local_mc"]["acc,none"] == pytest.approx(expected["local_mc"])
    assert report["local_rolling"]["bits_per_byte,none"] == pytest.approx(expected["local_rolling"], rel=1e-4)
    assert report["local_gen"]["exact_match,none"] == pytest.approx(expected["local_gen"])


def test_the_docs_task_yaml_is_the_tested_one(model_dir, tmp_path):
    yaml = pytest.importorskip("yaml", reason="comes with the optional extra 'eval'")
    model, _, _, _ = load_for_inference(model_dir)
    write_tasks(tmp_path / "tasks", model)
    docs = (SRC.parent / "docs" / "evaluation.md").read_text()
    [block] = [b.split("\n", 1)[1] for b in docs.split("```")[1::2] if b.startswith("yaml\ntask: local_mc")]
    documented = yaml.safe_load(block.replace("/abs/path/to/mc.jsonl", str(tmp_path / "tasks" / "mc.jsonl")))
    assert documented == yaml.safe_load((tmp_path / "tasks" / "local_mc.yaml").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_unknown_task_is_one_line_exit_2_nothing_written(model_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="the optional extra 'eval'")
    (tmp_path / "tasks").mkdir()
    before = snapshot(tmp_path) | snapshot(model_dir)
    done = run_cli(str(model_dir), "--tasks", "no_such_task_xyz", "--include-path", str(tmp_path / "tasks"),
                   home=tmp_path / "hf")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("spannorm: error: --tasks: unknown task 'no_such_task_xyz'")
    assert snapshot(model_dir) == {k: v for k, v in before.items() if k.startswith(str(model_dir))}
    assert not [k for k in snapshot(tmp_path) if k not in before and "/hf/" not in k]


def test_a_missing_extra_and_a_foreign_folder_are_one_line_exit_2(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "spannorm.inference.lm_eval_adapter", raising=False)
    assert main(["eval", str(model_dir), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'spannorm[eval]'" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    assert main(["eval", str(foreign), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint found there" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert main(["eval", str(model_dir), "--tasks", " , "]) == 2
    assert main(["eval", str(model_dir), "--tasks", "x", "--limit", "inf"]) == 2
    assert "--limit=inf is invalid" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--tasks", "x", "--data.path=/tmp"]) == 2


def test_a_tokenizer_larger_than_the_model_vocabulary_is_one_line_exit_2(model_dir, tmp_path, capsys):
    folder = tmp_path / "mismatch"
    shutil.copytree(model_dir, folder)
    HFTokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0")).save(
        str(folder / "tokenizer.json"))
    before = snapshot(folder)
    assert main(["eval", str(folder), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its tokenizer has 300 tokens, its model a vocabulary of 256" in err
    assert snapshot(folder) == before


def test_scores_print_as_metric_value_and_stderr():
    metrics = {"acc,none": 0.5, "acc_stderr,none": 0.25, "exact_match,strict-match": 1.0,
               "exact_match_stderr,strict-match": "N/A"}
    assert format_scores(metrics) == "acc 0.5000 ± 0.2500  exact_match (strict-match) 1.0000"


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("moe")
    save_model(SpanNormLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, context_length=64, placement="peri",
                                      moe={"n_experts": 4, "top_k": 2, "shared_expert": True})), folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("which", ["model_dir", "moe_model_dir"])
def test_the_exported_folder_scores_the_same_under_lm_eval_model_hf(which, request, tmp_path):
    """``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` (the command in
    docs/evaluation.md) on a span and a peri MoE export: the multiple-choice accuracy equals ours and the hand
    computation; generation matches; rolling bits per byte equal the hand computation after bos (id 0)."""
    pytest.importorskip("lm_eval", reason="the optional extra 'eval'")
    pytest.importorskip("transformers", reason="the optional extra 'hf'")
    pytest.importorskip("accelerate", reason="lm-eval's HF model needs it: pip install 'lm-eval[hf]'")
    model_dir = request.getfixturevalue(which)
    model, _, _, _ = load_for_inference(model_dir)
    hf_dir, tasks = tmp_path / "hf-export", tmp_path / "tasks"
    assert main(["export-hf", str(model_dir), "--out", str(hf_dir)]) == 0
    assert (hf_dir / "modeling_spannorm.py").is_file() and (hf_dir / "tokenizer.json").is_file()
    expected = write_tasks(tasks, model, rolling_prefix=0)
    assert 0 < expected["local_mc"] < 1
    names = "local_mc,local_rolling,local_gen"
    ours = run_cli(str(model_dir), "--tasks", "local_mc", "--include-path", str(tasks), "--json",
                   home=tmp_path / "hf")
    assert ours.returncode == 0, ours.stderr[-2000:]
    our_acc = json.loads(ours.stdout.strip().splitlines()[-1])["tasks"]["local_mc"]["acc,none"]
    docs = (SRC.parent / "docs" / "evaluation.md").read_text()
    assert "lm_eval --model hf --model_args pretrained=span-hf,trust_remote_code=True \\\n    --tasks local_mc " \
           "--include_path my_tasks/ --device cpu --batch_size 3" in docs
    done = run_cli("--model", "hf", "--model_args", f"pretrained={hf_dir},trust_remote_code=True", "--tasks", names,
                   "--include_path", str(tasks), "--device", "cpu", "--batch_size", "3", "--output_path",
                   str(tmp_path / "out"), home=tmp_path / "hf", module="lm_eval")
    assert done.returncode == 0, done.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    report = json.loads(results_file.read_text())["results"]
    assert report["local_mc"]["acc,none"] == pytest.approx(expected["local_mc"]) == our_acc
    assert report["local_rolling"]["bits_per_byte,none"] == pytest.approx(expected["local_rolling"], rel=1e-4)
    assert report["local_gen"]["exact_match,none"] == pytest.approx(expected["local_gen"])
