"""Model registry: `build_model(name, **kwargs)` and the named presets.

Preset kwargs are plain ints/floats/strings/tuples (no None) so a config can
hold them: `config.model.kwargs = ml_collections.ConfigDict(preset_kwargs('DiT-XL/2'))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from diffjax.models import controlnet, dit_controlnet
from diffjax.models.dit import DiT
from diffjax.models.dit_controlnet import DiTControlNet
from diffjax.models.sd_controlnet import SDControlNet
from diffjax.models.sd_unet import SDUNet
from diffjax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT, "sd_unet": SDUNet}


def model_fields(name: str) -> dict[str, Any]:
    """The constructor fields of a registered model with their defaults."""
    cls = _model_class(name)
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.init and f.name not in ("parent", "name")
    }


def _model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; registered models: {sorted(MODELS)}.")
    return MODELS[name]


def _plain(value: Any) -> Any:
    # Lists come from command-line overrides / JSON; modules want hashable tuples.
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered model from its keyword fields.

    Args:
      name: 'unet', 'dit' or 'sd_unet' (`config.model.name`).
      **kwargs: the module's fields (`config.model.kwargs`) plus `dtype`
        ('float32' | 'bfloat16') and `remat_policy`.

    Returns:
      An unbound `flax.linen.Module`.

    Raises:
      ValueError: unknown model name or unknown keyword (the message lists the valid ones).
    """
    cls = _model_class(name)
    valid = model_fields(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {unknown} for model {name!r}; valid ones are: {sorted(valid)}."
        )
    return cls(**{k: _plain(v) for k, v in kwargs.items()})


# ----------------------------------------------------------------------------- ControlNets

CONTROLNETS = ("dit", "sd_unet", "unet")  # the model families a ControlNet exists for


def build_controlnet(
    name: str,
    base_kwargs: Mapping[str, Any],
    *,
    conditioning_channels: int,
    control_downsample: int = 1,
    embedding_channels: tuple[int, ...] = (),
    depth: int = 0,
    dtype: str = "float32",
    remat_policy: str = "none",
) -> nn.Module:
    """The ControlNet of the base model `name` built with `base_kwargs` (its copy of the
    encoder half has the base's fields, so `controlnet.init_from_base` fits).

    Args:
      conditioning_channels: channels of the control image.
      control_downsample: output image size over the model's input size (the VAE's
        factor for latent models).
      embedding_channels: the condition embedding's widths; () = the family default.
      depth: DiT only: how many of the first blocks are copied (0 = depth // 2).
    """
    if name not in CONTROLNETS:
        raise ValueError(f"model {name!r} has no ControlNet; ones exist for {list(CONTROLNETS)}.")
    base = build_model(name, **base_kwargs, dtype=dtype, remat_policy=remat_policy)
    fields = {k: getattr(base, k) for k in model_fields(name)}
    widths = controlnet.embedding_widths(embedding_channels, control_downsample)
    if name == "unet":
        return controlnet.UNetControlNet(
            **fields,
            conditioning_channels=conditioning_channels,
            control_downsample=control_downsample,
            embedding_channels=widths,
        )
    if name == "dit":
        return DiTControlNet(
            **fields,
            control_depth=depth,
            conditioning_channels=conditioning_channels,
            control_downsample=control_downsample,
            embedding_channels=widths,
        )
    if 2 ** (len(widths) - 1) != control_downsample:
        raise ValueError(
            f"An SD ControlNet's embedding downsamples by 2**(len(embedding_channels) - 1); "
            f"{widths} gives {2 ** (len(widths) - 1)}, the VAE needs {control_downsample}."
        )
    return SDControlNet(
        **{k: v for k, v in fields.items() if k in SDControlNet.__dataclass_fields__},
        conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=widths,
    )


def controlnet_init_from_base(name: str):
    """`init_from_base(base_params, controlnet_params)` of model `name`'s ControlNet: the
    DiT's unstacks a scanned base first; the U-Nets' copy the shared top-level parts."""
    if name == "dit":
        return dit_controlnet.init_from_base
    return controlnet.init_from_base


