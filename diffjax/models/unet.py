"""U-Net of the DDPM / ADM lineage, with optional latent-diffusion text cross-attention.

One module covers:
  * DDPM (Ho et al. 2020): additive time conditioning, conv resampling, one-head
    attention at 16x16 (`preset_kwargs('ddpm_cifar10')`, 35.7M params);
  * ADM (Dhariwal & Nichol 2021): scale-shift norm ("AdaGN"), BigGAN
    up/down residual blocks, multi-head attention with fixed head width, class
    conditioning, learned sigma (`preset_kwargs('adm_imagenet64')`);
  * LDM (Rombach et al. 2022): with `context_dim > 0` the attention blocks become
    spatial transformers (self-attention, masked cross-attention to the text, GEGLU MLP).

Resolutions in `attention_resolutions` are spatial sizes (e.g. 16 means "at the
16x16 feature maps"), so one preset works for any input size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers as L
from diffjax.models import text as T

Array = jax.Array

# DDPM/ADM initialise convs and linears with Glorot-uniform-style fan-avg scaling.
_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_ZERO = nn.initializers.zeros_init()


def _upsample(x: Array) -> Array:
    """Nearest-neighbour x2: [B, H, W, C] -> [B, 2H, 2W, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avgpool(x: Array) -> Array:
    """2x2 average pooling: [B, H, W, C] -> [B, H/2, W/2, C]."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3x3 conv, or 2x2 average pooling."""

    use_conv: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.use_conv:
            return L.conv(x.shape[-1], 3, strides=2, dtype=self.dtype, kernel_init=_INIT)(x)
        return _avgpool(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then an optional 3x3 conv."""

    use_conv: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _upsample(x)
        if self.use_conv:
            x = L.conv(x.shape[-1], 3, dtype=self.dtype, kernel_init=_INIT)(x)
        return x


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding vector.

    Attributes:
      out_channels: output width.
      dropout: dropout rate before the second conv.
      scale_shift: ADM's `h = norm(h) * (1 + scale) + shift`; otherwise DDPM's
        additive `h = h + Dense(emb)` before the second norm.
      resample: '' | 'up' | 'down' (BigGAN-style resampling inside the block).
      num_groups: GroupNorm groups.
      dtype: compute dtype.
    """

    out_channels: int
    dropout: float = 0.0
    scale_shift: bool = False
    resample: str = ""
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> Array:
        """x [B, H, W, C], emb [B, E] -> [B, H', W', out_channels]."""
        c_in, c_out = x.shape[-1], self.out_channels
        h = nn.silu(L.group_norm(self.num_groups, c_in, dtype=self.dtype, name="norm1")(x))
        if self.resample == "up":
            h, x = _upsample(h), _upsample(x)
        elif self.resample == "down":
            h, x = _avgpool(h), _avgpool(x)
        h = L.conv(c_out, 3, dtype=self.dtype, kernel_init=_INIT, name="conv1")(h)

        e = L.dense(
            2 * c_out if self.scale_shift else c_out,
            ("embed", "mlp"),
            dtype=self.dtype,
            kernel_init=_INIT,
            name="emb_proj",
        )(nn.silu(emb))[:, None, None, :]
        norm2 = L.group_norm(self.num_groups, c_out, dtype=self.dtype, name="norm2")
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + e)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = L.conv(c_out, 3, dtype=self.dtype, kernel_init=_ZERO, name="conv2")(h)

        if c_in != c_out:
            x = L.conv(c_out, 1, dtype=self.dtype, kernel_init=_INIT, name="skip")(x)
        return L.constrain(x + h, L.FEATURE_MAP_AXES)


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual: x + proj(attn(norm(x)))."""

    num_heads: int = 1
    head_channels: int = 0
    num_groups: int = 32
    attention_impl: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None, context_mask: Array | None) -> Array:
        """x [B, H, W, C] -> [B, H, W, C]; context is ignored (uniform block signature)."""
        del context, context_mask
        b, hh, ww, c = x.shape
        heads, head_dim = L.num_heads_for(c, self.num_heads, self.head_channels)
        h = L.group_norm(self.num_groups, c, dtype=self.dtype, name="norm")(x)
        h = L.MultiHeadAttention(
            heads,
            head_dim,
            zero_out=True,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            kernel_init=_INIT,
            name="attn",
        )(h.reshape(b, hh * ww, c))
        return x + h.reshape(b, hh, ww, c)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, masked cross-attention, GEGLU MLP."""

    num_heads: int
    head_dim: int
    attention_impl: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array) -> Array:
        """x [B, T, D], context [B, S, Dc], context_mask [B, S] bool -> [B, T, D]."""
        d = x.shape[-1]

        def mha(name: str) -> L.MultiHeadAttention:
            return L.MultiHeadAttention(
                self.num_heads,
                self.head_dim,
                qkv_bias=False,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                name=name,
            )

        x = x + mha("self_attn")(L.layer_norm(dtype=self.dtype, epsilon=1e-5, name="ln1")(x))
        h = L.layer_norm(dtype=self.dtype, epsilon=1e-5, name="ln2")(x)
        x = x + mha("cross_attn")(h, context, context_mask)
        h = L.layer_norm(dtype=self.dtype, epsilon=1e-5, name="ln3")(x)
        h, gate = jnp.split(
            L.dense(8 * d, ("embed", "mlp"), dtype=self.dtype, name="ff_in")(h), 2, -1
        )
        h = h * nn.gelu(gate, approximate=False)
        return x + L.dense(d, ("mlp", "embed"), dtype=self.dtype, name="ff_out")(h)


