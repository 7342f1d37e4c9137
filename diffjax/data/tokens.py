"""Captions -> token ids in records: the data room's one fixed tokenizer.

Sources see only `config.data`, not the model, so every captioned record (image-folder
sidecar captions, captions made from labels) is tokenized the same way: the word
tokenizer of `diffjax.text` with `NUM_BUCKETS` buckets, ids 1..NUM_BUCKETS and 0 =
padding. A model that embeds these ids with its own text encoder needs
`model.kwargs.text_vocab_size = TEXT_VOCAB_SIZE`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffjax.text import WordTokenizer

NUM_BUCKETS = 4096  # words hashed into this many buckets
TEXT_VOCAB_SIZE = NUM_BUCKETS + 1  # the model's `text_vocab_size` for these ids


def tokenize(texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (token ids int32 [N, max_len], mask bool [N, max_len]).

    Longer captions are truncated; a caption with no words gives an all-False mask
    (the null caption).
    """
    return WordTokenizer(max_len, num_buckets=NUM_BUCKETS).encode(list(texts))
