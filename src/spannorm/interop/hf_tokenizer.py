"""The byte tokenizer (each byte is a token, ids 0-255) as a Hugging Face ``tokenizer.json``.

It is a byte-level BPE without merges, so ``tokenizers`` and ``transformers.AutoTokenizer`` encode every text to
its UTF-8 bytes and decode ids as ``bytes(ids).decode("utf-8", errors="replace")``, as
``spannorm.data.tokenizer.ByteTokenizer`` does. The byte model has no token of its own to spare for bos/eos, so
the NUL byte (id 0) is declared bos, eos and pad: it is the vocabulary entry for byte 0 (a raw NUL in text still
encodes to 0), so the ids stay equal to ours. Decoding with ``skip_special_tokens=True`` drops NUL bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

BYTE_SPECIAL = "\x00"
BYTE_SPECIAL_ID = 0


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE uses: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def byte_tokenizer() -> HFTokenizer:
    """The byte tokenizer as a ``tokenizers.Tokenizer`` (vocabulary 256, id = byte value)."""
    alphabet = byte_level_alphabet()
    vocab = {alphabet[byte]: byte for byte in range(256)}
    del vocab[alphabet[BYTE_SPECIAL_ID]]
    vocab[BYTE_SPECIAL] = BYTE_SPECIAL_ID  # matched in the raw text as the special token, never byte-level mapped
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_SPECIAL, normalized=False, special=True)])
    return tok


def write_byte_tokenizer(directory: Path, model_max_length: int) -> list[str]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (bos = eos = pad = id 0) into ``directory``."""
    byte_tokenizer().save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BYTE_SPECIAL, "eos_token": BYTE_SPECIAL,
              "pad_token": BYTE_SPECIAL, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
