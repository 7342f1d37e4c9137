"""Stable Diffusion's conditional U-Net (diffusers' `UNet2DConditionModel`, SD 1.x/2.x).

The Flax module tree mirrors diffusers' PyTorch one, so a parameter path joined by "."
is the torch state-dict key (up to the leaf name: `kernel`/`scale` for `weight`):
`down_blocks.0.resnets.1.conv1.kernel` <-> `down_blocks.0.resnets.1.conv1.weight`.
A diffusers `unet/` directory then loads with the generic converter:

    cfg = json.load(open(f"{d}/config.json"))
    model = from_diffusers_config(cfg, dtype="bfloat16")
    abstract = jax.eval_shape(model.init, key, x, t, context=ctx)["params"]
    params = convert.torch_to_flax(safetensors_io.read_tensors(d), abstract, what="unet")

Layout NHWC. Semantics follow diffusers, including its naming quirk: with
`num_attention_heads` unset (0 here, None in diffusers), `attention_head_dim` is the
NUMBER of heads per block (SD 1.x: 8 heads everywhere; SD 2.x: [5, 10, 20, 20] heads of
64 channels). Only the options SD 1.x/2.x use are built; `from_diffusers_config`
refuses the others by name.

One deliberate difference: a `context_mask` row with no real token gives a zero
cross-attention output (diffusers' -10000 bias gives uniform attention instead); rows
with at least one real token agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers as L

Array = jax.Array

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

_CONV_AXES = (None, None, "conv_in", "conv_out")


# ----------------------------------------------------------------------------- layers


def _conv(
    features: int, kernel: int, *, dtype: Any, name: str, strides: int = 1, padding: Any = None
) -> nn.Conv:
    # torch `padding=(k-1)//2` on both sides; explicit, since "SAME" differs at stride 2.
    p = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((p, p), (p, p)) if padding is None else padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=L.partitioned(nn.initializers.lecun_normal(), _CONV_AXES),
        bias_init=L.partitioned(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def _dense(
    features: int, axes: tuple[str, str], *, dtype: Any, name: str, use_bias: bool = True
) -> nn.Dense:
    return L.dense(features, axes, dtype=dtype, use_bias=use_bias, name=name)


def _group_norm(groups: int, channels: int, eps: float, *, dtype: Any, name: str):
    if channels % groups:
        raise ValueError(
            f"GroupNorm {name!r}: {channels} channels are not divisible by "
            f"norm_num_groups={groups}; choose block_out_channels that are multiples of it."
        )
    # Two-pass variance, as torch computes it (the fast E[x^2]-E[x]^2 loses digits).
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=L.partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=L.partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def _layer_norm(eps: float, *, dtype: Any, name: str) -> nn.LayerNorm:
    return L.layer_norm(dtype=dtype, epsilon=eps, fast_variance=False, name=name)


def _resize_nearest(x: Array, size: tuple[int, int]) -> Array:
    """torch `F.interpolate(mode="nearest")`: source index floor(i * in / out)."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = np.minimum(np.floor(np.arange(size[0]) * np.float32(h / size[0])), h - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * np.float32(w / size[1])), w - 1)
    return x[:, rows.astype(np.int32)][:, :, cols.astype(np.int32)]