# ----------------------------------------------------------------------------- presets

_DIT_SIZES = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}


def _dit_presets() -> dict[str, tuple[str, dict[str, Any]]]:
    out = {}
    for size, dims in _DIT_SIZES.items():
        for patch in (2, 4, 8):
            # Class-conditional ImageNet-256 in the 32x32x4 SD-VAE latent, learned
            # sigma, t in DDPM integer steps (Peebles & Xie 2023).
            out[f"DiT-{size}/{patch}"] = (
                "dit",
                dict(
                    patch_size=patch,
                    **dims,
                    mlp_ratio=4.0,
                    num_classes=1000,
                    learn_sigma=True,
                    time_scale=1.0,
                ),
            )
    return out


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # Ho et al. 2020, CIFAR-10 32x32 (35.7M params): ch 128, mult (1,2,2,2),
    # 2 res blocks, attention at 16x16, dropout 0.1, additive time conditioning.
    "ddpm_cifar10": (
        "unet",
        dict(
            base_channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_heads=1,
            dropout=0.1,
            scale_shift_norm=False,
            resblock_updown=False,
        ),
    ),
    # Dhariwal & Nichol 2021 (guided-diffusion README, 64x64 class-conditional):
    # 192 channels, mult (1,2,3,4), 3 res blocks, attention at 32,16,8 with 64
    # channels per head, scale-shift norm, BigGAN up/down, dropout 0.1, learned sigma.
    "adm_imagenet64": (
        "unet",
        dict(
            base_channels=192,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attention_resolutions=(32, 16, 8),
            head_channels=64,
            dropout=0.1,
            scale_shift_norm=True,
            resblock_updown=True,
            num_classes=1000,
            learn_sigma=True,
        ),
    ),
    # A CPU-sized model for the 8x8x1 sklearn digits (1.08M params).
    "unet_digits": (
        "unet",
        dict(
            base_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=2,
            attention_resolutions=(4,),
            num_heads=4,
            num_groups=8,
            dropout=0.1,
            scale_shift_norm=True,
            num_classes=10,
        ),
    ),
    # The digits U-Net with its own trainable word-level text encoder: `context`
    # is WordTokenizer ids [B, L] (diffjax.text), captions like "a handwritten seven".
    "unet_digits_text": (
        "unet",
        dict(
            base_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=2,
            attention_resolutions=(4,),
            num_heads=4,
            num_groups=8,
            dropout=0.1,
            scale_shift_norm=True,
            num_classes=0,
            context_dim=64,
            text_vocab_size=4097,
            text_depth=2,
            text_heads=4,
        ),
    ),
    **_dit_presets(),
}


def preset_names() -> list[str]:
    """All preset names."""
    return sorted(PRESETS)


def preset(name: str) -> tuple[str, dict[str, Any]]:
    """(model name, kwargs) of a preset."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {preset_names()}.")
    model, kwargs = PRESETS[name]
    return model, dict(kwargs)


def preset_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """A preset's model kwargs (a fresh dict), optionally with some fields overridden."""
    model, kwargs = preset(name)
    valid = model_fields(model)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"Unknown override(s) {unknown} for {name!r}; valid: {sorted(valid)}.")
    kwargs.update(overrides)
    return kwargs


def build_preset(name: str, **overrides: Any) -> nn.Module:
    """Builds a preset model, e.g. `build_preset('DiT-XL/2', dtype='bfloat16')`."""
    model, _ = preset(name)
    return build_model(model, **preset_kwargs(name, **overrides))


def _check_presets_plain(presets: Mapping[str, tuple[str, dict[str, Any]]]) -> None:
    # Presets go straight into ConfigDicts: keep them to plain, non-None values.
    for name, (_, kwargs) in presets.items():
        for k, v in kwargs.items():
            if v is None or not isinstance(v, (int, float, str, tuple)):
                raise TypeError(f"Preset {name!r} field {k!r} has non-plain value {v!r}.")


_check_presets_plain(PRESETS)
