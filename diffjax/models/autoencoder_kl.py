"""The KL autoencoder of latent diffusion (Stable Diffusion 1.x/2.x/SDXL VAE), diffusers semantics.

The module tree mirrors diffusers' `AutoencoderKL`, so a Flax parameter path joined
by "." is the PyTorch state-dict key (leaf names aside: `weight` -> `kernel`/`scale`):

  encoder.conv_in, encoder.down_blocks.N.resnets.M.{norm1,conv1,norm2,conv2,conv_shortcut},
  encoder.down_blocks.N.downsamplers.0.conv, encoder.mid_block.resnets.{0,1},
  encoder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0},
  encoder.conv_norm_out, encoder.conv_out, quant_conv, post_quant_conv,
  decoder.conv_in, decoder.mid_block..., decoder.up_blocks.N.resnets.M,
  decoder.up_blocks.N.upsamplers.0.conv, decoder.conv_norm_out, decoder.conv_out.

Load a diffusers `vae/` directory with

    cfg = json.load(open(f"{vae_dir}/config.json"))
    vae = autoencoder_kl.from_diffusers_config(cfg)
    tensors = autoencoder_kl.fix_legacy_tensors(safetensors_io.read_tensors(vae_dir))
    abstract = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    params = convert.torch_to_flax(tensors, abstract, what="vae")

Everything is NHWC. Images are in [-1, 1]; latents for a diffusion model are
`to_latents(mean_or_sample, vae.scaling_factor, vae.shift_factor)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers as L

Array = jax.Array

_EPS = 1e-6  # every GroupNorm of diffusers' VAE (resnet_eps and conv_norm_out)
_PAD1 = ((1, 1), (1, 1))
_INIT = nn.initializers.lecun_normal()
_ZERO = nn.initializers.zeros_init()

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"

# diffusers' AutoencoderKL.__init__ defaults: what a config.json that omits a key means.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": (DOWN_BLOCK,),
    "up_block_types": (UP_BLOCK,),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Bookkeeping keys diffusers writes into config.json; they do not change the model.
_METADATA_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

# Named size variants (the published VAEs; SDXL's differs only in its scaling factor).
PRESETS: dict[str, dict[str, Any]] = {
    "sd": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
        sample_size=512,
    ),
    "sdxl": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.13025,
        sample_size=1024,
    ),
}


def preset_kwargs(name: str) -> dict[str, Any]:
    """Constructor kwargs of a named VAE: 'sd' (SD 1.x/2.x) or 'sdxl'."""
    if name not in PRESETS:
        raise ValueError(f"Unknown VAE preset {name!r}; use one of {sorted(PRESETS)}.")
    return dict(PRESETS[name])


# ----------------------------------------------------------------------------- layers


def _conv(
    features: int, kernel: int, padding: Any, *, dtype: Any, name: str | None, strides: int = 1
):
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=L.partitioned(_INIT, (None, None, "conv_in", "conv_out")),
        bias_init=L.partitioned(_ZERO, ("conv_out",)),
        name=name,
    )


def _norm(groups: int, *, dtype: Any, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=L.partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=L.partitioned(_ZERO, ("norm",)),
        name=name,
    )


def _dense(features: int, axes: tuple[str, str], *, dtype: Any, name: str) -> nn.Dense:
    return L.dense(features, axes, dtype=dtype, kernel_init=_INIT, name=name)


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` without time embedding: GN-SiLU-conv twice, plus the input.

    A 1x1 `conv_shortcut` maps the input when the width changes.
    """

    out_channels: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.silu(_norm(self.groups, dtype=self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, _PAD1, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(_norm(self.groups, dtype=self.dtype, name="norm2")(h))
        h = _conv(self.out_channels, 3, _PAD1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "VALID", dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """diffusers `Downsample2D(padding=0)`: pad 1 at the bottom and right, 3x3 VALID stride 2.

    The explicit (0, 1) padding equals Flax's "SAME" only for even sizes; for an odd
    size "SAME" pads (1, 1) and gives one more output row.
    """

    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pad = ((0, 1), (0, 1))
        return _conv(x.shape[-1], 3, pad, strides=2, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """diffusers `Upsample2D`: nearest-neighbour x2, then a 3x3 conv."""

    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, _PAD1, dtype=self.dtype, name="conv")(x)


class Attention(nn.Module):
    """diffusers `Attention` as the VAE mid block uses it: one head of width C, residual.

    `x + to_out.0(softmax(q k^T / sqrt(C)) v)` with q, k, v = to_q/to_k/to_v of
    GroupNorm(x), over the H*W positions.
    """

    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        t = _norm(self.groups, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, 1, c)
        q = _dense(c, ("embed", "mlp"), dtype=self.dtype, name="to_q")(t)
        k = _dense(c, ("embed", "mlp"), dtype=self.dtype, name="to_k")(t)
        v = _dense(c, ("embed", "mlp"), dtype=self.dtype, name="to_v")(t)
        out = L.attention(q, k, v).reshape(b, h * w, c)
        out = _dense(c, ("mlp", "embed"), dtype=self.dtype, name="to_out.0")(out)
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` (no time embedding): resnet, [attention], resnet."""

    groups: int
    add_attention: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="resnets.0")(x)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, name="attentions.0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="resnets.1")(x)


class DownEncoderBlock(nn.Module):
    """diffusers `DownEncoderBlock2D`: `num_layers` resnets, then an optional downsampler."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets.{i}")(x)
        if self.add_downsample:
            x = Downsample(self.dtype, name="downsamplers.0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """diffusers `UpDecoderBlock2D`: `num_layers` resnets, then an optional upsampler."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets.{i}")(x)
        if self.add_upsample:
            x = Upsample(self.dtype, name="upsamplers.0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in] -> [B, H/f, W/f, 2 * latent] (mean and log-variance, pre quant_conv)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        chans = self.block_out_channels
        x = _conv(chans[0], 3, _PAD1, dtype=self.dtype, name="conv_in")(x)
        for i, c in enumerate(chans):
            x = DownEncoderBlock(
                c,
                self.layers_per_block,
                self.groups,
                add_downsample=i < len(chans) - 1,
                dtype=self.dtype,
                name=f"down_blocks.{i}",
            )(x)
        x = MidBlock(self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(_norm(self.groups, dtype=self.dtype, name="conv_norm_out")(x))
        return _conv(2 * self.latent_channels, 3, _PAD1, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latent [B, h, w, latent] (after post_quant_conv) -> image [B, h*f, w*f, out]."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool
    dtype: Any

    @nn.compact
    def __call__(self, z: Array) -> Array:
        chans = tuple(reversed(self.block_out_channels))
        x = _conv(chans[0], 3, _PAD1, dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, c in enumerate(chans):
            x = UpDecoderBlock(
                c,
                self.layers_per_block + 1,
                self.groups,
                add_upsample=i < len(chans) - 1,
                dtype=self.dtype,
                name=f"up_blocks.{i}",
            )(x)
        x = nn.silu(_norm(self.groups, dtype=self.dtype, name="conv_norm_out")(x))
        return _conv(self.out_channels, 3, _PAD1, dtype=self.dtype, name="conv_out")(x)


# ----------------------------------------------------------------------------- the model


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL` in NHWC (the SD 1.x/2.x/SDXL VAE; defaults: the SD VAE).

    Attributes:
      in_channels: image channels in.
      out_channels: image channels out.
      block_out_channels: width of each resolution level; the spatial factor is
        2^(len - 1).
      layers_per_block: resnets per encoder level (the decoder has one more).
      latent_channels: latent channels.
      norm_num_groups: GroupNorm groups (eps 1e-6 throughout).
      act_fn: 'silu' (diffusers' alias 'swish' is the same function).
      scaling_factor: latent scale for the diffusion model (`to_latents`).
      shift_factor: latent shift for the diffusion model (`to_latents`); None means 0.
      use_quant_conv: the 1x1 conv after the encoder.
      use_post_quant_conv: the 1x1 conv before the decoder.
      mid_block_add_attention: the self-attention between the mid-block resnets.
      force_upcast: kept from the config and ignored (the compute dtype is `dtype`).
      sample_size: the training image size, kept from the config (a tile-size hint).
      dtype: compute dtype, 'float32' | 'bfloat16' | 'float16'; params are float32
        and `encode`/`decode` return float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    sample_size: int | tuple[int, ...] = 512
    dtype: str = "float32"

    def _check(self) -> Any:
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(
                f"AutoencoderKL: act_fn={self.act_fn!r} is not supported; only 'silu' "
                "(the activation of every published Stable Diffusion VAE)."
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderKL: block_out_channels {tuple(self.block_out_channels)} "
                    f"are not all divisible by norm_num_groups={self.norm_num_groups}."
                )
        return L.get_dtype(self.dtype)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self) -> None:
        dtype = self._check()
        chans = tuple(self.block_out_channels)
        self.encoder = Encoder(
            chans,
            self.layers_per_block,
            self.latent_channels,
            self.norm_num_groups,
            self.mid_block_add_attention,
            dtype,
        )
        self.decoder = Decoder(
            chans,
            self.layers_per_block,
            self.out_channels,
            self.norm_num_groups,
            self.mid_block_add_attention,
            dtype,
        )
        if self.use_quant_conv:
            self.quant_conv = _conv(2 * self.latent_channels, 1, "VALID", dtype=dtype, name=None)
        if self.use_post_quant_conv:
            self.post_quant_conv = _conv(self.latent_channels, 1, "VALID", dtype=dtype, name=None)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Image [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent].

        logvar is clipped to [-30, 20] as in diffusers' `DiagonalGaussianDistribution`.
        Both are float32.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"AutoencoderKL.encode expects NHWC images [B, H, W, {self.in_channels}], "
                f"got shape {x.shape}."
            )
        h = self.encoder(x.astype(L.get_dtype(self.dtype)))
        if self.use_quant_conv:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Latent [B, h, w, latent] (unscaled: see `from_latents`) -> image [B, h*f, w*f, out]."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(
                f"AutoencoderKL.decode expects NHWC latents [B, h, w, {self.latent_channels}], "
                f"got shape {z.shape}."
            )
        z = z.astype(L.get_dtype(self.dtype))
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, sample_posterior: bool = False, key: Array | None = None) -> Array:
        """Reconstruction: decode(mean), or decode of a posterior sample (needs `key`)."""
        if sample_posterior and key is None:
            raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG `key`.")
        mean, logvar = self.encode(x)
        z = latent_sample(mean, logvar, key) if sample_posterior else mean
        return self.decode(z)


