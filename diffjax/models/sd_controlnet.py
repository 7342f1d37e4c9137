"""Stable Diffusion's ControlNet (diffusers' `ControlNetModel`, SD 1.x/2.x), in Flax.

A trainable copy of the SD U-Net's encoder half (conv_in, time embedding, down blocks,
mid block: `sd_unet`'s own blocks), fed the noisy latent plus an embedding of the control
image, and read out through zero-initialised 1x1 convolutions: one residual per skip
connection of the U-Net, and one for its mid block. The Flax tree mirrors diffusers'
state dict (a param path joined by "." is the torch key, leaves renamed as in `sd_unet`):

    conv_in, time_embedding.linear_{1,2},
    controlnet_cond_embedding.{conv_in, blocks.{i}, conv_out},
    down_blocks.*, mid_block.*, controlnet_down_blocks.{i}, controlnet_mid_block

so a diffusers ControlNet directory loads with `convert.torch_to_flax` (see
`diffjax.pretrained.controlnet`). The call returns the RAW residuals
`(down_residuals, mid_residual)` (NHWC, after the zero convs, not scaled by a
conditioning scale; `diffjax.models.controlnet` scales and sums them) which
`SDUNet(..., control_residuals=...)` adds to its skip connections and mid block.

The control image is float NHWC in [0, 1] (not [-1, 1], as in diffusers) at the
output image resolution: the condition embedding downsamples it by
2 ** (len(conditioning_embedding_out_channels) - 1) to the latent size (8 for SD).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffjax.models import layers as L
from diffjax.models import sd_unet
from diffjax.models.controlnet import ConditionEmbedding, check_control, zero_conv
from diffjax.models.sd_unet import DownBlock, MidBlock, SDUNet, _conv, _dense

Array = jax.Array

# SDUNet fields a ControlNet shares with its base (same names, same meaning).
SHARED_FIELDS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
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
    "attention_impl",
    "dtype",
    "remat_policy",
)

# Top-level param groups copied from the base U-Net (diffusers' `from_unet`).
SHARED_PARAMS = ("conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "mid_block")
SHARED_PREFIXES = ("down_blocks.",)

CHANNEL_ORDERS = ("rgb", "bgr")
_UP_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


class SDControlNet(nn.Module):
    """diffusers' `ControlNetModel` for an `SDUNet` base (SD 1.x/2.x).

    The fields are diffusers' config fields (see `from_diffusers_config`); those shared
    with `SDUNet` (`SHARED_FIELDS`) mean the same there and are validated by SDUNet's
    own checks. ControlNet's own:
      conditioning_channels: channels of the control image (3 for RGB controls).
      conditioning_embedding_out_channels: widths of the condition embedding; it
        downsamples by 2 ** (len - 1) (8 for SD's (16, 32, 96, 256)).
      global_pool_conditions: residuals averaged over H, W (keepdims), as diffusers does
        (its "shuffle" ControlNets); the base adds them broadcast.
      controlnet_conditioning_channel_order: 'rgb', or 'bgr' (the control's channels are
        flipped before the embedding).
    `layers_per_block` is one int (diffusers' ControlNetModel takes no per-block list).
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
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
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    attention_impl: str = ""
    dtype: str = "float32"
    remat_policy: str = "none"

    # ------------------------------------------------------------------ structure

    def base_unet(self) -> SDUNet:
        """The (unbound) `SDUNet` whose encoder this ControlNet copies: the base it fits."""
        up = tuple(_UP_OF.get(b, b) for b in reversed(self.down_block_types))
        return SDUNet(
            **{f: getattr(self, f) for f in SHARED_FIELDS},
            out_channels=self.in_channels,
            up_block_types=up,
            parent=None,
        )

    @property
    def downsampling(self) -> int:
        """Pixels of the control image per latent cell (the embedding's stride)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def _check(self) -> None:
        if not isinstance(self.layers_per_block, int):
            raise ValueError(
                f"SDControlNet: layers_per_block must be one int (diffusers' ControlNetModel "
                f"has no per-block list), got {self.layers_per_block!r}."
            )
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(
                "SDControlNet: controlnet_conditioning_channel_order="
                f"{self.controlnet_conditioning_channel_order!r}; supported: {CHANNEL_ORDERS}."
            )
        emb = self.conditioning_embedding_out_channels
        if not emb or any(int(c) <= 0 for c in emb):
            raise ValueError(
                "SDControlNet: conditioning_embedding_out_channels must be a non-empty tuple "
                f"of positive widths, e.g. (16, 32, 96, 256), got {emb!r}."
            )
        if self.conditioning_channels <= 0:
            raise ValueError(
                f"SDControlNet: conditioning_channels must be positive, got "
                f"{self.conditioning_channels}."
            )

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
        *,
        control: Array,
    ) -> tuple[tuple[Array, ...], Array]:
        """The raw (unscaled) ControlNet residuals for a noisy latent and a control image.

        Args:
          x: [B, h, w, in_channels] noisy latents.
          t: [B] float diffusers timesteps.
          labels: must be None (SD has no class conditioning).
          context: [B, L, cross_attention_dim] text embeddings; None = one zero token.
          context_mask: [B, L] bool, True = real token (None: every token).
          train: enables dropout (none in diffusers' ControlNet).
          control: [B, h*f, w*f, conditioning_channels] float in [0, 1], RGB order
            (f = `downsampling`); flipped here when the order is 'bgr'.

        Returns:
          `(down_residuals, mid_residual)`, float32 NHWC: one down residual per skip
          connection of the base U-Net in diffusers' order, then the mid block's; with
          `global_pool_conditions` each is [B, 1, 1, C].
        """
        L.check_inputs(x, t)
        self._check()
        base = self.base_unet()
        base._check()
        if labels is not None:
            raise ValueError(
                "SDControlNet has no class conditioning (Stable Diffusion is text-conditioned);"
                " pass labels=None and the text embeddings as context."
            )
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"SDControlNet: x has {x.shape[-1]} channels, the model takes in_channels="
                f"{self.in_channels}."
            )
        check_control(control, x, self.downsampling, self.conditioning_channels, "SDControlNet")
        if self.controlnet_conditioning_channel_order == "bgr":
            control = control[..., ::-1]
        dt = L.get_dtype(self.dtype)
        batch, n = x.shape[0], len(self.down_block_types)
        context, context_mask = base._context(context, context_mask, batch)
        context = context.astype(dt)
        heads = base._heads()
        depths = sd_unet._per_block(
            self.transformer_layers_per_block, n, "transformer_layers_per_block"
        )
        channels, c0 = self.block_out_channels, self.block_out_channels[0]
        kw = base._blocks_kwargs(dt)

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

        h = _conv(c0, 3, dtype=dt, name="conv_in")(x.astype(dt))
        emb_channels = tuple(self.conditioning_embedding_out_channels)
        h = h + ConditionEmbedding(
            c0, emb_channels, len(emb_channels) - 1, dt, name="controlnet_cond_embedding"
        )(control).astype(h.dtype)

        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            h, s = DownBlock(
                channels[i],
                self.layers_per_block,
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

        down = [
            zero_conv(s, dtype=dt, name=f"controlnet_down_blocks.{i}") for i, s in enumerate(skips)
        ]
        mid = zero_conv(h, dtype=dt, name="controlnet_mid_block")
        if self.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(r.astype(jnp.float32) for r in down), mid.astype(jnp.float32)


# ----------------------------------------------------------------------------- from the base


def _is_shared(path: tuple[str, ...]) -> bool:
    return path[0] in SHARED_PARAMS or path[0].startswith(SHARED_PREFIXES)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        tree = tree["params"]
    return traverse_util.flatten_dict(dict(tree))


def init_from_base(base_params: Any, controlnet_params: Any) -> dict:
    """ControlNet params with every part shared with the base copied from the base U-Net.

    diffusers' `ControlNetModel.from_unet`: `conv_in`, `time_embedding`, `down_blocks`
    and `mid_block` come from `base_params` (an `SDUNet` params tree); the condition
    embedding, `controlnet_down_blocks` and `controlnet_mid_block` keep their values in
    `controlnet_params` (as initialised: zero convs zero, the embedding random with a
    zero `conv_out`), so the residuals start at exactly zero.

    Args:
      base_params: the base SDUNet's params (plain or boxed arrays).
      controlnet_params: the ControlNet's params (e.g. from `SDControlNet.init`); a
        leaf that is a Flax partitioning box keeps its box around the copied value.

    Returns:
      A new params dict shaped like `controlnet_params`.

    Raises:
      ValueError: the base lacks a shared parameter, has one the ControlNet lacks, or
        one of another shape (a ControlNet built for another U-Net), naming them.
    """
    base = _flat(nn.meta.unbox(base_params))
    ctrl = _flat(controlnet_params)
    missing, extra, misshaped = [], [], []
    out = {}
    for path, leaf in ctrl.items():
        if not _is_shared(path):
            out[path] = leaf
            continue
        key = ".".join(path)
        if path not in base:
            missing.append(key)
            continue
        value = base[path]
        want = nn.meta.unbox(leaf).shape
        if tuple(value.shape) != tuple(want):
            misshaped.append(f"{key}: base {tuple(value.shape)}, ControlNet {tuple(want)}")
            continue
        value = jnp.asarray(value, nn.meta.unbox(leaf).dtype)
        out[path] = leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
    extra = [".".join(p) for p in base if _is_shared(p) and p not in ctrl]
    if missing or extra or misshaped:
        parts = []
        for what, keys in (("missing", missing), ("only in the base", extra)):
            if keys:
                parts.append(f"{what} {len(keys)}: {', '.join(sorted(keys)[:10])}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {'; '.join(sorted(misshaped)[:10])}")
        raise ValueError(
            "init_from_base: the base U-Net's params do not fit this ControlNet ("
            + "; ".join(parts)
            + "); build the ControlNet from the base's config (from_unet)."
        )
    return traverse_util.unflatten_dict(out)


def example_inputs(module: SDControlNet, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Smallest input shapes `module.init` accepts (x, t, context, control), as shape structs."""
    size = 2 ** (len(module.block_out_channels) - 1)
    f = module.downsampling
    s = jax.ShapeDtypeStruct
    return dict(
        x=s((batch, size, size, module.in_channels), jnp.float32),
        t=s((batch,), jnp.float32),
        context=s((batch, 1, module.cross_attention_dim), jnp.float32),
        control=s((batch, size * f, size * f, module.conditioning_channels), jnp.float32),
    )


def abstract_params(module: SDControlNet) -> Any:
    """The params tree of `module` as `jax.ShapeDtypeStruct`s (no compute)."""

    def init(key, a):
        return module.init(key, a["x"], a["t"], context=a["context"], control=a["control"])[
            "params"
        ]

    return jax.eval_shape(init, jax.random.key(0), example_inputs(module))


def _torch_conv_init(rng: np.random.Generator, path: tuple, leaf: Any, tree: dict) -> Array:
    """torch's default Conv2d init (what diffusers' from_unet leaves in the embedding):
    weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels * kh * kw."""
    kh, kw, cin, _ = tree[(*path[:-1], "kernel")].shape
    bound = 1.0 / np.sqrt(cin * kh * kw)
    return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)


def from_unet(
    unet: SDUNet,
    unet_params: Any,
    *,
    conditioning_channels: int = 3,
    embedding_channels: Sequence[int] = (16, 32, 96, 256),
    channel_order: str = "rgb",
    key: jax.Array,
) -> tuple[SDControlNet, dict]:
    """A ControlNet for `unet`, as diffusers' `ControlNetModel.from_unet`.

    The config follows the U-Net's; the shared weights (conv_in, time embedding, down
    and mid blocks) are copied from `unet_params`, the condition embedding is drawn from
    `key` with its `conv_out` zero, and every zero conv is zero: the residuals are
    exactly zero, so the base's output is unchanged until the ControlNet trains.

    Args:
      unet: the base `SDUNet` (an unbound module).
      unet_params: its params.
      conditioning_channels: channels of the control images.
      embedding_channels: the condition embedding's widths; it downsamples by
        2 ** (len - 1), which must be the VAE's factor (8 for SD).
      channel_order: 'rgb' or 'bgr'.
      key: PRNG key (typed or raw) for the condition embedding (drawn like torch's default conv init,
        as diffusers leaves it).

    Returns:
      `(module, params)`, params as plain float32 arrays.

    Raises:
      ValueError: a per-block `layers_per_block` list with different values (diffusers'
        ControlNetModel takes one int), or params that do not fit `unet`.
    """
    fields = {f: getattr(unet, f) for f in SHARED_FIELDS}
    lpb = fields["layers_per_block"]
    if isinstance(lpb, (tuple, list)):
        if len(set(lpb)) != 1:
            raise ValueError(
                f"from_unet: the U-Net has layers_per_block={list(lpb)}; diffusers' "
                "ControlNetModel needs the same number of layers in every block."
            )
        fields["layers_per_block"] = int(lpb[0])
    module = SDControlNet(
        **fields,
        conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=tuple(int(c) for c in embedding_channels),
        controlnet_conditioning_channel_order=channel_order,
    )
    # Only the condition embedding is drawn (a full init would draw, then drop, a U-Net
    # encoder's worth of weights), with numpy: XLA compiles random draws slowly on CPU.
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key).ravel().tolist())
    params = {}
    abstract = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(module)))
    for path, leaf in abstract.items():
        if path[0] == "controlnet_cond_embedding" and path[1] != "conv_out":
            params[path] = _torch_conv_init(rng, path, leaf, abstract)
        elif _is_shared(path):
            params[path] = leaf  # a shape, replaced by the base's array in init_from_base
        else:
            params[path] = jnp.zeros(leaf.shape, leaf.dtype)
    params = traverse_util.unflatten_dict(params)
    return module, init_from_base(unet_params, params)


