"""Inference: loading a trained model, generation with a KV cache, and downstream evaluation
(lm-evaluation-harness, an optional extra)."""

from spannorm.inference.generation import Completion, Generation, Sampling, generate, generate_batch
from spannorm.inference.kv_cache import KVCache, kv_cache
from spannorm.inference.loading import load_for_inference, run_device

__all__ = ["Completion", "Generation", "KVCache", "Sampling", "generate", "generate_batch", "kv_cache",
           "load_for_inference", "run_device"]
