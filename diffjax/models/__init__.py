"""Diffusion backbones (Flax linen): U-Net, DiT, a small text encoder, and a registry.

model = diffjax.models.build_model('unet', **config.model.kwargs,
                                   dtype=config.model.dtype,
                                   remat_policy=config.model.remat_policy)
out = model.apply({'params': p}, x, t, labels=None, context=None,
                  context_mask=None, train=False, rngs={'dropout': key})
"""

from diffjax.models.dit import DiT
from diffjax.models.layers import LOGICAL_AXIS_RULES, REMAT_POLICIES
from diffjax.models.partitioning import param_partition_specs, param_shardings
from diffjax.models.registry import (
    MODELS,
    PRESETS,
    build_model,
    build_preset,
    model_fields,
    preset,
    preset_kwargs,
    preset_names,
)
from diffjax.models.unet import UNet

__all__ = [
    "DiT",
    "LOGICAL_AXIS_RULES",
    "MODELS",
    "PRESETS",
    "REMAT_POLICIES",
    "UNet",
    "build_model",
    "build_preset",
    "param_partition_specs",
    "param_shardings",
    "model_fields",
    "preset",
    "preset_kwargs",
    "preset_names",
]
