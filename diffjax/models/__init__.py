"""Diffusion backbones (Flax linen): U-Net, DiT, SD U-Net, a small text encoder, and a registry.

    model = diffjax.models.build_model(config.model.name, **config.model.kwargs,
                                       dtype=config.model.dtype,
                                       remat_policy=config.model.remat_policy)
    out = model.apply({'params': p}, x, t, labels=None, context=None,
                      context_mask=None, train=False, rngs={'dropout': key})

* Presets: `PRESETS` / `preset_kwargs(name)` give plain kwargs dicts for
  'ddpm_cifar10', 'adm_imagenet64', 'unet_digits', 'unet_digits_text' and
  'DiT-{S,B,L,XL}/{2,4,8}'; `build_preset(name, **overrides)` builds one.
* Sharding: params carry logical axis names; `LOGICAL_AXIS_RULES` maps the
  large ones to the 'fsdp' mesh axis; `param_shardings(boxed, mesh)` applies
  the rules only where a dimension divides by the mesh axis.
* Cost: `diffjax.models.summary.model_summary` (params, forward GFLOPs per
  image, activation memory), computed abstractly.
* Stable Diffusion: `SDUNet` ('sd_unet') mirrors diffusers' `UNet2DConditionModel`
  (SD 1.x/2.x); `sd_unet.from_diffusers_config(cfg)` builds it from a `unet/config.json`.
* Text: `diffjax.models.text` (`TextEncoder`); a model built with
  `text_vocab_size > 0` takes token ids as `context` (from a tokenizer in
  `diffjax.text`) and trains its own encoder.
"""

from diffjax.models.dit import DiT
from diffjax.models.layers import LOGICAL_AXIS_RULES, REMAT_POLICIES
from diffjax.models.partitioning import param_partition_specs, param_shardings
from diffjax.models.registry import (
    CONTROLNETS,
    MODELS,
    PRESETS,
    build_controlnet,
    build_model,
    build_preset,
    controlnet_init_from_base,
    model_fields,
    preset,
    preset_kwargs,
    preset_names,
)
from diffjax.models.sd_unet import SDUNet
from diffjax.models.unet import UNet

__all__ = [
    "CONTROLNETS",
    "DiT",
    "LOGICAL_AXIS_RULES",
    "MODELS",
    "PRESETS",
    "REMAT_POLICIES",
    "SDUNet",
    "UNet",
    "build_controlnet",
    "controlnet_init_from_base",
    "build_model",
    "build_preset",
    "param_partition_specs",
    "param_shardings",
    "model_fields",
    "preset",
    "preset_kwargs",
    "preset_names",
]