# ----------------------------------------------------------------------------- config


def from_diffusers_config(cfg: Mapping[str, Any], dtype: str = "float32") -> AutoencoderKL:
    """Builds the module from a diffusers `vae/config.json` (as a dict).

    Keys that are absent take diffusers' defaults (`DIFFUSERS_DEFAULTS`). Options this
    port does not implement (another `_class_name`, block types other than
    DownEncoderBlock2D/UpDecoderBlock2D, an act_fn other than silu, per-channel
    `latents_mean`/`latents_std`, unknown keys) are refused by name.

    Args:
      cfg: the parsed config.json.
      dtype: compute dtype of the module.
    """
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(
            f"from_diffusers_config: _class_name={cls!r} is not supported; this loads "
            "diffusers' 'AutoencoderKL' only."
        )
    unknown = sorted(k for k in cfg if k not in DIFFUSERS_DEFAULTS and k not in _METADATA_KEYS)
    if unknown:
        raise ValueError(
            f"from_diffusers_config: unsupported AutoencoderKL config option(s) {unknown}; "
            f"known options are {sorted(DIFFUSERS_DEFAULTS)}."
        )
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if k in DIFFUSERS_DEFAULTS}}
    for name in ("latents_mean", "latents_std"):
        if c[name] is not None:
            raise ValueError(
                f"from_diffusers_config: {name} is set ({c[name]!r}); per-channel latent "
                "normalisation is not supported, only scaling_factor and shift_factor."
            )
    if c["act_fn"] not in ("silu", "swish"):
        raise ValueError(
            f"from_diffusers_config: act_fn={c['act_fn']!r} is not supported; only 'silu'."
        )
    n = len(c["block_out_channels"])
    for key, want in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        types = tuple(c[key])
        bad = sorted({t for t in types if t != want})
        if bad:
            raise ValueError(
                f"from_diffusers_config: {key} {bad} are not supported; only {want!r}."
            )
        if len(types) != n:
            raise ValueError(
                f"from_diffusers_config: {key} has {len(types)} entries but "
                f"block_out_channels has {n}; they must match."
            )
    sample_size = c["sample_size"]
    if isinstance(sample_size, list | tuple):
        sample_size = tuple(int(s) for s in sample_size)
    return AutoencoderKL(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        block_out_channels=tuple(int(b) for b in c["block_out_channels"]),
        layers_per_block=int(c["layers_per_block"]),
        latent_channels=int(c["latent_channels"]),
        norm_num_groups=int(c["norm_num_groups"]),
        act_fn="silu",
        scaling_factor=float(c["scaling_factor"]),
        shift_factor=float(c["shift_factor"] or 0.0),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]),
        force_upcast=bool(c["force_upcast"]),
        sample_size=sample_size,
        dtype=dtype,
    )


