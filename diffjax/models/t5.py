"""T5 encoder (Hugging Face `T5EncoderModel` semantics) in Flax.

A port of the architecture, not of code. Facts it keeps:
  - RMS norm without mean subtraction or bias, its variance computed in float32;
  - no 1/sqrt(d_kv) scaling of attention logits (T5 folds it into the initialisation);
  - a bidirectional relative-position bias (log-spaced buckets up to
    `relative_attention_max_distance`), owned by block 0 and added in every block;
  - feed-forward `relu` (T5) or `gated-gelu` (T5 v1.1, Flan-T5; tanh-approximate gelu);
  - padded keys masked out by `attention_mask`; padded queries are still computed.

The Flax module tree mirrors transformers' (`shared`, `encoder.block.N.layer.0.SelfAttention.
{q,k,v,o}`, `...relative_attention_bias` in block 0 only, `layer.0.layer_norm`,
`layer.1.DenseReluDense.{wi | wi_0, wi_1, wo}`, `layer.1.layer_norm`,
`encoder.final_layer_norm`). `encoder.embed_tokens` is tied to `shared` and is not a
separate parameter here; `prepare_tensors` folds it (and drops the decoder of a full
seq2seq checkpoint) before the generic loader runs.

Precision: the residual stream stays float32 whatever the compute dtype, and `wo` runs in
float32 (transformers keeps `wo` in float32 for the same reason: T5 activations overflow
float16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers as L
from diffjax.models.clip_text import masked_attention

Array = jax.Array

FEED_FORWARD_PROJS = ("relu", "gated-gelu")


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucket of each relative position (key index - query index).

    Half the buckets (per direction when bidirectional) are exact offsets; the rest are
    log-spaced up to `max_distance`, beyond which everything shares the last bucket.
    Computed in NumPy float32 with truncation, matching transformers' float32 arithmetic
    (a float64 or XLA log could move a boundary offset to the neighbouring bucket).
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    scaled = np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)
    log_ratio = np.log(scaled) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(rel < max_exact, rel, large)


def _dense(features: int, axes: tuple[str, str], dtype: Any, name: str) -> nn.Dense:
    return L.dense(
        features,
        axes,
        dtype=dtype,
        use_bias=False,
        kernel_init=nn.initializers.normal(features**-0.5),
        name=name,
    )


def _rms_norm(eps: float, dtype: Any, name: str) -> nn.RMSNorm:
    return L.rms_norm(dtype=dtype, epsilon=eps, name=name)


class T5Attention(nn.Module):
    """Self-attention without bias or logit scaling; block 0 owns the position bias."""

    num_heads: int
    d_kv: int
    has_relative_attention_bias: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array, position_bias: Array | None) -> tuple[Array, Array]:
        """x [B, L, D], mask [B, 1, 1, L] bool, bias [1, N, L, L] or None -> (out, bias)."""
        b, length, d = x.shape
        inner = self.num_heads * self.d_kv
        heads = (b, length, self.num_heads, self.d_kv)
        q = _dense(inner, ("embed", "mlp"), self.dtype, "q")(x).reshape(heads)
        k = _dense(inner, ("embed", "mlp"), self.dtype, "k")(x).reshape(heads)
        v = _dense(inner, ("embed", "mlp"), self.dtype, "v")(x).reshape(heads)
        if position_bias is None:
            if not self.has_relative_attention_bias:
                raise ValueError("T5: only block 0 computes the relative position bias.")
            position_bias = self.compute_bias(length)
        out = masked_attention(q, k, v, mask, bias=position_bias.astype(q.dtype), scale=1.0)
        out = _dense(d, ("mlp", "embed"), self.dtype, "o")(out.reshape(b, length, inner))
        return out, position_bias

    def compute_bias(self, length: int) -> Array:
        """[1, N, L, L] float32 bias from the learned per-bucket, per-head table."""
        pos = np.arange(length)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            bidirectional=True,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        table = nn.Embed(
            self.relative_attention_num_buckets,
            self.num_heads,
            param_dtype=jnp.float32,
            embedding_init=L.partitioned(nn.initializers.normal(1.0), (None, "heads")),
            name="relative_attention_bias",
        )
        values = table(jnp.asarray(buckets, jnp.int32))  # [L, L, N]
        return jnp.transpose(values, (2, 0, 1))[None]


class T5LayerSelfAttention(nn.Module):
    num_heads: int
    d_kv: int
    has_relative_attention_bias: bool
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x, mask, position_bias):
        h = _rms_norm(self.layer_norm_epsilon, self.dtype, "layer_norm")(x)
        out, position_bias = T5Attention(
            self.num_heads,
            self.d_kv,
            self.has_relative_attention_bias,
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
            self.dtype,
            name="SelfAttention",
        )(h, mask, position_bias)
        return x + out.astype(x.dtype), position_bias


class T5DenseReluDense(nn.Module):
    """relu: wo(relu(wi x)); gated-gelu: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    d_ff: int
    feed_forward_proj: str
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        if self.feed_forward_proj == "relu":
            h = jax.nn.relu(_dense(self.d_ff, ("embed", "mlp"), self.dtype, "wi")(x))
        elif self.feed_forward_proj == "gated-gelu":
            gate = _dense(self.d_ff, ("embed", "mlp"), self.dtype, "wi_0")(x)
            h = jax.nn.gelu(gate, approximate=True)
            h = h * _dense(self.d_ff, ("embed", "mlp"), self.dtype, "wi_1")(x)
        else:
            raise ValueError(_ffn_error(self.feed_forward_proj))
        return _dense(d, ("mlp", "embed"), jnp.float32, "wo")(h)


