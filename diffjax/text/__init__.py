"""Text -> token ids: tokenizers in pure Python/NumPy (no Flax, no JAX).

What lives here is everything between a caption string and the int32 token ids
[B, L] plus bool mask [B, L] (True = real token) that a model's text encoder
embeds. Both the data room (captions in records) and the model room (vocabulary
sizes, the padding id) depend on it; it depends on neither, so tokenizing a
caption never imports a model.

Layout:
  * `base`: what every tokenizer shares: `PAD_ID` (0), the `Tokenizer` protocol
    (`max_len`, `vocab_size`, `encode(texts) -> (ids, mask)`), and the helpers
    `check_texts` and `pad` that turn token lists into fixed-length rows.
  * `tokenizers`: the self-contained tokenizers with built-in vocabularies
    (`WordTokenizer`, CRC-32 word buckets; `ByteTokenizer`, UTF-8 bytes), the
    `TOKENIZERS` registry and `make_tokenizer(kind, max_len, **kwargs)`.
  * Tokenizers read from files (CLIP BPE from vocab.json + merges.txt, T5
    sentencepiece) get one module each beside these, import `base` only, and are
    registered in `tokenizers.TOKENIZERS`.

An empty caption encodes to an all-False mask row: the null caption that
classifier-free guidance trains with.
"""

from diffjax.text.base import PAD_ID, Tokenizer, check_texts, pad
from diffjax.text.tokenizers import TOKENIZERS, ByteTokenizer, WordTokenizer, make_tokenizer

__all__ = [
    "PAD_ID",
    "TOKENIZERS",
    "ByteTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "check_texts",
    "make_tokenizer",
    "pad",
]
