"""ControlNet (Zhang et al. 2023): spatial control of a frozen base through zero convs.

A ControlNet is a trainable copy of the base's encoder half (time/class/text embedding,
input conv, down blocks and bottleneck; for a DiT its first N blocks) that also sees a
control image (edges, a mask, a low-resolution tile ...) through a small convolutional
embedding. Its features leave through zero-initialised 1x1 convs (linears for a DiT) and
are added to the base's skip connections and bottleneck output, so at initialisation the
base computes exactly what it computed before.

Every ControlNet family follows one interface (`diffjax/models/sd_controlnet.py` for the
diffusers-compatible SD one, `dit_controlnet.py` for DiTs, `UNetControlNet` here for
diffjax's own U-Net):

    residuals = controlnet.apply({"params": p}, x, t, labels, context, context_mask,
                                 train=False, control=ctrl)

`ctrl` is float32 NHWC in [0, 1] at the output image's resolution (the embedding
downsamples it to the model's: 8x for Stable Diffusion's latents); `residuals` are raw
(unscaled): `(down_residuals, mid_residual)` for U-Nets, a tuple of N block residuals for
a DiT, exactly what the base's `control_residuals=` argument takes. `Controlled` runs one
or more ControlNets, scales (`conditioning_scale`, guess mode) and sums their residuals
and feeds them to the base: its params are `{"base": ..., "controlnets_0": ..., ...}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers as L
from diffjax.models.unet import UNet

Array = jax.Array

_ZERO = nn.initializers.zeros_init()
# diffusers' ControlNetConditioningEmbedding widths (Stable Diffusion: 3 stride-2 convs).
SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def torch_conv_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """PyTorch's default conv kernel init (a fresh diffusers ControlNet embedding's):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Drawn flat and reshaped: XLA:CPU compiles the
    threefry bits of a 4-D kernel shape such as (3, 3, 8, 12) in ~15 s, a flat vector's
    in < 1 s."""
    bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
    flat = jax.random.uniform(key, (int(np.prod(shape)),), dtype, -bound, bound)
    return flat.reshape(shape)


def _conv(features: int, kernel: int, *, strides: int = 1, init=None, dtype=jnp.float32, name):
    # torch's `padding=(k-1)//2` on both sides, so a stride-2 conv matches diffusers'.
    p = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((p, p), (p, p)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=L.partitioned(
            torch_conv_init if init is None else init, (None, None, "conv_in", "conv_out")
        ),
        bias_init=L.partitioned(_ZERO, ("conv_out",)),
        name=name,
    )


def embedding_widths(channels: Sequence[int], downsample: int) -> tuple[int, ...]:
    """The condition embedding's widths for a control `downsample` times the model's
    resolution: `channels` as given, or () -> diffusers' (16, 32, 96, 256) cut to the
    stride-2 stages needed (at least two widths)."""
    stages = control_stages(downsample)
    if channels:
        channels = tuple(int(c) for c in channels)
        if len(channels) - 1 < stages:
            raise ValueError(
                f"controlnet.embedding_channels={channels} has {len(channels) - 1} stage(s), "
                f"but a control {downsample}x the model's resolution needs {stages} stride-2 "
                f"stages; give at least {stages + 1} widths."
            )
        return channels
    if stages + 1 > len(SD_EMBEDDING_CHANNELS):
        raise ValueError(f"control_downsample={downsample} needs embedding_channels given.")
    return SD_EMBEDDING_CHANNELS[: max(2, stages + 1)]


def control_stages(downsample: int) -> int:
    stages = int(np.log2(downsample)) if downsample >= 1 else -1
    if downsample < 1 or 2**stages != downsample:
        raise ValueError(
            f"control_downsample must be a power of two >= 1 (the output image's size over "
            f"the model's), got {downsample}."
        )
    return stages


class ConditionEmbedding(nn.Module):
    """The control image -> features at the model's resolution (diffusers'
    `ControlNetConditioningEmbedding`, names and all): conv_in, then per stage a 3x3 conv
    and a 3x3 conv to the next width (stride 2 for the last `downsample_stages` stages),
    SiLU after each, and a zero-initialised conv_out to `out_channels` (none when 0: a
    DiT's zero patch embedding follows instead)."""

    out_channels: int
    channels: tuple[int, ...] = (16, 32, 96, 256)
    downsample_stages: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, control: Array) -> Array:
        chans = self.channels
        n = len(chans) - 1
        h = nn.silu(
            _conv(chans[0], 3, dtype=self.dtype, name="conv_in")(control.astype(self.dtype))
        )
        for i in range(n):
            h = nn.silu(_conv(chans[i], 3, dtype=self.dtype, name=f"blocks.{2 * i}")(h))
            stride = 2 if i >= n - self.downsample_stages else 1
            h = _conv(
                chans[i + 1], 3, strides=stride, dtype=self.dtype, name=f"blocks.{2 * i + 1}"
            )(h)
            h = nn.silu(h)
        if not self.out_channels:
            return h
        return _conv(self.out_channels, 3, init=_ZERO, dtype=self.dtype, name="conv_out")(h)