# ----------------------------------------------------------------------------- blocks


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` ("default" time conditioning: h + Dense(silu(emb)))."""

    out_channels: int
    groups: int
    eps: float
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        """x [B, H, W, C_in], emb [B, E] -> [B, H, W, out_channels]."""
        c_in, c_out, dt = x.shape[-1], self.out_channels, self.dtype
        h = nn.silu(_group_norm(self.groups, c_in, self.eps, dtype=dt, name="norm1")(x))
        h = _conv(c_out, 3, dtype=dt, name="conv1")(h)
        h = h + _dense(c_out, ("mlp", "embed"), dtype=dt, name="time_emb_proj")(nn.silu(emb))[
            :, None, None, :
        ].astype(h.dtype)
        h = nn.silu(_group_norm(self.groups, c_out, self.eps, dtype=dt, name="norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(c_out, 3, dtype=dt, name="conv2")(h)
        if c_in != c_out:
            x = _conv(c_out, 1, dtype=dt, name="conv_shortcut")(x)
        out = x.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Attention(nn.Module):
    """diffusers `Attention` (to_q/to_k/to_v without bias, to_out.0 with bias)."""

    heads: int
    head_dim: int
    upcast: bool = False
    attention_impl: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None) -> Array:
        """x [B, T, D], context [B, S, Dc] (None = self-attention), mask [B, S] -> [B, T, D]."""
        b, t, d = x.shape
        kv = x if context is None else context
        inner = self.heads * self.head_dim
        dt = self.dtype

        def proj(name: str, inp: Array) -> Array:
            y = _dense(inner, ("embed", "mlp"), dtype=dt, use_bias=False, name=name)(inp)
            return y.reshape(*y.shape[:2], self.heads, self.head_dim)

        q, k, v = proj("to_q", x), proj("to_k", kv), proj("to_v", kv)
        if self.upcast:  # SD 2.x: attention scores and softmax in float32
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = L.attention(q, k, v, mask, self.attention_impl).astype(dt)
        out = out.reshape(b, t, inner)
        return _dense(d, ("mlp", "embed"), dtype=dt, name="to_out.0")(out)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm."""

    heads: int
    head_dim: int
    upcast: bool = False
    attention_impl: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array | None) -> Array:
        """x [B, T, D], context [B, S, Dc], mask [B, S] or None -> [B, T, D]."""
        d, dt = x.shape[-1], self.dtype

        def attn(name: str) -> Attention:
            return Attention(
                self.heads, self.head_dim, self.upcast, self.attention_impl, dt, name=name
            )

        x = x + attn("attn1")(_layer_norm(1e-5, dtype=dt, name="norm1")(x))
        x = x + attn("attn2")(_layer_norm(1e-5, dtype=dt, name="norm2")(x), context, mask)
        h = _layer_norm(1e-5, dtype=dt, name="norm3")(x)
        h, gate = jnp.split(
            _dense(8 * d, ("embed", "mlp"), dtype=dt, name="ff.net.0.proj")(h), 2, -1
        )
        h = h * nn.gelu(gate, approximate=False)
        return x + _dense(d, ("mlp", "embed"), dtype=dt, name="ff.net.2")(h)


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on a feature map: norm, proj_in, blocks, proj_out, residual."""

    heads: int
    depth: int
    groups: int
    use_linear_projection: bool = False
    upcast: bool = False
    attention_impl: str = ""
    remat_policy: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: Array | None) -> Array:
        """x [B, H, W, C], context [B, S, Dc], mask [B, S] or None -> [B, H, W, C]."""
        b, hh, ww, c = x.shape
        dt = self.dtype
        head_dim = c // self.heads
        inner = self.heads * head_dim
        h = _group_norm(self.groups, c, 1e-6, dtype=dt, name="norm")(x)
        if self.use_linear_projection:
            h = _dense(inner, ("embed", "mlp"), dtype=dt, name="proj_in")(h.reshape(b, -1, c))
        else:
            h = _conv(inner, 1, dtype=dt, name="proj_in")(h).reshape(b, -1, inner)
        block = L.maybe_remat(BasicTransformerBlock, self.remat_policy)
        for i in range(self.depth):
            blk = block(
                self.heads,
                head_dim,
                self.upcast,
                self.attention_impl,
                dt,
                name=f"transformer_blocks.{i}",
            )
            h = blk(h, context, mask)
        if self.use_linear_projection:
            h = _dense(c, ("mlp", "embed"), dtype=dt, name="proj_out")(h)
            h = h.reshape(b, hh, ww, c)
        else:
            h = _conv(c, 1, dtype=dt, name="proj_out")(h.reshape(b, hh, ww, inner))
        return h + x.astype(h.dtype)


class _Blocks(nn.Module):
    """Shared construction of the resnets/attentions of one down, mid or up block."""

    out_channels: int
    num_layers: int
    cross_attention: bool
    heads: int
    transformer_depth: int
    groups: int
    eps: float
    dropout: float
    output_scale_factor: float
    use_linear_projection: bool
    upcast: bool
    attention_impl: str
    remat_policy: str
    dtype: Any

    def resnet(self, i: int) -> nn.Module:
        cls = L.maybe_remat(ResnetBlock2D, self.remat_policy, static_argnums=(3,))
        return cls(
            self.out_channels,
            self.groups,
            self.eps,
            self.dropout,
            self.output_scale_factor,
            self.dtype,
            name=f"resnets.{i}",
        )

    def attention(self, i: int) -> nn.Module:
        # Each transformer block is rematerialised on its own (inside Transformer2DModel).
        return Transformer2DModel(
            self.heads,
            self.transformer_depth,
            self.groups,
            self.use_linear_projection,
            self.upcast,
            self.attention_impl,
            self.remat_policy,
            self.dtype,
            name=f"attentions.{i}",
        )


class DownBlock(_Blocks):
    """`CrossAttnDownBlock2D` (cross_attention=True) or `DownBlock2D`."""

    downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, h, emb, context, mask, train):
        """-> (h, skips): one skip per resnet(+attention), one more after the downsampler."""
        skips = []
        for i in range(self.num_layers):
            h = self.resnet(i)(h, emb, train)
            if self.cross_attention:
                h = self.attention(i)(h, context, mask)
            skips.append(h)
        if self.downsample:
            p = self.downsample_padding
            # diffusers: padding p on each side; p == 0 means pad (0, 1) then a VALID conv.
            pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
            h = _conv(
                self.out_channels,
                3,
                strides=2,
                padding=pad,
                dtype=self.dtype,
                name="downsamplers.0.conv",
            )(h)
            skips.append(h)
        return h, skips


class MidBlock(_Blocks):
    """`UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) x num_layers."""

    @nn.compact
    def __call__(self, h, emb, context, mask, train):
        h = self.resnet(0)(h, emb, train)
        for i in range(self.num_layers):
            h = self.attention(i)(h, context, mask)
            h = self.resnet(i + 1)(h, emb, train)
        return h


class UpBlock(_Blocks):
    """`CrossAttnUpBlock2D` (cross_attention=True) or `UpBlock2D`."""

    upsample: bool = True

    @nn.compact
    def __call__(self, h, skips, emb, context, mask, train, upsample_size):
        """skips: this block's skip connections (the last is consumed first)."""
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - i].astype(h.dtype)], axis=-1)
            h = self.resnet(i)(h, emb, train)
            if self.cross_attention:
                h = self.attention(i)(h, context, mask)
        if self.upsample:
            h = _resize_nearest(h, upsample_size)
            h = _conv(self.out_channels, 3, dtype=self.dtype, name="upsamplers.0.conv")(h)
        return h


