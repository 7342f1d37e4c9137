"""The PatchGAN discriminator of pix2pix (Isola et al. 2017) as taming-transformers and
Stable Diffusion's VAE training use it (`NLayerDiscriminator`), in NHWC.

    conv 4x4 s2 -> LeakyReLU(0.2)
    (conv 4x4 s2 -> norm -> LeakyReLU(0.2)) x (num_layers - 1)
    conv 4x4 s1 -> norm -> LeakyReLU(0.2)
    conv 4x4 s1 -> 1-channel logits, one per overlapping patch

Widths double per layer from `channels`, capped at 8x. All convs pad 1 on each side
(torch's `padding=1`, not Flax's "SAME"), so an S x S image gives logits of side
S // 2^num_layers - 2.

GroupNorm replaces pix2pix's BatchNorm: BatchNorm's running statistics are mutable
state outside the params (they would need their own collection in the train state,
EMA and checkpoints), and its batch statistics couple the examples of a batch, so the
result would depend on how a batch is split over devices and micro-batches
(`train.grad_accum_steps`); GroupNorm is per example and keeps the train step a pure
function of (params, batch). With `norm='none'` the hidden convs are plain (with bias).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers as L

NORMS = ("group", "none")
_PAD = ((1, 1), (1, 1))
_INIT = nn.initializers.normal(0.02)  # pix2pix / taming's weights_init


def output_size(image_size: int, num_layers: int) -> int:
    """Side of the logit map for an `image_size` square input."""
    return image_size // 2**num_layers - 2


class PatchDiscriminator(nn.Module):
    """Patch logits [B, h, w, 1] of images [B, H, W, C] (float32 out).

    Attributes:
      channels: width of the first conv (pix2pix's ndf, 64).
      num_layers: stride-2 convs (pix2pix's n_layers, 3).
      norm: 'group' (GroupNorm, up to 32 groups) | 'none'.
      dtype: compute dtype string; params are float32.
    """

    channels: int = 64
    num_layers: int = 3
    norm: str = "group"
    dtype: str = "float32"

    def _conv(self, features: int, strides: int, use_bias: bool, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (4, 4),
            strides=(strides, strides),
            padding=_PAD,
            use_bias=use_bias,
            dtype=L.get_dtype(self.dtype),
            param_dtype=jnp.float32,
            kernel_init=L.partitioned(_INIT, (None, None, "conv_in", "conv_out")),
            bias_init=L.partitioned(nn.initializers.zeros_init(), ("conv_out",)),
            name=name,
        )

    def _block(self, x: jax.Array, features: int, strides: int, name: str) -> jax.Array:
        norm = self.norm == "group"
        x = self._conv(features, strides, not norm, name)(x)
        if norm:
            x = nn.GroupNorm(
                num_groups=math.gcd(32, features),
                dtype=L.get_dtype(self.dtype),
                param_dtype=jnp.float32,
                scale_init=L.partitioned(nn.initializers.ones_init(), ("norm",)),
                bias_init=L.partitioned(nn.initializers.zeros_init(), ("norm",)),
                name=f"{name}_norm",
            )(x)
        return nn.leaky_relu(x, 0.2)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"PatchDiscriminator: norm={self.norm!r} is not one of {NORMS}.")
        if self.num_layers < 1 or self.channels < 1:
            raise ValueError(
                f"PatchDiscriminator needs num_layers >= 1 and channels >= 1, got "
                f"{self.num_layers} and {self.channels}."
            )
        if min(x.shape[1:3]) // 2**self.num_layers - 2 < 1:
            raise ValueError(
                f"PatchDiscriminator: {x.shape[1]}x{x.shape[2]} images are too small for "
                f"{self.num_layers} stride-2 layers (the logit map would be empty); use "
                "fewer layers."
            )
        h = x.astype(L.get_dtype(self.dtype))
        h = nn.leaky_relu(self._conv(self.channels, 2, True, "conv_0")(h), 0.2)
        for n in range(1, self.num_layers):
            h = self._block(h, self.channels * min(2**n, 8), 2, f"conv_{n}")
        h = self._block(h, self.channels * min(2**self.num_layers, 8), 1, f"conv_{self.num_layers}")
        logits = self._conv(1, 1, True, f"conv_{self.num_layers + 1}")(h)
        return logits.astype(jnp.float32)