def zero_conv(x: Array, *, dtype: Any, name: str) -> Array:
    """A zero-initialised 1x1 conv (a ControlNet's exit to the base), channels kept."""
    return _conv(x.shape[-1], 1, init=_ZERO, dtype=dtype, name=name)(x)


def check_control(control: Array | None, x: Array, downsample: int, channels: int, who: str):
    """A clear error unless `control` is [B, H*f, W*f, channels] for x [B, H, W, C]."""
    if control is None:
        raise ValueError(f"{who} needs control= (the control image, NHWC float in [0, 1]).")
    b, h, w = x.shape[:3]
    want = (b, h * downsample, w * downsample, channels)
    if tuple(control.shape) != want:
        raise ValueError(
            f"{who}: control must be [B, H, W, C] = {list(want)} (the output image's size, "
            f"{downsample}x the model input's, with {channels} channels), got "
            f"{list(control.shape)}."
        )


class UNetControlNet(UNet):
    """A ControlNet for diffjax's `UNet`: its fields plus the control's.

    Param names of the copied parts are the U-Net's own (`time_embed`, `label_emb`,
    `text_encoder`, `conv_in`, `down*`, `mid_*`), so `init_from_base` copies them; the
    new parts are `controlnet_cond_embedding`, `controlnet_down{i}` (one zero 1x1 conv
    per skip) and `controlnet_mid`.

    Attributes:
      conditioning_channels: channels of the control image; 0 = the input's.
      control_downsample: output image size over the model's (1 for pixel models, the
        VAE's factor for latent ones).
      embedding_channels: the condition embedding's widths; () = (16, 32) or diffusers'
        (16, 32, 96, 256) cut to the stride-2 stages needed.
    """

    conditioning_channels: int = 0
    control_downsample: int = 1
    embedding_channels: tuple[int, ...] = ()

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        labels: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
        control: Array | None = None,
    ) -> tuple[tuple[Array, ...], Array]:
        """The raw residuals `(down, mid)` for `UNet(control_residuals=...)`."""
        dt = L.get_dtype(self.dtype)
        cc = self.conditioning_channels or x.shape[-1]
        check_control(control, x, self.control_downsample, cc, "UNetControlNet")
        emb, context, context_mask = self._inputs(x, t, labels, context, context_mask)
        h = L.conv(
            self.base_channels,
            3,
            dtype=dt,
            kernel_init=nn.initializers.lecun_normal(),
            name="conv_in",
        )(x.astype(dt))
        h = h + ConditionEmbedding(
            self.base_channels,
            embedding_widths(self.embedding_channels, self.control_downsample),
            control_stages(self.control_downsample),
            dt,
            name="controlnet_cond_embedding",
        )(control).astype(h.dtype)
        h, skips = self._encoder(h, emb, context, context_mask, train)
        h = self._middle(h, emb, context, context_mask, train)
        down = tuple(
            zero_conv(s, dtype=dt, name=f"controlnet_down{i}").astype(jnp.float32)
            for i, s in enumerate(skips)
        )
        return down, zero_conv(h, dtype=dt, name="controlnet_mid").astype(jnp.float32)