# ----------------------------------------------------------------------------- the model


def _per_block(value: Any, n: int, field: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"SDUNet: {field} has {len(value)} entries but there are {n} blocks "
                f"(len(down_block_types)); give one per block or a single int."
            )
        return tuple(value)
    return (value,) * n


class SDUNet(nn.Module):
    """Stable Diffusion 1.x/2.x U-Net with diffusers' `UNet2DConditionModel` semantics.

    The fields are diffusers' config fields (see `from_diffusers_config`); the defaults are
    SD 1.5's. Attributes beyond diffusers':
      attention_impl: '' (auto) | 'xla' | 'cudnn'.
      dtype: compute dtype string; params stay float32.
      remat_policy: rematerialisation of each resnet and transformer block.

    Fields that SD never changes (only_cross_attention, resnet_time_scale_shift, act_fn,
    time_embedding_type) exist so that configs carry them; other values are refused.
    `num_attention_heads=0` means "unset": `attention_head_dim` is then the number of
    heads (diffusers' quirk).
    """

    sample_size: int | tuple[int, int] = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] = 0
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    attention_impl: str = ""
    dtype: str = "float32"
    remat_policy: str = "none"

    # ------------------------------------------------------------------ structure

    def _check(self) -> None:
        n = len(self.down_block_types)
        if n < 1 or len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                "SDUNet needs as many up_block_types and block_out_channels as "
                f"down_block_types; got {len(self.down_block_types)} down, "
                f"{len(self.up_block_types)} up, {len(self.block_out_channels)} channels."
            )
        for kind, names, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
            ("mid_block_type", (self.mid_block_type,), MID_BLOCK_TYPES),
        ):
            bad = [b for b in names if b not in allowed]
            if bad:
                raise ValueError(f"SDUNet: unsupported {kind} {bad}; supported: {allowed}.")
        fixed = {
            "only_cross_attention": (self.only_cross_attention, False),
            "resnet_time_scale_shift": (self.resnet_time_scale_shift, "default"),
            "act_fn": (self.act_fn, "silu"),
            "time_embedding_type": (self.time_embedding_type, "positional"),
        }
        for field, (value, want) in fixed.items():
            if value != want:
                raise ValueError(
                    f"SDUNet: {field}={value!r} is not supported (Stable Diffusion 1.x/2.x use "
                    f"{want!r})."
                )
        if self.attention_impl == "cudnn" and self.upcast_attention:
            raise ValueError(
                "SDUNet: attention_impl='cudnn' cannot run the float32 attention that "
                "upcast_attention=True asks for; use attention_impl='xla' or ''."
            )
        L.check_remat_policy(self.remat_policy)

    def _heads(self) -> tuple[int, ...]:
        n = len(self.down_block_types)
        heads = self.num_attention_heads or self.attention_head_dim  # diffusers' quirk
        heads = _per_block(heads, n, "attention_head_dim/num_attention_heads")
        for h, c in zip(heads, self.block_out_channels, strict=True):
            if h <= 0 or c % h:
                raise ValueError(
                    f"SDUNet: {c} channels are not divisible by {h} attention heads "
                    "(attention_head_dim is the number of heads when num_attention_heads "
                    "is unset)."
                )
        return heads

    def _blocks_kwargs(self, dt: Any) -> dict[str, Any]:
        return dict(
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            dropout=self.dropout,
            use_linear_projection=self.use_linear_projection,
            upcast=self.upcast_attention,
            attention_impl=self.attention_impl,
            remat_policy=self.remat_policy,
            dtype=dt,
        )

    # ------------------------------------------------------------------ inputs

    def _context(self, context, context_mask, batch):
        dim = self.cross_attention_dim
        if context is None:
            if context_mask is not None:
                raise ValueError("SDUNet: context_mask was given without context.")
            return jnp.zeros((batch, 1, dim), jnp.float32), None
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != dim:
            raise ValueError(
                f"SDUNet: context must be [{batch}, L, cross_attention_dim={dim}] text "
                f"embeddings, got shape {context.shape}."
            )
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"SDUNet: context_mask must be [B, L]={context.shape[:2]}, got "
                    f"{context_mask.shape}."
                )
            context_mask = context_mask.astype(bool)
        return context, context_mask

    @staticmethod
    def _control(control_residuals, skips, h):
        if control_residuals is None:
            return skips, None
        if not isinstance(control_residuals, (tuple, list)) or len(control_residuals) != 2:
            raise ValueError(
                "SDUNet: control_residuals must be (down_residuals, mid_residual), as a "
                "ControlNet returns them."
            )
        down, mid = control_residuals
        if down is None or mid is None or len(down) != len(skips):
            raise ValueError(
                f"SDUNet: control_residuals needs {len(skips)} down residuals (one per skip "
                f"connection) and a mid residual; got "
                f"{None if down is None else len(down)} and {None if mid is None else 'one'}."
            )
        out = []
        for i, (s, r) in enumerate(zip(skips, down, strict=True)):
            if r.shape != s.shape:
                raise ValueError(
                    f"SDUNet: control down residual {i} has shape {r.shape}, expected {s.shape}."
                )
            out.append(s + r.astype(s.dtype))
        if mid.shape != h.shape:
            raise ValueError(
                f"SDUNet: control mid residual has shape {mid.shape}, expected {h.shape}."
            )
        return out, mid

    # ------------------------------------------------------------------ forward

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        labels: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
        control_residuals: tuple[Sequence[Array], Array] | None = None,
    ) -> Array:
        """Predicts the noise (or v) for a noisy latent.

        Args:
          x: [B, H, W, in_channels] noisy latents.
          t: [B] float diffusers timesteps (e.g. 0..999).
          labels: must be None (SD has no class conditioning).
          context: [B, L, cross_attention_dim] text embeddings; None = one zero token.
          context_mask: [B, L] bool, True = real token; None = attend to every token
            (as diffusers' SD pipelines do).
          train: enables dropout (needs rngs={'dropout': key} when dropout > 0).
          control_residuals: optional `(down_residuals, mid_residual)`, NHWC, one down
            residual per skip connection in diffusers' order (conv_in output, then each
            down block's resnet/attention outputs and downsampler output), added as
            diffusers adds `down_block_additional_residuals` /
            `mid_block_additional_residual`.

        Returns:
          [B, H, W, out_channels] float32.
        """
        L.check_inputs(x, t)
        self._check()
        if labels is not None:
            raise ValueError(
                "SDUNet has no class conditioning (Stable Diffusion is text-conditioned); "
                "pass labels=None and the text embeddings as context."
            )
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"SDUNet: x has {x.shape[-1]} channels, the model takes in_channels="
                f"{self.in_channels}."
            )
        dt = L.get_dtype(self.dtype)
        batch, n = x.shape[0], len(self.down_block_types)
        context, context_mask = self._context(context, context_mask, batch)
        context = context.astype(dt)
        heads = self._heads()
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        depths = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        channels = self.block_out_channels
        kw = self._blocks_kwargs(dt)

        # Time embedding: sinusoidal features of width channels[0], then a 4x MLP.
        c0 = channels[0]
        emb = L.sinusoidal_embedding(
            t.astype(jnp.float32),
            c0,
            freq_shift=self.freq_shift,
            flip_sin_to_cos=self.flip_sin_to_cos,
        )
        emb = _dense(4 * c0, ("embed", "mlp"), dtype=dt, name="time_embedding.linear_1")(emb)
        emb = _dense(4 * c0, ("mlp", "embed"), dtype=dt, name="time_embedding.linear_2")(
            nn.silu(emb)
        )

        h = x.astype(jnp.float32)
        if self.center_input_sample:
            h = 2 * h - 1.0
        h = _conv(c0, 3, dtype=dt, name="conv_in")(h.astype(dt))

        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            h, s = DownBlock(
                channels[i],
                layers[i],
                kind == "CrossAttnDownBlock2D",
                heads[i],
                depths[i],
                output_scale_factor=1.0,
                downsample=i < n - 1,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks.{i}",
                **kw,
            )(h, emb, context, context_mask, train)
            skips += s

        skips, mid_residual = self._control(control_residuals, skips, h)
        h = MidBlock(
            channels[-1],
            1,
            True,
            heads[-1],
            depths[-1],
            output_scale_factor=self.mid_block_scale_factor,
            name="mid_block",
            **kw,
        )(h, emb, context, context_mask, train)
        if mid_residual is not None:
            h = h + mid_residual.astype(h.dtype)

        rev_channels, rev_heads = channels[::-1], heads[::-1]
        rev_layers, rev_depths = layers[::-1], depths[::-1]
        for i, kind in enumerate(self.up_block_types):
            num = rev_layers[i] + 1
            block_skips, skips = skips[-num:], skips[:-num]
            last = i == n - 1
            # diffusers up-samples to the next skip's size (2x unless H, W are odd there).
            size = None if last else tuple(skips[-1].shape[1:3])
            h = UpBlock(
                rev_channels[i],
                num,
                kind == "CrossAttnUpBlock2D",
                rev_heads[i],
                rev_depths[i],
                output_scale_factor=1.0,
                upsample=not last,
                name=f"up_blocks.{i}",
                **kw,
            )(h, block_skips, emb, context, context_mask, train, size)

        h = nn.silu(
            _group_norm(self.norm_num_groups, c0, self.norm_eps, dtype=dt, name="conv_norm_out")(h)
        )
        h = _conv(self.out_channels, 3, dtype=dt, name="conv_out")(h)
        return h.astype(jnp.float32)


