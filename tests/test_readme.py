"""Every Python snippet in README.md runs, and the setup block has exactly the two documented commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert PYTHON_BLOCKS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(PYTHON_BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_setup_block_has_two_commands_and_ci_runs_the_test_one():
    setup = README.read_text().split("## Setup", 1)[1]
    block = re.search(r"```bash\n(.*?)```", setup, flags=re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


def tour_commands() -> list[list[str]]:
    tour = README.read_text().split("A short tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", tour, flags=re.S).group(1)
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.mark.slow
def test_readme_tour_runs_shortened(tmp_path, monkeypatch):
    """Every line of the README's short tour, in order, in an empty folder: HF_DIR is a small random Llama
    made here, training runs are cut to a few steps and the check to two, through appended overrides."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spannorm.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the token cache goes under ~/.cache
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
                     ).save_pretrained(tmp_path / "hf")
    short_train = ["--train.steps=2", "--train.batch_size=2", "--train.eval_every=0", "--train.eval_batches=1",
                   "--model.context_length=32", "--data.embedded_max_bytes=100000", "--train.progress=none"]
    commands = tour_commands()
    assert [c[1] for c in commands] == ["train", "eval", "check", "import-hf", "train"]
    for words in commands:
        assert words[0] == "spannorm"
        args = [str(tmp_path / "hf") if w == "HF_DIR" else w for w in words[1:]]
        if args[0] == "train":
            args += short_train
        elif args[0] == "eval":
            args += ["--max-batches", "1"]
        elif args[0] == "check":
            args[args.index("--steps") + 1] = "2"
            args += ["--threads", "1"]
        assert main(args) == 0, " ".join(words)
    # The continued run kept the imported model's shape (the preset does not resize it) and became SpanNorm.
    import yaml

    model = yaml.safe_load((tmp_path / "runs" / "llama-span" / "config.yaml").read_text())["model"]
    assert model["d_model"] == 32 and model["n_layers"] == 2 and model["placement"] == "span"
