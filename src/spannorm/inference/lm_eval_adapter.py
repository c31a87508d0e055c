"""A model adapter for lm-evaluation-harness (the optional extra ``eval``: ``pip install 'spannorm[eval]'``).

This module imports ``lm_eval`` at the top: import it only where the extra is wanted (``spannorm eval
--tasks`` does, and turns a missing extra into a one-line error).

:class:`SpannormLM` answers the harness's three request types with our own model and tokenizer:

- ``loglikelihood(context, continuation)``: the summed log-probability of the continuation's tokens, and
  whether greedy decoding would produce them. An empty context is replaced by the tokenizer's encoding of
  a newline (our models have no BOS token). Trailing spaces of the context move to the continuation, as
  the harness's own Hugging Face adapter does;
- ``loglikelihood_rolling(text)``: every token scored once, in windows of the model's context
  (:func:`~spannorm.inference.scoring.rolling_windows`), after the newline prefix;
- ``generate_until(context, gen_kwargs)``: cached batched generation (greedy unless ``do_sample``), cut at
  the first ``until`` string, at most ``max_gen_toks`` tokens (default 256).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from spannorm.inference.generation import Sampling, generate_batch
from spannorm.inference.scoring import continuation_window, rolling_windows, score_windows
from spannorm.model.transformer import DecoderLM


class SpannormLM(LM):
    """lm-evaluation-harness's view of one of our models and its tokenizer."""

    def __init__(self, model: DecoderLM, tokenizer, batch_size: int = 16, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.context_length = model.cfg.context_length
        self.prefix = self.encode("\n")

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text.encode("utf-8"))]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return (self.encode(context) if context else []) or self.prefix, self.encode(continuation)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        windows = [continuation_window(*self._pair(*request.args), self.context_length) for request in requests]
        return score_windows(self.model, windows, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            windows = rolling_windows(self.encode(request.args[0]), self.prefix[-1], self.context_length)
            out.append(sum(logprob for logprob, _ in score_windows(self.model, windows, self.batch_size)))
        return out

    def generate_until(self, requests) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self._generation_key(request.args[1]), []).append(index)
        out = [""] * len(requests)
        for (until, max_new, temperature, top_p), indices in groups.items():
            prompts = [self.encode(requests[i].args[0]) or self.prefix for i in indices]
            result = generate_batch(self.model, prompts, max_new, Sampling(temperature, None, top_p),
                                    stop_strings=until, decode=self.tokenizer.decode, batch_size=self.batch_size)
            for i, completion in zip(indices, result.completions):
                text = self.tokenizer.decode(completion.tokens)
                for stop in until:
                    text = text.split(stop, 1)[0]
                out[i] = text
        return out

    def _generation_key(self, kwargs: dict[str, Any]) -> tuple:
        until = kwargs.get("until", [])
        until = (until,) if isinstance(until, str) else tuple(until)
        sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
        top_p = float(kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0
        return until, int(kwargs.get("max_gen_toks", self.max_gen_toks)), temperature, top_p


def task_manager(tasks: Sequence[str], include_path: Path | None = None) -> TaskManager:
    """The harness's tasks and those of the YAML files under ``include_path``. When every name in ``tasks``
    is a task under ``include_path``, only those are indexed (indexing the harness's thousands of built-in
    tasks takes tens of seconds)."""
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if not unknown_tasks(tasks, local):
            return local
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def unknown_tasks(tasks: Sequence[str], manager: TaskManager) -> list[str]:
    """The names in ``tasks`` that are neither a task, group or tag the harness knows nor a task YAML file."""
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]


def evaluate_tasks(model: DecoderLM, tokenizer, tasks: Sequence[str], manager: TaskManager, *,
                   batch_size: int = 16, num_fewshot: int | None = None, limit: int | float | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Run ``tasks`` through ``lm_eval.simple_evaluate`` with :class:`SpannormLM`; its results dict."""
    adapter = SpannormLM(model, tokenizer, batch_size=batch_size)
    return simple_evaluate(model=adapter, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                           torch_random_seed=seed, fewshot_random_seed=seed)