# ----------------------------------------------------------------------------- diffusers configs

# Keys of a diffusers UNet2DConditionModel config.json that map onto SDUNet fields.
_FIELDS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "dropout",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "resnet_time_scale_shift",
    "time_embedding_type",
)

# Keys that are fine at the value SD uses (diffusers' defaults); anything else is refused.
_NEUTRAL = {
    "class_embeddings_concat": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "dual_cross_attention": False,
    "addition_embed_type_num_heads": 64,
}

# Keys that must be None (unset) for SD 1.x/2.x.
_MUST_BE_NONE = (
    "addition_embed_type",
    "addition_time_embed_dim",
    "class_embed_type",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "num_class_embeds",
    "projection_class_embeddings_input_dim",
    "time_cond_proj_dim",
    "time_embedding_act_fn",
    "time_embedding_dim",
    "timestep_post_act",
    "reverse_transformer_layers_per_block",
    "cross_attention_norm",
    "mid_block_only_cross_attention",
)

_METADATA = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def from_diffusers_config(cfg: Mapping[str, Any], dtype: str = "float32", **kwargs: Any) -> SDUNet:
    """Builds an `SDUNet` from a diffusers `unet/config.json` dict.

    Args:
      cfg: the parsed config (UNet2DConditionModel, SD 1.x/2.x options only).
      dtype: compute dtype string.
      **kwargs: further SDUNet fields (`attention_impl`, `remat_policy`).

    Returns:
      An unbound SDUNet.

    Raises:
      ValueError: an option SD 1.x/2.x do not use (named in the message), or an unknown key.
    """
    return SDUNet(**diffusers_fields(cfg), dtype=dtype, **kwargs)