class T5LayerFF(nn.Module):
    d_ff: int
    feed_forward_proj: str
    layer_norm_epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _rms_norm(self.layer_norm_epsilon, self.dtype, "layer_norm")(x)
        ffn = T5DenseReluDense(self.d_ff, self.feed_forward_proj, self.dtype, name="DenseReluDense")
        return x + ffn(h).astype(x.dtype)


class T5Block(nn.Module):
    num_heads: int
    d_kv: int
    d_ff: int
    feed_forward_proj: str
    has_relative_attention_bias: bool
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x, mask, position_bias):
        x, position_bias = T5LayerSelfAttention(
            self.num_heads,
            self.d_kv,
            self.has_relative_attention_bias,
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
            self.layer_norm_epsilon,
            self.dtype,
            name="layer.0",
        )(x, mask, position_bias)
        x = T5LayerFF(
            self.d_ff, self.feed_forward_proj, self.layer_norm_epsilon, self.dtype, name="layer.1"
        )(x)
        return x, position_bias


class T5Stack(nn.Module):
    num_layers: int
    num_heads: int
    d_kv: int
    d_ff: int
    feed_forward_proj: str
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        position_bias = None
        for i in range(self.num_layers):
            x, position_bias = T5Block(
                self.num_heads,
                self.d_kv,
                self.d_ff,
                self.feed_forward_proj,
                i == 0,
                self.relative_attention_num_buckets,
                self.relative_attention_max_distance,
                self.layer_norm_epsilon,
                self.dtype,
                name=f"block.{i}",
            )(x, mask, position_bias)
        return _rms_norm(self.layer_norm_epsilon, self.dtype, "final_layer_norm")(x)


def _ffn_error(name: str) -> str:
    return (
        f"T5: feed_forward_proj={name!r} is not supported; use one of {list(FEED_FORWARD_PROJS)} "
        "('relu': original T5; 'gated-gelu': T5 v1.1 / Flan-T5 / the SD3 and Flux T5-XXL)."
    )


