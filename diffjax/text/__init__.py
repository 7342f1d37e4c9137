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
  * Tokenizers read from a pretrained directory's own files, one module each,
    importing `base` only, registered as "clip" and "t5" (built by
    `make_tokenizer(kind, max_len, path=...)` or `Cls.from_dir(path, max_len=None)`);
    their ids equal transformers 5.x's on the same files:
      - `clip_bpe.CLIPTokenizer`: CLIP byte-level BPE from `vocab.json` +
        `merges.txt` (published SD 1.x/2.x repositories) or `tokenizer.json`
        (transformers' save_pretrained); BOS/EOS added, padded with the folder's
        pad token (`<|endoftext|>` in SD 1.x, `!` = id 0 in SD 2.x), L = 77.
        Cleanup is transformers' (NFC, whitespace collapse, lower case; no ftfy).
      - `t5_spm.T5Tokenizer`: T5 unigram from `spiece.model` (needs
        `sentencepiece`); `</s>` appended, padded with `<pad>` = 0, sentinels
        `<extra_id_i>` after the sentencepiece vocabulary.
    Both expose `pad_id` / `eos_id` (CLIP also `bos_id`) and truncate keeping EOS
    last. Characters newer than Python's Unicode tables (3.11: Unicode 14) may be
    lower-cased/normalized differently than by transformers' Rust code.

An empty caption encodes to an all-False mask row with the built-in tokenizers: the
null caption that classifier-free guidance trains with. The pretrained ones follow
transformers instead: "" is BOS EOS (CLIP) or `</s>` (T5), mask True there, and the
padding id is the folder's (not `PAD_ID` for SD 1.x CLIP).
"""

from diffjax.text.base import PAD_ID, Tokenizer, check_texts, pad
from diffjax.text.clip_bpe import CLIPTokenizer
from diffjax.text.t5_spm import T5Tokenizer
from diffjax.text.tokenizers import TOKENIZERS, ByteTokenizer, WordTokenizer, make_tokenizer

__all__ = [
    "PAD_ID",
    "TOKENIZERS",
    "ByteTokenizer",
    "CLIPTokenizer",
    "T5Tokenizer",
    "Tokenizer",
    "WordTokenizer",
    "check_texts",
    "make_tokenizer",
    "pad",
]