def diffusers_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `SDUNet` fields of a diffusers `unet/config.json` dict (what
    `from_diffusers_config` builds; `model.kwargs` of an `sd_unet` config).

    Raises:
      ValueError: an option SD 1.x/2.x do not use (named in the message), or an unknown key.
    """
    cls = cfg.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ValueError(
            f"from_diffusers_config reads UNet2DConditionModel configs, got _class_name={cls!r}."
        )
    fields: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in cfg.items():
        if key in _METADATA:
            continue
        if key in _FIELDS:
            if value is None:
                continue  # an unset optional (num_attention_heads, sample_size): the default
            fields[key] = _plain(value)
        elif key in _NEUTRAL:
            if value != _NEUTRAL[key]:
                problems.append(f"{key}={value!r} (supported: {_NEUTRAL[key]!r})")
        elif key in _MUST_BE_NONE:
            if value is not None:
                problems.append(f"{key}={value!r} (supported: unset/None)")
        else:
            problems.append(f"{key}={value!r} (unknown option)")

    oca = fields.get("only_cross_attention", False)
    if isinstance(oca, tuple):
        if any(oca):
            problems.append(f"only_cross_attention={list(oca)!r} (supported: False)")
        fields["only_cross_attention"] = False
    cad = fields.get("cross_attention_dim")
    if isinstance(cad, tuple):
        if len(set(cad)) != 1:
            problems.append(
                f"cross_attention_dim={list(cad)!r} (supported: one width for every block)"
            )
        else:
            fields["cross_attention_dim"] = cad[0]
    tlp = fields.get("transformer_layers_per_block")
    if isinstance(tlp, tuple) and any(isinstance(v, tuple) for v in tlp):
        problems.append(
            f"transformer_layers_per_block={list(tlp)!r} (supported: an int or one int per block)"
        )
    for key, allowed in (
        ("down_block_types", DOWN_BLOCK_TYPES),
        ("up_block_types", UP_BLOCK_TYPES),
        ("mid_block_type", MID_BLOCK_TYPES),
    ):
        value = fields.get(key)
        names = (value,) if isinstance(value, str) else (value or ())
        bad = [b for b in names if b not in allowed]
        if bad:
            problems.append(f"{key} {bad} (supported: {list(allowed)})")
    for key, want in (
        ("only_cross_attention", False),
        ("resnet_time_scale_shift", "default"),
        ("act_fn", "silu"),
        ("time_embedding_type", "positional"),
    ):
        if key in fields and fields[key] != want:
            problems.append(f"{key}={fields[key]!r} (supported: {want!r})")
    if "mid_block_type" in cfg and cfg["mid_block_type"] is None:
        problems.append("mid_block_type=None (supported: 'UNetMidBlock2DCrossAttn')")
    if cfg.get("norm_num_groups", 32) is None:
        problems.append("norm_num_groups=None (supported: an int)")
    if problems:
        raise ValueError(
            "This U-Net config uses options that SDUNet (Stable Diffusion 1.x/2.x) does not "
            "support: " + "; ".join(problems) + "."
        )
    if isinstance(fields.get("mid_block_scale_factor"), int):
        fields["mid_block_scale_factor"] = float(fields["mid_block_scale_factor"])
    return fields


def diffusers_config(model: SDUNet) -> dict[str, Any]:
    """The diffusers `unet/config.json` of `model` (the inverse of `diffusers_fields`)."""
    cfg: dict[str, Any] = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0"}
    for f in dataclasses.fields(model):
        if f.name in _FIELDS:
            value = getattr(model, f.name)
            if f.name == "num_attention_heads" and not value:
                value = None  # diffusers: heads = attention_head_dim
            cfg[f.name] = list(value) if isinstance(value, tuple) else value
    return cfg


def count_skips(model: SDUNet) -> int:
    """Number of skip connections (= ControlNet down residuals) of a model."""
    n = len(model.down_block_types)
    layers = _per_block(model.layers_per_block, n, "layers_per_block")
    return 1 + sum(layers) + (n - 1)


__all__ = [
    "SDUNet",
    "count_skips",
    "diffusers_config",
    "diffusers_fields",
    "from_diffusers_config",
]
