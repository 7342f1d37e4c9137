"""diffjax's `unet` in diffusers' `UNet2DModel` layout, both ways.

    export_unet2d(params, config.model.kwargs, "out/unet")       # config.json + safetensors
    kwargs, params = load_unet2d("out/unet")                      # -> UNet(**kwargs), params

diffjax's U-Net does not mirror diffusers' module tree, so one table (`_TABLE`: Flax
module path -> torch module) drives both directions. The correspondence (diffusers
0.42.1, checked against its source):

  diffjax                          diffusers UNet2DModel
  time_embed (sinusoidal, shift 0) time_proj Timesteps(flip_sin_to_cos=True, freq_shift=0)
                                   + time_embedding.linear_1/linear_2 (4 x base width)
  label_emb (num_classes + 1 rows) class_embedding (num_class_embeds = num_classes + 1;
                                   the last index is diffjax's null class)
  down{l}_res{i} / down{l}_attn{i} down_blocks.{l}: DownBlock2D, or AttnDownBlock2D at the
                                   levels whose resolution is in attention_resolutions
  down{l}_resample (3x3 stride 2)  down_blocks.{l}.downsamplers.0.conv with
                                   downsample_padding=0 (pad (0, 1) then VALID = SAME;
                                   diffusers' default padding 1 computes something else)
  mid_res0, mid_attn, mid_res1     mid_block (UNetMidBlock2D, add_attention = mid_attention)
  up{l}_res{i} (num_res_blocks+1)  up_blocks.{L-1-l}: UpBlock2D / AttnUpBlock2D
  up{l}_resample (nearest + conv)  up_blocks.{L-1-l}.upsamplers.0.conv
  ResBlock additive / scale-shift  ResnetBlock2D resnet_time_scale_shift 'default' /
                                   'scale_shift' (scale first, as in diffjax)
  AttentionBlock (GroupNorm, MHA)  Attention (group_norm, to_q/k/v, to_out.0), one
                                   `attention_head_dim` for every level and the mid block
  GroupNorm eps 1e-5               norm_eps 1e-5; the mid attention's norm needs
                                   attn_norm_num_groups (diffusers drops it under
                                   scale_shift otherwise)

diffjax's `attention_resolutions` are spatial sizes, so the block types depend on the
input size: the exporter takes it as `sample_size` (or infers it from where the params
have attention) and the loader turns the AttnDown levels back into sizes at the
config's `sample_size`. BigGAN up/down residual blocks (`resblock_updown`), pooling /
conv-free resampling (`conv_resample=False`), Fourier time features, `time_scale != 1`
and text conditioning have no exact diffusers equivalent here and are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from diffjax.models import layers as L
from diffjax.models import unet as unet_lib
from diffjax.pretrained import safetensors_io
from diffjax.pretrained.convert import ConversionError
from diffjax.pretrained.diffusers_dit import (
    DIFFUSERS_VERSION,
    Entry,
    entries_to_flax,
    entries_to_torch,
    flat_params,
    kind_of,
    refuse,
    resolved_fields,
    write_component,
)

CLASS_NAME = "UNet2DModel"
NORM_EPS = 1e-5  # diffjax's GroupNorm epsilon

# Flax module path (regex over "/"-joined names) -> torch module. {L} in a template is
# the up-block index (levels - 1 - l): diffusers counts up blocks from the bottom.
_TABLE: tuple[tuple[str, str], ...] = (
    (r"conv_in", "conv_in"),
    (r"conv_out", "conv_out"),
    (r"norm_out", "conv_norm_out"),
    (r"time_embed/Dense_0", "time_embedding.linear_1"),
    (r"time_embed/Dense_1", "time_embedding.linear_2"),
    (r"label_emb", "class_embedding"),
    (r"down(?P<l>\d+)_res(?P<i>\d+)/(?P<rest>.+)", "down_blocks.{l}.resnets.{i}.{rest}"),
    (r"down(?P<l>\d+)_attn(?P<i>\d+)/(?P<rest>.+)", "down_blocks.{l}.attentions.{i}.{rest}"),
    (r"down(?P<l>\d+)_resample/Conv_0", "down_blocks.{l}.downsamplers.0.conv"),
    (r"mid_res(?P<i>\d+)/(?P<rest>.+)", "mid_block.resnets.{i}.{rest}"),
    (r"mid_attn/(?P<rest>.+)", "mid_block.attentions.0.{rest}"),
    (r"up(?P<l>\d+)_res(?P<i>\d+)/(?P<rest>.+)", "up_blocks.{L}.resnets.{i}.{rest}"),
    (r"up(?P<l>\d+)_attn(?P<i>\d+)/(?P<rest>.+)", "up_blocks.{L}.attentions.{i}.{rest}"),
    (r"up(?P<l>\d+)_resample/Conv_0", "up_blocks.{L}.upsamplers.0.conv"),
)
# Inside a ResBlock / AttentionBlock ({rest} above).
_INNER = {
    "norm1": "norm1",
    "conv1": "conv1",
    "emb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
    "norm": "group_norm",
    "attn/query": "to_q",
    "attn/key": "to_k",
    "attn/value": "to_v",
    "attn/out": "to_out.0",
}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _torch_key(path: tuple[str, ...], levels: int) -> str:
    module = "/".join(path[:-1])
    for pattern, template in _TABLE:
        m = re.fullmatch(pattern, module)
        if m is None:
            continue
        g = m.groupdict()
        if "rest" in g:
            if g["rest"] not in _INNER:
                break
            g["rest"] = _INNER[g["rest"]]
        if "l" in g:
            g["L"] = levels - 1 - int(g["l"])
        return template.format(**g) + "." + _LEAF[path[-1]]
    raise AssertionError(f"diffusers_unet2d: no torch name for UNet param {path}")


def _entries(abstract: Any, levels: int) -> list[Entry]:
    return [
        Entry(path, (_torch_key(path, levels),), kind_of(path, len(leaf.shape)))
        for path, leaf in flat_params(abstract).items()
    ]


def _abstract(model_kwargs: Mapping[str, Any], in_channels: int, sample_size: int) -> Any:
    model = unet_lib.UNet(**dict(model_kwargs))
    x = jnp.zeros((1, sample_size, sample_size, in_channels), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes > 0 else None
    variables = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)), labels)
    return nn.meta.unbox(variables["params"])


# ----------------------------------------------------------------------------- kwargs -> config


def _attention_levels(resolutions, sample_size: int, levels: int) -> list[int]:
    return [lv for lv in range(levels) if sample_size // 2**lv in tuple(resolutions)]


def _head_dim(m: unet_lib.UNet, attn_levels: list[int]) -> tuple[int | None, list[str]]:
    """The one head width of every attention block, or the problems that prevent it."""
    sites = {f"level {lv}": m.base_channels * m.channel_mult[lv] for lv in attn_levels}
    if m.mid_attention:
        sites["mid block"] = m.base_channels * m.channel_mult[-1]
    dims = {}
    for name, c in sites.items():
        try:
            dims[name] = L.num_heads_for(c, m.num_heads, m.head_channels)[1]
        except ValueError as e:
            return None, [f"{name}: {e}"]
    if len(set(dims.values())) > 1:
        return None, [
            "attention head widths differ between blocks "
            + ", ".join(f"{k}: {v}" for k, v in dims.items())
            + " (diffusers' UNet2DModel has one attention_head_dim for every block: set "
            "head_channels instead of num_heads)"
        ]
    return (next(iter(dims.values())) if dims else None), []


def unet2d_config(
    model_kwargs: Mapping[str, Any], *, in_channels: int, sample_size: int
) -> dict[str, Any]:
    """The diffusers `UNet2DModel` config.json of a diffjax `UNet` run at sample_size.

    Raises:
      ValueError naming every UNet setting diffusers' layout cannot express.
    """
    what = "export_unet2d"
    m = resolved_fields(unet_lib.UNet, model_kwargs, what)
    problems = []
    for field, bad, why in (
        ("resblock_updown", True, "DownBlock2D/UpBlock2D always resample with a conv"),
        ("conv_resample", False, "DownBlock2D/UpBlock2D always resample with a conv"),
    ):
        if getattr(m, field) == bad:
            problems.append(f"{field}={bad} ({why})")
    if m.time_embedding != "sinusoidal":
        problems.append(
            f"time_embedding={m.time_embedding!r} (diffusers' Fourier projection differs; "
            "only 'sinusoidal' is exported)"
        )
    if m.time_scale != 1.0:
        problems.append(f"time_scale={m.time_scale} (diffusers feeds t unscaled; needs 1.0)")
    if m.context_dim or m.text_vocab_size:
        problems.append("context_dim/text_vocab_size > 0 (text conditioning is not in UNet2DModel)")
    levels = len(m.channel_mult)
    attn_levels = _attention_levels(m.attention_resolutions, sample_size, levels)
    head_dim, head_problems = _head_dim(m, attn_levels)
    problems += head_problems
    refuse(what, problems)
    cout = (m.out_channels or in_channels) * (2 if m.learn_sigma else 1)
    attn = [lv in attn_levels for lv in range(levels)]
    return {
        "_class_name": CLASS_NAME,
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": cout,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [m.base_channels * k for k in m.channel_mult],
        "layers_per_block": m.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(m.dropout),
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": m.num_groups,
        "attn_norm_num_groups": m.num_groups,
        "norm_eps": NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if m.scale_shift_norm else "default",
        "add_attention": bool(m.mid_attention),
        "class_embed_type": None,
        "num_class_embeds": m.num_classes + 1 if m.num_classes > 0 else None,
        "num_train_timesteps": None,
    }


# ----------------------------------------------------------------------------- config -> kwargs


def _config_size(config: Mapping[str, Any], sample_size: int | None) -> int | None:
    """The (square) input side: `sample_size` if given, else the config's."""
    size = sample_size if sample_size is not None else config.get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    return size if isinstance(size, int) and size > 0 else None