class SpatialTransformer(nn.Module):
    """Latent-diffusion text block: norm, proj_in, transformer blocks, zero proj_out, residual."""

    num_heads: int = 1
    head_channels: int = 0
    depth: int = 1
    num_groups: int = 32
    attention_impl: str = ""
    remat_policy: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array) -> Array:
        """x [B, H, W, C], context [B, S, Dc], mask [B, S] -> [B, H, W, C]."""
        b, hh, ww, c = x.shape
        heads, head_dim = L.num_heads_for(c, self.num_heads, self.head_channels)
        h = L.group_norm(self.num_groups, c, dtype=self.dtype, name="norm")(x)
        h = L.dense(c, ("embed", "mlp"), dtype=self.dtype, name="proj_in")(h.reshape(b, -1, c))
        block = L.maybe_remat(TransformerBlock, self.remat_policy)
        for i in range(self.depth):
            h = block(heads, head_dim, self.attention_impl, self.dtype, name=f"block{i}")(
                h, context, context_mask
            )
        h = L.dense(c, ("mlp", "embed"), dtype=self.dtype, kernel_init=_ZERO, name="proj_out")(h)
        return x + h.reshape(b, hh, ww, c)


class UNet(nn.Module):
    """Denoising U-Net.

    Attributes:
      base_channels: width of the first level; the time embedding is 4x this.
      channel_mult: width multiplier per level; len = number of resolutions.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attention_resolutions: spatial sizes at which to add attention blocks.
      mid_attention: attention in the middle (bottleneck) block.
      num_heads: attention heads (when head_channels == 0).
      head_channels: fixed channels per head (ADM); 0 = use num_heads.
      dropout: residual-block dropout rate (active only with train=True).
      scale_shift_norm: ADM scale-shift conditioning instead of DDPM's additive one.
      resblock_updown: BigGAN residual up/down blocks instead of plain resampling.
      conv_resample: a 3x3 conv in plain up/down sampling.
      num_groups: GroupNorm groups.
      num_classes: class count (0 = unconditional); the table has a null row more.
      learn_sigma: output 2C channels (epsilon and the variance interpolation v).
      out_channels: output channels before learn_sigma doubling (0 = input channels).
      time_scale: t is multiplied by this before the time embedding.
      time_embedding: 'sinusoidal' | 'fourier'.
      context_dim: text embedding width (0 = no text); > 0 turns attention blocks
        into spatial transformers with cross-attention.
      transformer_depth: transformer blocks per spatial transformer.
      text_vocab_size: > 0 gives the model its own trainable `TextEncoder`
        (width context_dim); `context` is then int token ids [B, L] (see
        diffjax.models.text), not embeddings.
      text_depth: TextEncoder blocks.
      text_heads: TextEncoder attention heads.
      attention_impl: '' (auto) | 'xla' | 'cudnn'.
      dtype: compute dtype string; params stay float32.
      remat_policy: per-block rematerialisation ('none', 'full', or a
        jax.checkpoint_policies name).
    """

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    num_heads: int = 1
    head_channels: int = 0
    dropout: float = 0.1
    scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    num_groups: int = 32
    num_classes: int = 0
    learn_sigma: bool = False
    out_channels: int = 0
    time_scale: float = 1.0
    time_embedding: str = "sinusoidal"
    context_dim: int = 0
    transformer_depth: int = 1
    text_vocab_size: int = 0
    text_depth: int = 2
    text_heads: int = 4
    attention_impl: str = ""
    dtype: str = "float32"
    remat_policy: str = "none"

    def _attn(self, name: str) -> nn.Module:
        dt = L.get_dtype(self.dtype)
        if self.context_dim > 0:
            cls = L.maybe_remat(SpatialTransformer, self.remat_policy)
            return cls(
                self.num_heads,
                self.head_channels,
                self.transformer_depth,
                self.num_groups,
                self.attention_impl,
                "none",  # the whole spatial transformer is already rematerialised
                dt,
                name=name,
            )
        cls = L.maybe_remat(AttentionBlock, self.remat_policy)
        return cls(
            self.num_heads, self.head_channels, self.num_groups, self.attention_impl, dt, name=name
        )

    def _res(self, out_channels: int, resample: str, name: str) -> nn.Module:
        cls = L.maybe_remat(ResBlock, self.remat_policy, static_argnums=(3,))
        return cls(
            out_channels,
            self.dropout,
            self.scale_shift_norm,
            resample,
            self.num_groups,
            L.get_dtype(self.dtype),
            name=name,
        )

    def _check(self, x: Array) -> None:
        levels = len(self.channel_mult)
        if levels < 1:
            raise ValueError("channel_mult needs at least one level, e.g. (1, 2).")
        h, w = x.shape[1:3]
        if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
            raise ValueError(
                f"UNet with {levels} levels needs H and W divisible by {2 ** (levels - 1)}, "
                f"got {h}x{w}; use fewer channel_mult entries or pad the input."
            )
        if self.time_embedding not in L.TIME_EMBEDDINGS:
            raise ValueError(
                f"Unknown time_embedding {self.time_embedding!r}; use one of {L.TIME_EMBEDDINGS}."
            )
        L.check_remat_policy(self.remat_policy)

    def _inputs(self, x, t, labels, context, context_mask):
        """Checks the inputs; the embedding vector [B, 4C] and the (encoded) context."""
        L.check_inputs(x, t)
        self._check(x)
        batch = x.shape[0]
        labels = L.check_labels(labels, self.num_classes, batch)
        if self.text_vocab_size > 0:
            context, context_mask = T.encode_context(self, context, context_mask, batch)
        context, context_mask = L.check_context(context, context_mask, self.context_dim, batch)
        ch = self.base_channels
        emb = L.TimestepEmbedding(
            4 * ch,
            ch,
            kind=self.time_embedding,
            time_scale=self.time_scale,
            dtype=L.get_dtype(self.dtype),
            kernel_init=_INIT,
            name="time_embed",
        )(t)
        if labels is not None:
            emb = emb + L.class_embedding(
                self.num_classes, 4 * ch, init=nn.initializers.normal(1.0)
            )(labels).astype(emb.dtype)
        return emb, context, context_mask

    def _encoder(self, h, emb, context, context_mask, train):
        """conv_in output `h` -> the bottleneck input and the skips (down path)."""
        dt = L.get_dtype(self.dtype)
        res = h.shape[1]
        skips = [h]
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = self._res(mult * self.base_channels, "", f"down{level}_res{i}")(h, emb, train)
                if res in self.attention_resolutions:
                    h = self._attn(f"down{level}_attn{i}")(h, context, context_mask)
                skips.append(h)
            if level != last:
                if self.resblock_updown:
                    h = self._res(mult * self.base_channels, "down", f"down{level}_resample")(
                        h, emb, train
                    )
                else:
                    h = Downsample(self.conv_resample, dt, name=f"down{level}_resample")(h)
                skips.append(h)
                res //= 2
        return h, skips

    def _middle(self, h, emb, context, context_mask, train):
        mid = self.channel_mult[-1] * self.base_channels
        h = self._res(mid, "", "mid_res0")(h, emb, train)
        if self.mid_attention:
            h = self._attn("mid_attn")(h, context, context_mask)
        return self._res(mid, "", "mid_res1")(h, emb, train)

    @staticmethod
    def _control(control_residuals, skips, h):
        """Adds a ControlNet's residuals `(down, mid)` to the skips; returns the mid one."""
        if control_residuals is None:
            return skips, None
        if not isinstance(control_residuals, (tuple, list)) or len(control_residuals) != 2:
            raise ValueError(
                "UNet: control_residuals must be (down_residuals, mid_residual), as a "
                "ControlNet returns them."
            )
        down, mid = control_residuals
        if len(down) != len(skips):
            raise ValueError(
                f"UNet: control_residuals needs {len(skips)} down residuals (one per skip "
                f"connection), got {len(down)}."
            )
        for i, (s, r) in enumerate(zip(skips, down, strict=True)):
            if r.shape != s.shape:
                raise ValueError(
                    f"UNet: control down residual {i} has shape {r.shape}, expected {s.shape}."
                )
        if mid.shape != h.shape:
            raise ValueError(
                f"UNet: control mid residual has shape {mid.shape}, expected {h.shape}."
            )
        return [s + r.astype(s.dtype) for s, r in zip(skips, down, strict=True)], mid

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        labels: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
        control_residuals: tuple[list[Array], Array] | None = None,
    ) -> Array:
        """Predicts the configured target.

        Args:
          x: [B, H, W, C] noisy images.
          t: [B] float time in the schedule's convention (scaled by `time_scale`).
          labels: [B] int32 in [0, num_classes]; `num_classes` is the null class;
            None = null class for a class-conditional model.
          context: [B, L, context_dim] text embeddings, or [B, L] int token ids
            when text_vocab_size > 0 (None = null caption).
          context_mask: [B, L] bool, True = real token.
          train: enables dropout (needs rngs={'dropout': key}).
          control_residuals: a ControlNet's `(down_residuals, mid_residual)`
            (`diffjax.models.controlnet`): one down residual per skip connection, in the
            order they are made (conv_in output, each level's blocks, its downsampler),
            added to the skips; the mid one to the bottleneck's output. None = none.

        Returns:
          [B, H, W, C_out] float32, C_out = (out_channels or C) * (2 if learn_sigma else 1).
        """
        dt = L.get_dtype(self.dtype)
        emb, context, context_mask = self._inputs(x, t, labels, context, context_mask)
        out_ch = (self.out_channels or x.shape[-1]) * (2 if self.learn_sigma else 1)
        ch = self.base_channels

        h = L.conv(ch, 3, dtype=dt, kernel_init=_INIT, name="conv_in")(x.astype(dt))
        h, skips = self._encoder(h, emb, context, context_mask, train)
        skips, mid_residual = self._control(control_residuals, skips, h)
        h = self._middle(h, emb, context, context_mask, train)
        if mid_residual is not None:
            h = h + mid_residual.astype(h.dtype)

        res = x.shape[1] // 2 ** (len(self.channel_mult) - 1)
        for level in reversed(range(len(self.channel_mult))):
            mult = self.channel_mult[level]
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._res(mult * ch, "", f"up{level}_res{i}")(h, emb, train)
                if res in self.attention_resolutions:
                    h = self._attn(f"up{level}_attn{i}")(h, context, context_mask)
            if level != 0:
                if self.resblock_updown:
                    h = self._res(mult * ch, "up", f"up{level}_resample")(h, emb, train)
                else:
                    h = Upsample(self.conv_resample, dt, name=f"up{level}_resample")(h)
                res *= 2

        h = nn.silu(L.group_norm(self.num_groups, h.shape[-1], dtype=dt, name="norm_out")(h))
        h = L.conv(out_ch, 3, dtype=dt, kernel_init=_ZERO, name="conv_out")(h)
        return h.astype(jnp.float32)