# ----------------------------------------------------------------------------- latents


def latent_sample(mean: Array, logvar: Array, key: Array) -> Array:
    """A posterior sample `mean + exp(logvar / 2) * eps`, eps ~ N(0, I)."""
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps


def to_latents(z: Array, scaling_factor: float, shift_factor: float | None = 0.0) -> Array:
    """VAE latent (mean or sample) -> diffusion-model latent: `scaling * (z - shift)`."""
    return scaling_factor * (z - (shift_factor or 0.0))


def from_latents(latents: Array, scaling_factor: float, shift_factor: float | None = 0.0) -> Array:
    """The inverse of `to_latents`: `latents / scaling + shift` (what `decode` takes)."""
    return latents / scaling_factor + (shift_factor or 0.0)


# ----------------------------------------------------------------------------- tiled decode


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of `tile`-long windows covering [0, size), overlaps >= `overlap`."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(k * (size - tile) / (n - 1)) for k in range(n)]


def _ramps(starts: list[int], tile: int, scale: int) -> list[np.ndarray]:
    """Per-tile 1-D blending weights (in output pixels) for tiles at `starts` (latent units).

    Over the overlap of two neighbours (L pixels) the earlier tile's weight falls
    (L - p - 0.5) / L and the later one's rises (p + 0.5) / L: they sum to 1, a linear
    cross-fade; elsewhere the weight is 1.
    """
    out = []
    for i, s in enumerate(starts):
        w = np.ones(tile * scale, np.float32)
        if i > 0:
            n = (starts[i - 1] + tile - s) * scale
            w[:n] = np.minimum(w[:n], (np.arange(n) + 0.5) / n)
        if i + 1 < len(starts):
            n = (s + tile - starts[i + 1]) * scale
            w[-n:] = np.minimum(w[-n:], (n - np.arange(n) - 0.5) / n)
        out.append(w)
    return out