class T5Encoder(nn.Module):
    """T5 encoder with transformers' `T5EncoderModel` output (`last_hidden_state`).

    Attributes (the `T5Config` fields of the same names):
      vocab_size, d_model, d_kv, d_ff, num_layers, num_heads: sizes (inner attention
        width num_heads * d_kv need not equal d_model).
      relative_attention_num_buckets, relative_attention_max_distance: position buckets.
      feed_forward_proj: 'relu' | 'gated-gelu'.
      layer_norm_epsilon: RMS-norm epsilon.
      dtype: compute dtype ('float32' | 'bfloat16' | 'float16'); params are float32.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6
    dtype: Any = "float32"

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Encodes token ids.

        Args:
          input_ids: [B, L] integer token ids.
          attention_mask: optional [B, L], 1/True = real token; padded keys are ignored.

        Returns:
          last_hidden_state [B, L, d_model] in the compute dtype.
        """
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise ValueError(_ffn_error(self.feed_forward_proj))
        if input_ids.ndim != 2:
            raise ValueError(f"T5: input_ids must be [batch, length], got {input_ids.shape}.")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"T5: input_ids must be integers, got {input_ids.dtype}.")
        if attention_mask is None:
            mask = jnp.ones(input_ids.shape, bool)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"T5: attention_mask must have input_ids' shape {input_ids.shape}, "
                f"got {attention_mask.shape}."
            )
        else:
            mask = attention_mask.astype(bool)
        shared = nn.Embed(
            self.vocab_size,
            self.d_model,
            param_dtype=jnp.float32,
            embedding_init=L.partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
            name="shared",
        )
        x = shared(input_ids)  # float32 residual stream
        return T5Stack(
            self.num_layers,
            self.num_heads,
            self.d_kv,
            self.d_ff,
            self.feed_forward_proj,
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
            self.layer_norm_epsilon,
            L.get_dtype(self.dtype),
            name="encoder",
        )(x, mask[:, None, None, :])


def from_hf_config(cfg: Mapping[str, Any], dtype: Any = "float32") -> T5Encoder:
    """Builds the encoder from a transformers T5 `config.json` dict.

    Refuses, by name, what this port does not implement: another `model_type` (umt5
    has a bias per layer; mt5 is untested), `is_decoder=true`, a `feed_forward_proj`
    other than relu/gated-gelu. Decoder sizes, dropout, token ids, `dense_act_fn` /
    `is_gated_act` (transformers derives them from feed_forward_proj) and bookkeeping
    keys are ignored.
    """
    cfg = dict(cfg)
    model_type = cfg.get("model_type", "t5")
    if model_type != "t5":
        raise ValueError(
            f"T5: config model_type={model_type!r} is not supported; expected 't5' "
            "(T5, T5 v1.1, Flan-T5)."
        )
    if cfg.get("is_decoder", False):
        raise ValueError("T5: is_decoder=true is not supported; this is the encoder only.")
    ffn = cfg.get("feed_forward_proj", "relu")
    if ffn not in FEED_FORWARD_PROJS:
        raise ValueError(_ffn_error(ffn))
    fields = {
        "vocab_size": 32128,
        "d_model": 512,
        "d_kv": 64,
        "d_ff": 2048,
        "num_layers": 6,
        "num_heads": 8,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "relu",
        "layer_norm_epsilon": 1e-6,
    }
    for name in fields:
        if name in cfg:
            fields[name] = cfg[name]
    return T5Encoder(**fields, dtype=dtype)


def prepare_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint tensors keyed as `T5Encoder`'s tree expects.

    `encoder.embed_tokens.weight` is tied to `shared.weight`: a file may hold either or
    both; both must then be equal. The decoder and `lm_head` of a full
    T5ForConditionalGeneration checkpoint are dropped (transformers' T5EncoderModel
    ignores them too).
    """
    out = {k: v for k, v in tensors.items() if not k.startswith(("decoder.", "lm_head."))}
    embed = out.pop("encoder.embed_tokens.weight", None)
    if embed is not None:
        shared = out.get("shared.weight")
        if shared is None:
            out["shared.weight"] = embed
        elif shared.shape != embed.shape or not np.array_equal(shared, embed):
            raise ValueError(
                "T5: the checkpoint holds different 'shared.weight' and "
                "'encoder.embed_tokens.weight'; T5EncoderModel ties them, so they must be equal."
            )
    return out