def unet_kwargs_from_config(
    config: Mapping[str, Any], *, sample_size: int | None = None, what: str = "UNet2DModel"
) -> dict[str, Any]:
    """diffjax `UNet` kwargs from a diffusers `UNet2DModel` config.json.

    Args:
      config: the config dict.
      sample_size: the input side the attention levels are expressed at (default: the
        config's `sample_size`).
      what: names the source in errors.

    Raises:
      ValueError naming every option diffjax's UNet cannot express.
    """
    c = dict(config)
    get = c.get
    problems = []
    if get("_class_name", CLASS_NAME) != CLASS_NAME:
        problems.append(f"_class_name={get('_class_name')!r} (needs {CLASS_NAME!r})")
    checks = (  # (key, diffusers' default, supported values, why)
        ("center_input_sample", False, (False,), "diffjax does not rescale inputs"),
        ("time_embedding_type", "positional", ("positional",), "sinusoidal time features only"),
        ("freq_shift", 0, (0,), "diffjax's U-Net time features have no frequency shift"),
        ("flip_sin_to_cos", True, (True,), "diffjax's features are [cos, sin]"),
        ("mid_block_type", "UNetMidBlock2D", ("UNetMidBlock2D",), "diffjax always has one"),
        ("mid_block_scale_factor", 1, (1,), "no output rescaling in diffjax"),
        ("downsample_padding", 1, (0,), "diffjax's stride-2 conv pads (0, 1) ('SAME')"),
        ("downsample_type", "conv", ("conv",), "conv resampling only"),
        ("upsample_type", "conv", ("conv",), "conv resampling only"),
        ("act_fn", "silu", ("silu", "swish"), "diffjax uses SiLU"),
        ("norm_eps", 1e-5, (NORM_EPS,), "diffjax's GroupNorm epsilon is 1e-5"),
        ("resnet_time_scale_shift", "default", ("default", "scale_shift"), "additive or AdaGN"),
        ("class_embed_type", None, (None,), "a plain class table only"),
    )
    for key, default, ok, why in checks:
        have = get(key, default)
        if have not in ok:
            problems.append(f"{key}={have!r} (needs {' or '.join(map(repr, ok))}: {why})")
    channels = list(get("block_out_channels", (224, 448, 672, 896)))
    down = list(get("down_block_types", ()))
    up = list(get("up_block_types", ()))
    levels = len(channels)
    if len(down) != levels or len(up) != levels:
        problems.append(
            f"{len(down)} down_block_types / {len(up)} up_block_types for {levels} "
            "block_out_channels"
        )
    bad = False
    for key, types, ok in (
        ("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D")),
    ):
        other = sorted({t for t in types if t not in ok})
        if other:
            bad = True
            problems.append(f"{key} has {other} (diffjax's UNet has {' and '.join(ok)} only)")
    attn = [t == "AttnDownBlock2D" for t in down]
    if not bad and len(up) == levels and [t == "AttnUpBlock2D" for t in up] != attn[::-1]:
        problems.append(
            f"up_block_types {up} do not mirror down_block_types {down} (diffjax puts "
            "attention at the same resolutions on the way down and up)"
        )
    base = channels[0] if channels else 0
    if not base or any(ch % base for ch in channels):
        problems.append(f"block_out_channels={channels} (each must be a multiple of the first)")
    ted = get("time_embedding_dim")
    if ted is not None and ted != 4 * base:
        problems.append(f"time_embedding_dim={ted} (diffjax's is 4 x {base} = {4 * base})")
    groups = get("norm_num_groups", 32)
    if not isinstance(groups, int):
        problems.append(f"norm_num_groups={groups!r} (needs an integer)")
    shift = get("resnet_time_scale_shift", "default")
    mid_attention = bool(get("add_attention", True))
    attn_groups = get("attn_norm_num_groups")
    if attn_groups is None and shift == "default":
        attn_groups = groups
    if mid_attention and attn_groups != groups:
        problems.append(
            f"attn_norm_num_groups={get('attn_norm_num_groups')!r} with "
            f"resnet_time_scale_shift={shift!r} (diffjax's mid attention has a GroupNorm of "
            f"norm_num_groups={groups} groups)"
        )
    ncls = get("num_class_embeds")
    if ncls is not None and (not isinstance(ncls, int) or ncls < 2):
        problems.append(f"num_class_embeds={ncls!r} (needs num_classes + 1 >= 2, or null)")
    size = _config_size(c, sample_size)
    if any(attn) and size is None:
        problems.append(
            f"sample_size={get('sample_size')!r} (diffjax places attention by resolution; "
            "pass sample_size= for the input side)"
        )
    if size is not None and levels and size % 2 ** (levels - 1):
        problems.append(f"sample_size={size} is not divisible by 2^{levels - 1} ({levels} levels)")
    cin = get("in_channels", 3)
    cout = get("out_channels", 3)
    head_dim = get("attention_head_dim", 8)
    sites = {
        f"down_blocks.{lv}": ch for lv, (a, ch) in enumerate(zip(attn, channels, strict=False)) if a
    }
    if mid_attention and channels:
        sites["mid_block"] = channels[-1]
    if head_dim is not None:
        uneven = [f"{k} ({ch} channels)" for k, ch in sites.items() if ch % head_dim]
        if uneven:
            problems.append(
                f"attention_head_dim={head_dim} does not divide {', '.join(uneven)} "
                "(diffjax's attention width equals the channel count)"
            )
    refuse(what, problems)

    widths = set(sites.values())
    if head_dim is None:  # diffusers: one head as wide as the block
        num_heads, head_channels = 1, 0
    elif len(widths) <= 1:
        num_heads, head_channels = (widths.pop() // head_dim if widths else 1), 0
    else:
        num_heads, head_channels = 1, head_dim
    learn_sigma = cout == 2 * cin
    return dict(
        base_channels=base,
        channel_mult=tuple(ch // base for ch in channels),
        num_res_blocks=get("layers_per_block", 2),
        attention_resolutions=tuple(size // 2**lv for lv in range(levels) if attn[lv]),
        mid_attention=mid_attention,
        num_heads=num_heads,
        head_channels=head_channels,
        dropout=float(get("dropout", 0.0)),
        scale_shift_norm=shift == "scale_shift",
        resblock_updown=False,
        conv_resample=True,
        num_groups=groups,
        num_classes=ncls - 1 if ncls else 0,
        learn_sigma=learn_sigma,
        out_channels=0 if learn_sigma or cout == cin else cout,
    )


# ----------------------------------------------------------------------------- load / export


def load_unet2d(directory: str, *, sample_size: int | None = None) -> tuple[dict[str, Any], dict]:
    """A diffusers `UNet2DModel` directory -> (UNet kwargs, params).

    Args:
      directory: holds config.json and the safetensors weights.
      sample_size: the input side at which to place the attention blocks (default: the
        config's `sample_size`).

    Returns:
      (kwargs for `diffjax.models.unet.UNet`, params as float32 numpy). With t the
      diffusers timestep and label `num_class_embeds - 1` the null class, the model
      computes diffusers' function.

    Raises:
      ValueError / ConversionError naming what does not fit.
    """
    config = safetensors_io.read_config(directory)
    kwargs = unet_kwargs_from_config(
        config, sample_size=sample_size, what=f"UNet2DModel config {directory}"
    )
    tensors = safetensors_io.read_tensors(directory)
    key = "conv_in.weight"
    if key not in tensors or tensors[key].ndim != 4:
        raise ConversionError(f"UNet2DModel {directory}: no 4D {key} in the weights.")
    in_channels = int(tensors[key].shape[1])
    size = _config_size(config, sample_size) or 2 ** (len(kwargs["channel_mult"]) - 1)
    abstract = _abstract(kwargs, in_channels, size)
    entries = _entries(abstract, len(kwargs["channel_mult"]))
    params = entries_to_flax(tensors, entries, abstract, what=f"UNet2DModel {directory}")
    return kwargs, params


def _infer_sample_size(m: unet_lib.UNet, attn_levels: set[int]) -> int | None:
    levels = len(m.channel_mult)
    candidates = {r * 2**lv for r in m.attention_resolutions for lv in range(levels)}
    fits = sorted(
        s
        for s in candidates
        if set(_attention_levels(m.attention_resolutions, s, levels)) == attn_levels
    )
    return fits[0] if len(fits) == 1 else None


def export_unet2d(
    params: Any,
    model_kwargs: Mapping[str, Any],
    out_dir: str,
    *,
    sample_size: int | None = None,
) -> None:
    """diffjax UNet params -> a diffusers `UNet2DModel` directory.

    Writes `out_dir/config.json` and `out_dir/diffusion_pytorch_model.safetensors`
    (float32), loadable with `UNet2DModel.from_pretrained(out_dir)`.

    Args:
      params: the UNet's params (EMA params work too).
      model_kwargs: the kwargs the UNet was built with (`config.model.kwargs`).
      out_dir: the component directory to write (created if needed).
      sample_size: the input side (`config.data.image_size`); default: the one size at
        which `attention_resolutions` put attention where the params have it.

    Raises:
      ValueError naming the settings diffusers cannot express, or the params that do not
      fit `model_kwargs`.
    """
    what = "export_unet2d"
    flat = flat_params(params)
    if ("conv_in", "kernel") not in flat:
        raise ValueError(f"{what}: params have no conv_in/kernel; are these UNet params?")
    in_channels = int(flat[("conv_in", "kernel")].shape[2])
    m = resolved_fields(unet_lib.UNet, model_kwargs, what)
    levels = len(m.channel_mult)
    tops = {p[0] for p in flat}
    have = {lv for lv in range(levels) if f"down{lv}_attn0" in tops}
    if sample_size is None:
        sample_size = _infer_sample_size(m, have)
        if sample_size is None:
            raise ValueError(
                f"{what}: cannot tell the input size from attention_resolutions="
                f"{tuple(m.attention_resolutions)}; pass sample_size= (config.data.image_size)."
            )
    want = set(_attention_levels(m.attention_resolutions, sample_size, levels))
    if want != have:
        raise ValueError(
            f"{what}: attention_resolutions={tuple(m.attention_resolutions)} at "
            f"sample_size={sample_size} put attention at levels {sorted(want)}, but the params "
            f"have it at levels {sorted(have)}; pass the sample_size the model was trained at."
        )
    config = unet2d_config(model_kwargs, in_channels=in_channels, sample_size=sample_size)
    abstract = _abstract(model_kwargs, in_channels, sample_size)
    tensors = entries_to_torch(params, _entries(abstract, levels), abstract, what=what)
    write_component(out_dir, config, tensors)


__all__ = ["export_unet2d", "load_unet2d", "unet2d_config", "unet_kwargs_from_config"]