def tiled_decode(
    apply_decode_fn: Callable[[Array], Array],
    z: Array,
    tile: int = 64,
    overlap: int = 16,
) -> np.ndarray:
    """Decodes a large latent in overlapping tiles, so decoder memory is bounded by one tile.

    Every tile has the same shape [B, t, t, C] (t = min(tile, h) rows, likewise columns;
    the starts are spread evenly so the last tile ends at the border), so a jitted
    `apply_decode_fn` compiles once. The decoded tiles are blended in host memory:
    where two neighbouring tiles overlap (at least `overlap` latent pixels, times the
    VAE's spatial factor in output pixels) their weights cross-fade linearly from one
    to the other, as diffusers' `tiled_decode` does (`blend_h`/`blend_v`); each output
    pixel is the weight-normalised sum of the tiles covering it (bilinear at corners).
    The result is not identical to a full decode: GroupNorm statistics and the
    mid-block attention see one tile instead of the whole latent.

    Args:
      apply_decode_fn: latent tile [B, t, t, C] -> image tile [B, t*f, t*f, C_out], e.g.
        `jax.jit(lambda z: vae.apply({"params": params}, z, method=vae.decode))`.
      z: latent [B, h, w, C] (unscaled, what `AutoencoderKL.decode` takes).
      tile: tile size in latent pixels (diffusers: sample_size / f, 64 for SD).
      overlap: minimum overlap of neighbouring tiles in latent pixels (diffusers: tile / 4).

    Returns:
      [B, h*f, w*f, C_out] float32 numpy array.
    """
    if z.ndim != 4:
        raise ValueError(f"tiled_decode expects NHWC latents [B, h, w, C], got shape {z.shape}.")
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(
            f"tiled_decode needs tile >= 1 and 0 <= overlap < tile, got tile={tile}, "
            f"overlap={overlap}."
        )
    b, h, w, _ = z.shape
    th, tw = min(tile, h), min(tile, w)
    rows, cols = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
    out = acc = wr = wc = None
    scale = 0
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            x = np.asarray(apply_decode_fn(z[:, r : r + th, c : c + tw]), np.float32)
            if out is None:
                scale = x.shape[1] // th
                if x.shape[1] != th * scale or x.shape[2] != tw * scale:
                    raise ValueError(
                        f"tiled_decode: a latent tile {th}x{tw} decoded to {x.shape[1:3]}, "
                        "not an integer multiple of the tile."
                    )
                out = np.zeros((b, h * scale, w * scale, x.shape[-1]), np.float32)
                acc = np.zeros((h * scale, w * scale), np.float32)
                wr, wc = _ramps(rows, th, scale), _ramps(cols, tw, scale)
            weight = wr[i][:, None] * wc[j][None, :]
            ys, xs = slice(r * scale, (r + th) * scale), slice(c * scale, (c + tw) * scale)
            out[:, ys, xs] += weight[None, :, :, None] * x
            acc[ys, xs] += weight
    return out / acc[None, :, :, None]