# ----------------------------------------------------------------------------- diffusers configs

# ControlNetModel config keys that are ControlNet's own (not SDUNet's).
_OWN_FIELDS = (
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "global_pool_conditions",
    "controlnet_conditioning_channel_order",
)
# Config keys diffusers' ControlNetModel has and SD ControlNets leave unset.
_MUST_BE_NONE = (
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "projection_class_embeddings_input_dim",
)
# diffusers' ControlNetModel defaults where they differ from SDControlNet's (a config.json
# without the key means diffusers' default).
_DIFFUSERS_DEFAULTS = {"cross_attention_dim": 1280}


def from_diffusers_config(
    cfg: Mapping[str, Any], dtype: str = "float32", **kwargs: Any
) -> SDControlNet:
    """Builds an `SDControlNet` from a diffusers ControlNetModel `config.json` dict.

    Args:
      cfg: the parsed config (SD 1.x/2.x options only).
      dtype: compute dtype string.
      **kwargs: further fields (`attention_impl`, `remat_policy`).

    Raises:
      ValueError: a config of another class, or an option this port does not support
        (named in the message, as `sd_unet.from_diffusers_config` does).
    """
    return SDControlNet(**diffusers_fields(cfg), dtype=dtype, **kwargs)


def diffusers_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `SDControlNet` fields of a diffusers ControlNetModel `config.json` dict."""
    cls = cfg.get("_class_name", "ControlNetModel")
    if cls != "ControlNetModel":
        raise ValueError(
            f"from_diffusers_config reads ControlNetModel configs, got _class_name={cls!r}."
        )
    cfg = {**_DIFFUSERS_DEFAULTS, **cfg}
    problems = [
        f"{k}={cfg[k]!r} (supported: unset/None)" for k in _MUST_BE_NONE if cfg.get(k) is not None
    ]
    own = {k: sd_unet._plain(cfg[k]) for k in _OWN_FIELDS if k in cfg}
    rest = {
        k: v
        for k, v in cfg.items()
        if k not in _OWN_FIELDS and k not in _MUST_BE_NONE and k != "_class_name"
    }
    try:
        fields = sd_unet.diffusers_fields(rest)
    except ValueError as e:
        raise ValueError(f"ControlNetModel config: {e}") from e
    if own.get("conditioning_embedding_out_channels", ()) is None:
        problems.append("conditioning_embedding_out_channels=None (supported: a tuple of widths)")
        own.pop("conditioning_embedding_out_channels")
    order = own.get("controlnet_conditioning_channel_order", "rgb")
    if order not in CHANNEL_ORDERS:
        problems.append(
            f"controlnet_conditioning_channel_order={order!r} (supported: {CHANNEL_ORDERS})"
        )
    lpb = fields.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        problems.append(f"layers_per_block={list(lpb)!r} (supported: one int)")
    if problems:
        raise ValueError(
            "This ControlNetModel config uses options that SDControlNet does not support: "
            + "; ".join(problems)
            + "."
        )
    names = {f.name for f in dataclasses.fields(SDControlNet)}
    # Keys diffusers' ControlNetModel ignores too (a U-Net's sample_size, up_block_types).
    return {**{k: v for k, v in fields.items() if k in names}, **own}


def diffusers_config(module: SDControlNet) -> dict[str, Any]:
    """The diffusers ControlNetModel `config.json` dict of `module` (loads in diffusers)."""
    cfg: dict[str, Any] = {"_class_name": "ControlNetModel", "_diffusers_version": "0.30.0"}
    for name in (*SHARED_FIELDS, *_OWN_FIELDS):
        if name in ("attention_impl", "dtype", "remat_policy"):
            continue
        value = getattr(module, name)
        if name == "num_attention_heads" and not value:
            value = None  # diffusers: heads = attention_head_dim
        cfg[name] = list(value) if isinstance(value, tuple) else value
    cfg.update({k: None for k in _MUST_BE_NONE})
    cfg["addition_embed_type_num_heads"] = 64
    return dict(sorted(cfg.items()))


def count_residuals(module: SDControlNet) -> int:
    """Number of down residuals (= skip connections of the base U-Net)."""
    return sd_unet.count_skips(module.base_unet())


__all__ = [
    "SHARED_FIELDS",
    "SDControlNet",
    "abstract_params",
    "count_residuals",
    "diffusers_config",
    "diffusers_fields",
    "example_inputs",
    "from_diffusers_config",
    "from_unet",
    "init_from_base",
]
