"""What every tokenizer shares: the padding id, the interface, padding to a fixed length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

# Token id 0 is padding in the built-in tokenizers (and T5); CLIP pads with the pad token of
# its directory (`<|endoftext|>` in SD 1.x) and its mask marks BOS..EOS.
PAD_ID = 0


class Tokenizer(Protocol):
    """Captions -> fixed-length token ids.

    Attributes:
      max_len: L, the length every caption is padded or truncated to.
      vocab_size: rows a text encoder's token table needs (ids lie in [0, vocab_size)).
    """

    max_len: int
    vocab_size: int

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions [B] -> (ids int32 [B, max_len], mask bool [B, max_len])."""
        ...


def check_texts(texts: Sequence[str]) -> Sequence[str]:
    """`texts` if it is a sequence of strings; a TypeError naming the mistake otherwise."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of captions, not one string; wrap it in a list.")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"captions must be strings, got {bad[:3]!r}.")
    return texts


def pad(rows: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids int32 [B, max_len], mask bool [B, max_len]).

    Rows longer than `max_len` are truncated, shorter ones padded with `PAD_ID`; the
    mask is True exactly where a real token sits.
    """
    ids = np.full((len(rows), max_len), PAD_ID, np.int32)
    for i, row in enumerate(rows):
        row = row[:max_len]
        ids[i, : len(row)] = row
    return ids, ids != PAD_ID