# ----------------------------------------------------------------------------- legacy keys

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NEW_ATTENTION = tuple(f".{v}.weight" for v in _LEGACY_ATTENTION.values())


def rename_legacy_key(key: str) -> str:
    """Old attention names -> diffusers' current ones.

    `<...>.attentions.N.{query,key,value,proj_attn}.{weight,bias}` becomes
    `<...>.attentions.N.{to_q,to_k,to_v,to_out.0}.{weight,bias}`; other keys are unchanged.
    """
    parts = key.split(".")
    if (
        len(parts) >= 4
        and parts[-1] in ("weight", "bias")
        and parts[-2] in _LEGACY_ATTENTION
        and parts[-4] == "attentions"
    ):
        return ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
    return key


def fix_legacy_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames legacy attention keys and squeezes their [C, C, 1, 1] kernels to [C, C].

    Current-layout checkpoints pass through unchanged.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        new = rename_legacy_key(key)
        if new in out:
            raise ValueError(
                f"VAE checkpoint holds both {key!r} and its current name {new!r}; keep one of them."
            )
        if ".attentions." in new and new.endswith(_NEW_ATTENTION) and np.ndim(value) == 4:
            if tuple(value.shape[2:]) != (1, 1):
                raise ValueError(
                    f"VAE attention kernel {key!r} has shape {tuple(value.shape)}; "
                    "expected [C, C] or [C, C, 1, 1]."
                )
            value = value[:, :, 0, 0]
        out[new] = value
    return out
