"""Deterministic tokenizers with built-in vocabularies (no vocabulary file, nothing downloaded),
and the registry of every tokenizer.

  * `WordTokenizer`: lower-cased alphanumeric words hashed (CRC-32) into a fixed
    number of buckets; "a handwritten seven" is 3 tokens.
  * `ByteTokenizer`: UTF-8 bytes; any text, one token per byte.

Id 0 (`PAD_ID`) is padding in both. An empty caption encodes to an all-False mask
row: the null caption used for classifier-free guidance (caption dropout).

`TOKENIZERS` also lists the tokenizers read from a pretrained directory ("clip":
`clip_bpe.CLIPTokenizer`, "t5": `t5_spm.T5Tokenizer`); they follow transformers'
conventions instead (their own padding id, BOS/EOS, a non-empty mask for ""), and
`make_tokenizer` builds them with `from_dir(path, max_len)`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffjax.text.base import PAD_ID, check_texts, pad
from diffjax.text.clip_bpe import CLIPTokenizer
from diffjax.text.t5_spm import T5Tokenizer


class WordTokenizer:
    """Lower-cased words -> 1 + crc32(word) % num_buckets; 0 is padding.

    CRC-32 (unlike Python's `hash`) is the same in every process and on every
    machine, so ids never change.
    """

    def __init__(self, max_len: int, num_buckets: int = 4096):
        if max_len <= 0 or num_buckets <= 0:
            raise ValueError(f"max_len and num_buckets must be > 0, got {max_len}, {num_buckets}.")
        self.max_len = int(max_len)
        self.num_buckets = int(num_buckets)

    @property
    def vocab_size(self) -> int:
        return self.num_buckets + 1

    def tokens(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return [1 + zlib.crc32(w.encode("utf-8")) % self.num_buckets for w in words]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (ids [B, max_len] int32, mask [B, max_len] bool); long ones are truncated."""
        return pad([self.tokens(t) for t in check_texts(texts)], self.max_len)

    def __repr__(self) -> str:
        return f"WordTokenizer(max_len={self.max_len}, num_buckets={self.num_buckets})"


class ByteTokenizer:
    """UTF-8 bytes -> ids 1..256; 0 is padding."""

    vocab_size = 257

    def __init__(self, max_len: int):
        if max_len <= 0:
            raise ValueError(f"max_len must be > 0, got {max_len}.")
        self.max_len = int(max_len)

    def tokens(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (ids [B, max_len] int32, mask [B, max_len] bool); long ones are truncated."""
        return pad([self.tokens(t) for t in check_texts(texts)], self.max_len)

    def decode(self, ids: np.ndarray) -> list[str]:
        """ids [B, L] -> captions (padding dropped)."""
        return [
            bytes(int(i) - 1 for i in row if i != PAD_ID).decode("utf-8", errors="replace")
            for row in np.asarray(ids)
        ]

    def __repr__(self) -> str:
        return f"ByteTokenizer(max_len={self.max_len})"


TOKENIZERS = {
    "word": WordTokenizer,
    "byte": ByteTokenizer,
    "clip": CLIPTokenizer,
    "t5": T5Tokenizer,
}
# Kinds read from a pretrained tokenizer directory: built with `cls.from_dir(path, max_len)`.
FILE_TOKENIZERS = frozenset({"clip", "t5"})

AnyTokenizer = WordTokenizer | ByteTokenizer | CLIPTokenizer | T5Tokenizer


def make_tokenizer(kind: str, max_len: int | None, **kwargs: Any) -> AnyTokenizer:
    """Tokenizer by name: 'word' | 'byte' | 'clip' | 't5'.

    'clip' and 't5' need `path=` (a pretrained `tokenizer/` folder); with `max_len=None` they
    take the folder's `model_max_length`.
    """
    if kind not in TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {kind!r}; use one of {sorted(TOKENIZERS)}.")
    if kind in FILE_TOKENIZERS:
        path = kwargs.pop("path", None)
        if path is None:
            raise ValueError(
                f"Tokenizer {kind!r} is read from files: pass path=<pretrained tokenizer folder>."
            )
        if kwargs:
            raise TypeError(
                f"Tokenizer {kind!r} takes only path and max_len, got {sorted(kwargs)}."
            )
        return TOKENIZERS[kind].from_dir(path, max_len=max_len)
    return TOKENIZERS[kind](max_len, **kwargs)


__all__ = [
    "FILE_TOKENIZERS",
    "PAD_ID",
    "TOKENIZERS",
    "ByteTokenizer",
    "CLIPTokenizer",
    "T5Tokenizer",
    "WordTokenizer",
    "make_tokenizer",
]
