"""A small text pathway for self-contained text-to-image demos.

Two deterministic tokenizers in pure Python/NumPy with stable vocabularies (no
vocabulary file, nothing downloaded):
  * `WordTokenizer`: lower-cased alphanumeric words hashed (CRC-32) into a
    fixed number of buckets; "a handwritten seven" is 3 tokens.
  * `ByteTokenizer`: UTF-8 bytes; any text, one token per byte.
Id 0 is padding in both. An empty caption encodes to an all-False mask row: the
null caption used for classifier-free guidance (caption dropout).

`TextEncoder` is a small pre-LN transformer producing [B, L, D] embeddings, for
use with a model's `context` input. A U-Net or DiT built with
`text_vocab_size > 0` owns one and accepts token ids as `context`, so the
encoder trains jointly with the denoiser.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers as L

Array = jax.Array

PAD_ID = 0


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
        return _pad([self.tokens(t) for t in _check_texts(texts)], self.max_len)

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
        return _pad([self.tokens(t) for t in _check_texts(texts)], self.max_len)

    def decode(self, ids: np.ndarray) -> list[str]:
        """ids [B, L] -> captions (padding dropped)."""
        return [
            bytes(int(i) - 1 for i in row if i != PAD_ID).decode("utf-8", errors="replace")
            for row in np.asarray(ids)
        ]

    def __repr__(self) -> str:
        return f"ByteTokenizer(max_len={self.max_len})"


TOKENIZERS = {"word": WordTokenizer, "byte": ByteTokenizer}


def make_tokenizer(kind: str, max_len: int, **kwargs: Any) -> WordTokenizer | ByteTokenizer:
    """Tokenizer by name: 'word' | 'byte'."""
    if kind not in TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {kind!r}; use one of {sorted(TOKENIZERS)}.")
    return TOKENIZERS[kind](max_len, **kwargs)


def _check_texts(texts: Sequence[str]) -> Sequence[str]:
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of captions, not one string; wrap it in a list.")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"captions must be strings, got {bad[:3]!r}.")
    return texts


def _pad(rows: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows), max_len), np.int32)
    for i, row in enumerate(rows):
        row = row[:max_len]
        ids[i, : len(row)] = row
    return ids, ids != PAD_ID


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """[length, dim] fixed 1D sin-cos positions (so any caption length works)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freqs = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim // 2))
    out = np.zeros((length, dim), np.float32)
    out[:, : dim // 2] = np.sin(pos * freqs)
    out[:, dim // 2 : 2 * (dim // 2)] = np.cos(pos * freqs)
    return out


class EncoderBlock(nn.Module):
    """Pre-LN transformer block with a key-padding mask."""

    num_heads: int
    mlp_ratio: float = 4.0
    attention_impl: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        """x [B, L, D], mask [B, L] -> [B, L, D]."""
        d = x.shape[-1]
        heads, head_dim = L.num_heads_for(d, self.num_heads, 0)
        h = L.layer_norm(dtype=self.dtype, name="ln1")(x)
        x = x + L.MultiHeadAttention(
            heads, head_dim, attention_impl=self.attention_impl, dtype=self.dtype, name="attn"
        )(h, h, mask)
        h = L.layer_norm(dtype=self.dtype, name="ln2")(x)
        h = nn.gelu(L.dense(int(d * self.mlp_ratio), ("embed", "mlp"), dtype=self.dtype)(h))
        return x + L.dense(d, ("mlp", "embed"), dtype=self.dtype)(h)


class TextEncoder(nn.Module):
    """Token ids -> contextual embeddings.

    Attributes:
      vocab_size: rows of the token table (tokenizer.vocab_size).
      width: output width D (the denoiser's `context_dim`).
      depth: transformer blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      attention_impl: '' | 'xla' | 'cudnn'.
      dtype: compute dtype (string or jnp dtype).
    """

    vocab_size: int
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    attention_impl: str = ""
    dtype: Any = "float32"

    @nn.compact
    def __call__(self, ids: Array, mask: Array | None = None) -> Array:
        """ids [B, L] int, mask [B, L] bool (default ids != 0) -> [B, L, width] float32.

        Padded positions are zero in the output; an all-False row (the empty
        caption) gives an all-zero, finite embedding.
        """
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"TextEncoder takes integer token ids [B, L], got {ids.dtype}{ids.shape}."
            )
        mask = (ids != PAD_ID) if mask is None else mask.astype(bool)
        dt = L.get_dtype(self.dtype)
        x = nn.Embed(
            self.vocab_size,
            self.width,
            param_dtype=jnp.float32,
            embedding_init=L.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_emb",
        )(ids)
        x = (x + jnp.asarray(sinusoidal_positions(ids.shape[1], self.width))).astype(dt)
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads, self.mlp_ratio, self.attention_impl, dt, name=f"block{i}"
            )(x, mask)
        x = L.layer_norm(dtype=dt, name="ln_out")(x)
        return jnp.where(mask[..., None], x, 0).astype(jnp.float32)


def encode_context(
    model: nn.Module, context: Array | None, context_mask: Array | None, batch: int
) -> tuple[Array, Array]:
    """Runs a model's own TextEncoder on token-id `context` [B, L] (None = null caption).

    `model` is the calling UNet or DiT: its `text_vocab_size`, `context_dim` (the
    encoder width), `text_depth`, `text_heads`, `attention_impl` and `dtype` configure
    the encoder. Must be called from inside the model's compact `__call__`: the encoder
    binds to that scope, so its params live under the model's 'text_encoder' entry.
    """
    if model.context_dim <= 0:
        raise ValueError("text_vocab_size > 0 needs context_dim > 0 (the text encoder width).")
    if context is None:
        context = jnp.zeros((batch, 1), jnp.int32)
        context_mask = jnp.zeros((batch, 1), bool)
    if context.ndim != 2 or context.shape[0] != batch:
        raise ValueError(
            f"A model with text_vocab_size > 0 takes token ids [{batch}, L] as context, "
            f"got shape {context.shape}."
        )
    if not jnp.issubdtype(context.dtype, jnp.integer):
        raise ValueError(
            f"A model with text_vocab_size > 0 takes integer token ids as context, got "
            f"{context.dtype}; set text_vocab_size=0 to pass precomputed embeddings."
        )
    if context_mask is None:
        context_mask = context != PAD_ID
    emb = TextEncoder(
        model.text_vocab_size, model.context_dim, model.text_depth, model.text_heads,
        attention_impl=model.attention_impl, dtype=L.get_dtype(model.dtype), name="text_encoder",
    )(context, context_mask)  # fmt: skip
    return emb, context_mask.astype(bool)
