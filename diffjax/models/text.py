"""The model side of the small text pathway: a Flax text encoder for captions.

`TextEncoder` is a small pre-LN transformer turning token ids [B, L] (from a
tokenizer in `diffjax.text`, 0 = padding) into [B, L, D] embeddings, for use with
a model's `context` input. A U-Net or DiT built with `text_vocab_size > 0` owns
one (`encode_context`) and accepts token ids as `context`, so the encoder trains
jointly with the denoiser. The tokenizers themselves are pure Python/NumPy and
live in `diffjax.text`, so the data pipeline tokenizes without importing models.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers as L
from diffjax.text import PAD_ID

Array = jax.Array


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
