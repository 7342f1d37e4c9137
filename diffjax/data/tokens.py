"""Captions -> token ids in records: the data room's tokenizer.

Sources see only `config.data`, not the model, so every captioned record (image-folder
sidecar captions, captions made from labels) is tokenized the same way. By default
(`data.tokenizer = ""`) that is the word tokenizer of `diffjax.text` with `NUM_BUCKETS`
buckets, ids 1..NUM_BUCKETS and 0 = padding; a model that embeds these ids with its own
text encoder needs `model.kwargs.text_vocab_size = TEXT_VOCAB_SIZE`. With
`data.tokenizer = DIR` (a CLIP tokenizer folder, or a pipeline directory with
`tokenizer/`) it is that pretrained tokenizer, whose ids a frozen CLIP text encoder
embeds in the train step (`text.encoder`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from diffjax.text import CLIPTokenizer, WordTokenizer

NUM_BUCKETS = 4096  # words hashed into this many buckets
TEXT_VOCAB_SIZE = NUM_BUCKETS + 1  # the model's `text_vocab_size` for these ids


def tokenize(
    texts: Sequence[str], max_len: int, tokenizer: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (token ids int32 [N, max_len], mask bool [N, max_len]).

    Longer captions are truncated. With the word tokenizer (`tokenizer=""`) a caption
    with no words gives an all-False mask (the null caption); a pretrained tokenizer
    (`tokenizer=DIR`) encodes "" as its BOS EOS, the null caption of Stable Diffusion.
    """
    if not tokenizer:
        return WordTokenizer(max_len, num_buckets=NUM_BUCKETS).encode(list(texts))
    return pretrained_tokenizer(tokenizer, max_len).encode(list(texts))


@functools.lru_cache(maxsize=4)
def pretrained_tokenizer(path: str, max_len: int | None) -> CLIPTokenizer:
    """The CLIP tokenizer of `path` (see `tokenizer_dir`); `max_len` None: its own (77)."""
    return CLIPTokenizer.from_dir(tokenizer_dir(path), max_len=max_len)


def tokenizer_dir(path: str) -> str:
    """The tokenizer folder behind `path`: itself, or a pipeline directory's `tokenizer/`.

    Raises:
      FileNotFoundError: naming the path and what it should hold.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, "model_index.json")):
        path = os.path.join(path, "tokenizer")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"data.tokenizer={path!r} is not a directory; give a CLIP tokenizer folder "
            "(vocab.json + merges.txt, or tokenizer.json) or a pipeline directory with "
            "tokenizer/."
        )
    return path
