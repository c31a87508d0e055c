"""Data: text sources, tokenizers, ``spannorm prepare``, the token-shard format every path reads, window sampling."""
