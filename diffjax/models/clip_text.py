"""CLIP text transformer (Hugging Face `CLIPTextModel` semantics) in Flax.

A port of the architecture, not of code: token + learned position embeddings, pre-LN
causal transformer layers (quick_gelu or gelu MLP), a final LayerNorm, and the pooled
output at the EOS token. The Flax module tree mirrors transformers' so a state-dict key
is the Flax parameter path joined by "." (leaves `kernel`/`scale`/`embedding` for torch
`weight`):

  text_model.embeddings.{token_embedding, position_embedding}
  text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.{fc1, fc2}, layer_norm2}
  text_model.final_layer_norm

Checkpoint keys. transformers 5.x has no `text_model` submodule in `CLIPTextModel` and
`save_pretrained` writes keys without the prefix (`embeddings.token_embedding.weight`);
published Stable Diffusion checkpoints (transformers 4.x) have `text_model.` keys, and
the oldest ones also hold the `text_model.embeddings.position_ids` buffer.
Load with `convert.torch_to_flax(tensors, abstract, rename=canonical_key,
ignore=ignored_key)`: the rename adds the missing prefix, `ignored_key` skips the buffer.

Pooling. `pooler_output` is the final-normed hidden state at one position per row: when
the config's `eos_token_id == 2` (configs written before transformers PR #24773, e.g.
SD 1.x/2.x), the position of the largest token id (`argmax(input_ids)`, CLIP's EOS is
the largest id of its vocabulary); otherwise the first position holding `eos_token_id`
(position 0 if a row has none, as transformers does).

Clip skip. `clip_skip_output` applies diffusers' rule (StableDiffusionPipeline.encode_prompt):
`clip_skip=k` takes `hidden_states[-(k + 1)]` (the output of layer `num_layers - k`) and
applies the final LayerNorm; `k=0` gives `last_hidden_state`. (SDXL pipelines use
`hidden_states[-(k + 2)]` without the final norm; that is not this helper.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers as L

Array = jax.Array

HIDDEN_ACTS = ("quick_gelu", "gelu")


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(
        f"CLIP text: hidden_act={name!r} is not supported; use one of {list(HIDDEN_ACTS)} "
        "(quick_gelu: OpenAI CLIP / SD 1.x; gelu: OpenCLIP / SD 2.x)."
    )


def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
    return L.layer_norm(dtype=dtype, epsilon=eps, fast_variance=False, name=name)


def masked_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    bias: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Softmax attention with a per-query mask; a query row without any key gives zeros.

    Args:
      q, k, v: [B, T, N, H] (k, v: [B, S, N, H]).
      mask: bool, broadcastable to [B, N, T, S]; True = attend.
      bias: optional additive logits, broadcastable to [B, N, T, S] (T5's position bias).
      scale: logit scale; None = 1/sqrt(H) (T5 uses 1).

    Returns:
      [B, T, N, H]. Rows with no key out are exactly zero, as torch's
      scaled_dot_product_attention gives (transformers' CLIP with left padding).
    """
    b, t, n, _ = q.shape
    s = k.shape[1]
    mask = jnp.broadcast_to(mask, (b, 1 if mask.shape[1] == 1 else n, t, s))
    has_key = jnp.any(mask, axis=-1)  # [B, N|1, T]
    safe = mask | ~has_key[..., None]
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=safe, scale=scale)
    keep = jnp.transpose(has_key, (0, 2, 1))[..., None]  # [B, T, N|1, 1]
    return jnp.where(keep, out, jnp.zeros_like(out))


