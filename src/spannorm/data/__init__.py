"""Data: corpora, tokenizers, token caches and window sampling."""