# ----------------------------------------------------------------------------- init


def init_from_base(base_params: Mapping[str, Any], controlnet_params: Mapping[str, Any]):
    """ControlNet params with every part it shares with the base copied from the base.

    The shared parts are the top-level entries both trees have (the ControlNet's copies
    carry the base's names); each must match the base's in structure and shapes. The
    rest (condition embedding, zero convs) stays as initialised. Works for every family
    whose shared names are top-level (`UNetControlNet`, the SD ControlNet; a DiT's
    `dit_controlnet.init_from_base` first unstacks a scanned base).
    """
    out = dict(controlnet_params)
    for name, sub in controlnet_params.items():
        if name not in base_params:
            continue
        base = base_params[name]
        if jax.tree.structure(base) != jax.tree.structure(sub) or any(
            np.shape(a) != np.shape(b)
            for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(sub), strict=True)
        ):
            raise ValueError(
                f"ControlNet init: its {name!r} does not match the base's (another "
                "architecture); build the ControlNet from the base's own model fields."
            )
        out[name] = jax.tree.map(jnp.asarray, base)
    return out


# ----------------------------------------------------------------------------- composition


def guess_scales(n: int) -> np.ndarray:
    """Guess mode's per-residual factors: logspace(-1, 0, n), shallow to deep (diffusers)."""
    return np.logspace(-1.0, 0.0, n, dtype=np.float64).astype(np.float32)


def scale_residuals(residuals: Any, scale: Array | float, guess_mode: bool = False) -> Any:
    """Residuals times `scale` (a scalar or per-sample [B]); with `guess_mode` also times
    `guess_scales` over the flattened residuals in order (down..., mid / block 0..N-1)."""
    leaves, treedef = jax.tree.flatten(residuals)
    factors = guess_scales(len(leaves)) if guess_mode else np.ones(len(leaves), np.float32)
    scale = jnp.asarray(scale, jnp.float32)
    out = []
    for r, f in zip(leaves, factors, strict=True):
        s = scale.reshape(scale.shape + (1,) * (r.ndim - scale.ndim)) if scale.ndim else scale
        out.append(r * (s * f).astype(r.dtype))
    return jax.tree.unflatten(treedef, out)


class Controlled(nn.Module):
    """A base denoiser driven by one or more ControlNets: same call as the base, plus
    `control` (one control image, or a tuple of one per ControlNet) and `control_scale`
    ([B, K] per-sample, per-ControlNet scales; None = ones). With `control=None` the base
    runs alone. The residuals of the ControlNets are scaled and summed.

    Params: `{"base": ..., "controlnets_0": ..., "controlnets_1": ...}`.
    """

    base: nn.Module
    controlnets: tuple[nn.Module, ...]
    guess_mode: bool = False

    def __post_init__(self) -> None:
        # One instance given twice would be ONE submodule (shared params); each ControlNet
        # gets its own copy, hence its own `controlnets_i` tree.
        object.__setattr__(self, "controlnets", tuple(n.clone() for n in self.controlnets))
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        labels: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
        control: Array | Sequence[Array] | None = None,
        control_scale: Array | None = None,
    ) -> Array:
        cond = dict(labels=labels, context=context, context_mask=context_mask, train=train)
        if control is None:
            return self.base(x, t, **cond)
        k = len(self.controlnets)
        controls = (control,) if not isinstance(control, (tuple, list)) else tuple(control)
        if len(controls) != k:
            raise ValueError(f"{k} ControlNet(s) need {k} control image(s), got {len(controls)}.")
        if control_scale is None:
            control_scale = jnp.ones((x.shape[0], k), jnp.float32)
        if control_scale.shape != (x.shape[0], k):
            raise ValueError(
                f"control_scale must be [B, K] = [{x.shape[0]}, {k}], got {control_scale.shape}."
            )
        total = None
        for i, (net, c) in enumerate(zip(self.controlnets, controls, strict=True)):
            r = scale_residuals(net(x, t, control=c, **cond), control_scale[:, i], self.guess_mode)
            total = r if total is None else jax.tree.map(jnp.add, total, r)
        return self.base(x, t, control_residuals=total, **cond)