class CLIPAttention(nn.Module):
    """q/k/v/out projections (with bias) and scaled dot-product attention."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        """x [B, L, D], mask [B, 1, L, L] bool -> [B, L, D]."""
        b, length, d = x.shape
        if d % self.num_heads:
            raise ValueError(
                f"CLIP text: hidden_size={d} is not divisible by num_attention_heads={self.num_heads}."
            )
        heads = (b, length, self.num_heads, d // self.num_heads)

        def proj(name: str, axes=("embed", "mlp")) -> nn.Dense:
            return L.dense(d, axes, dtype=self.dtype, name=name)

        q = proj("q_proj")(x).reshape(heads)
        k = proj("k_proj")(x).reshape(heads)
        v = proj("v_proj")(x).reshape(heads)
        out = masked_attention(q, k, v, mask).reshape(b, length, d)
        return proj("out_proj", ("mlp", "embed"))(out)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = _activation(self.hidden_act)
        h = act(L.dense(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x))
        return L.dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.num_heads, self.dtype, name="self_attn")(h, mask)
        h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x)
        mlp = CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
        return x + mlp(h)


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        init = L.partitioned(nn.initializers.normal(0.02), ("vocab", "embed"))

        def table(rows: int, name: str) -> nn.Embed:
            return nn.Embed(
                rows, self.hidden_size, param_dtype=jnp.float32, embedding_init=init, name=name
            )

        tokens = table(self.vocab_size, "token_embedding")(input_ids)
        positions = table(self.max_position_embeddings, "position_embedding")(
            jnp.arange(input_ids.shape[1])
        )
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    num_hidden_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> tuple[Array, ...]:
        """Returns every layer's input and the last layer's output (num_layers + 1 arrays)."""
        states = [x]
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(
                self.num_heads,
                self.intermediate_size,
                self.hidden_act,
                self.layer_norm_eps,
                self.dtype,
                name=f"layers.{i}",
            )(x, mask)
            states.append(x)
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """The module transformers 4.x called `CLIPTextModel.text_model`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    dtype: Any

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(
            self.vocab_size, self.hidden_size, self.max_position_embeddings
        )
        self.encoder = CLIPEncoder(
            self.num_hidden_layers,
            self.num_attention_heads,
            self.intermediate_size,
            self.hidden_act,
            self.layer_norm_eps,
            self.dtype,
        )
        self.final_layer_norm = _layer_norm(self.layer_norm_eps, self.dtype, None)

    def __call__(self, input_ids: Array, attention_mask: Array | None) -> dict[str, Any]:
        b, length = input_ids.shape
        x = self.embeddings(input_ids).astype(self.dtype)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L, L] causal
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        hidden_states = self.encoder(x, mask)
        last = self.final_layer_norm(hidden_states[-1])
        if self.eos_token_id == 2:
            # Old configs: CLIP's EOS is the largest id in its vocabulary.
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = last[jnp.arange(b), pos]
        return {"last_hidden_state": last, "pooler_output": pooled, "hidden_states": hidden_states}


class CLIPTextModel(nn.Module):
    """CLIP text encoder with transformers' `CLIPTextModel` outputs.

    Attributes (the `CLIPTextConfig` fields of the same names):
      vocab_size, hidden_size, intermediate_size, num_hidden_layers,
      num_attention_heads, max_position_embeddings: sizes.
      hidden_act: 'quick_gelu' | 'gelu'.
      layer_norm_eps: epsilon of every LayerNorm.
      eos_token_id: selects the pooling rule (see the module docstring).
      dtype: compute dtype ('float32' | 'bfloat16' | 'float16'); params are float32.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: Any = "float32"

    def setup(self):
        _activation(self.hidden_act)  # refuse unknown activations before tracing
        self.text_model = CLIPTextTransformer(
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.max_position_embeddings,
            self.hidden_act,
            self.layer_norm_eps,
            self.eos_token_id,
            L.get_dtype(self.dtype),
        )

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> dict[str, Any]:
        """Encodes token ids.

        Args:
          input_ids: [B, L] integer token ids, L <= max_position_embeddings.
          attention_mask: optional [B, L], 1/True = real token; combined with the causal
            mask (the SD pipelines pass none).

        Returns:
          dict with `last_hidden_state` [B, L, D] (after the final LayerNorm),
          `pooler_output` [B, D], and `hidden_states`: a tuple of num_layers + 1 arrays
          [B, L, D] (the embeddings, then each layer's output, the last one before the
          final LayerNorm), as transformers' `output_hidden_states=True` gives.
        """
        if input_ids.ndim != 2:
            raise ValueError(
                f"CLIP text: input_ids must be [batch, length], got {input_ids.shape}."
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CLIP text: input_ids must be integers, got {input_ids.dtype}.")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"CLIP text: sequence length {input_ids.shape[1]} exceeds "
                f"max_position_embeddings={self.max_position_embeddings}; truncate the tokens."
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"CLIP text: attention_mask must have input_ids' shape {input_ids.shape}, "
                f"got {attention_mask.shape}."
            )
        return self.text_model(input_ids, attention_mask)

    def final_norm(self, x: Array) -> Array:
        """The final LayerNorm alone (for clip skip): [..., D] -> [..., D]."""
        return self.text_model.final_layer_norm(x)


def from_hf_config(cfg: Mapping[str, Any], dtype: Any = "float32") -> CLIPTextModel:
    """Builds the model from a transformers `text_encoder/config.json` dict.

    Refuses, by name, options this port does not implement (another `model_type`,
    a `hidden_act` other than quick_gelu/gelu, CLIPTextModelWithProjection); other
    keys (dropout, initializers, token ids other than eos, bookkeeping) are ignored:
    transformers' CLIP text model has no further architectural options.
    """
    cfg = dict(cfg)
    model_type = cfg.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        hint = " (a full CLIPConfig: pass its 'text_config')" if model_type == "clip" else ""
        raise ValueError(
            f"CLIP text: config model_type={model_type!r} is not supported; expected "
            f"'clip_text_model'{hint}."
        )
    archs = cfg.get("architectures") or ["CLIPTextModel"]
    if any(a != "CLIPTextModel" for a in archs):
        raise ValueError(
            f"CLIP text: architectures={archs} is not supported; only CLIPTextModel "
            "(CLIPTextModelWithProjection's text_projection is not implemented)."
        )
    _activation(cfg.get("hidden_act", "quick_gelu"))
    fields = {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "eos_token_id": 49407,
    }
    for name in fields:
        if name in cfg:
            fields[name] = cfg[name]
    return CLIPTextModel(**fields, dtype=dtype)


def canonical_key(key: str) -> str:
    """A checkpoint key in this module's naming: adds the `text_model.` prefix that
    transformers 5.x leaves out (published SD checkpoints already carry it)."""
    return key if key.startswith("text_model.") else "text_model." + key


def ignored_key(key: str) -> bool:
    """File keys that are known and deliberately not loaded: the `position_ids` buffer
    (positions are always 0..L-1 here) that checkpoints written before transformers 4.31
    hold."""
    return canonical_key(key) == "text_model.embeddings.position_ids"


def clip_skip_output(out: Mapping[str, Any], skip: int, *, model: CLIPTextModel, params) -> Array:
    """Prompt embeddings with "clip skip", as diffusers' StableDiffusionPipeline computes them.

    Args:
      out: the dict `CLIPTextModel.__call__` returned.
      skip: layers to skip from the end; 0 = `last_hidden_state`, 1 = the penultimate
        layer's output (SD "clip skip 1" in diffusers' numbering).
      model: the CLIPTextModel that produced `out`.
      params: its parameters (the `params` collection).

    Returns:
      [B, L, D] `final_layer_norm(hidden_states[-(skip + 1)])`.
    """
    hidden_states = out["hidden_states"]
    if not 0 <= skip < len(hidden_states):
        raise ValueError(
            f"clip skip must be in [0, {len(hidden_states) - 1}] for a "
            f"{len(hidden_states) - 1}-layer text encoder, got {skip}."
        )
    return model.apply(
        {"params": params}, hidden_states[-(skip + 1)], method=CLIPTextModel.final_norm
    )
