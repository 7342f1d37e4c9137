"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"), the VGG16 variant of the `lpips` package (version 0.1), in Flax.

    d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )

f_l are VGG16's activations at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the
inputs after lpips' scaling layer ((x - SHIFT) / SCALE, inputs in [-1, 1]); n divides
each feature vector by its channel L2 norm (+ 1e-10); w_l >= 0 are the 1x1 "lin"
layers (one output channel, no bias). `LPIPS.widths` sets the five block widths
(VGG16: 64, 128, 256, 512, 512), so tests run a tiny random-weight network.

Weights come only from the user: `launch/convert_lpips.py` reads torchvision's
`vgg16` state dict (`features.N.weight/bias`) and lpips' `vgg.pth`
(`lin0.model.1.weight` ... `lin4`) and writes one safetensors file in those torch names
and layouts; `load_params(path)` reads it into this module's tree (conv kernels HWIO)
and `module_for(params)` builds the matching module.

The network pools four times, so images must be at least 16x16 (relu5_3 runs at 1/16
of the input size). One-channel images are repeated to three.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# lpips' ScalingLayer: its inputs in [-1, 1] mapped to ImageNet-normalised ones.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
# torchvision's vgg16.features indices of the 13 convs (ReLUs and max-pools between).
FEATURE_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
MIN_SIZE = 16  # four 2x2 max-pools before relu5_3
_EPS = 1e-10  # lpips' normalize_tensor


def torch_names(widths: tuple[int, ...] = VGG16_WIDTHS) -> dict[str, tuple[int, ...]]:
    """{torch name: torch shape} of every tensor the network needs (OIHW convs)."""
    shapes: dict[str, tuple[int, ...]] = {}
    cin = 3
    for b, indices in enumerate(FEATURE_INDICES):
        for i in indices:
            shapes[f"features.{i}.weight"] = (widths[b], cin, 3, 3)
            shapes[f"features.{i}.bias"] = (widths[b],)
            cin = widths[b]
        shapes[f"lin{b}.model.1.weight"] = (1, widths[b], 1, 1)
    return shapes


class LPIPS(nn.Module):
    """The LPIPS distance between two image batches.

    Attributes:
      widths: the five VGG block widths (VGG16: 64, 128, 256, 512, 512).
      dtype: compute dtype of the convolutions; the distance is summed in float32.
    """

    widths: tuple[int, ...] = VGG16_WIDTHS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x, y: [B, H, W, C] in [-1, 1], C in (1, 3), H, W >= 16 -> distance [B] float32."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(
                f"LPIPS takes two NHWC batches of the same shape with 1 or 3 channels, got "
                f"{x.shape} and {y.shape}."
            )
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(
                f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} (VGG16 pools four "
                f"times), got {x.shape[1]}x{x.shape[2]}."
            )
        if len(self.widths) != len(FEATURE_INDICES):
            raise ValueError(f"LPIPS.widths needs 5 block widths, got {self.widths}.")
        b = x.shape[0]
        h = jnp.concatenate([x, y]).astype(jnp.float32)  # one pass over both batches
        if h.shape[-1] == 1:
            h = jnp.repeat(h, 3, axis=-1)
        h = (h - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        h = h.astype(self.dtype)
        total = jnp.zeros((b,), jnp.float32)
        for block, indices in enumerate(FEATURE_INDICES):
            if block:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for i in indices:
                conv = nn.Conv(
                    self.widths[block],
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=f"features_{i}",
                )
                h = nn.relu(conv(h))
            f = h.astype(jnp.float32)
            f = f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + _EPS)
            diff = jnp.square(f[:b] - f[b:])
            w = self.param(
                f"lin{block}", nn.initializers.ones_init(), (self.widths[block],), jnp.float32
            )
            total = total + jnp.mean(diff @ w, axis=(1, 2))
        return total


# ----------------------------------------------------------------------------- weights


def torch_to_flax(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """torchvision vgg16 features + lpips lin tensors (torch names/layouts) -> params.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped tensor, or negative
        lin weights (lpips' are non-negative).
    """
    try:
        widths = tuple(int(tensors[f"lin{b}.model.1.weight"].shape[1]) for b in range(5))
    except (KeyError, IndexError, AttributeError):
        widths = VGG16_WIDTHS
    expected = torch_names(widths)
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k} has shape {tuple(np.shape(v))}, expected {expected[k]}"
        for k, v in tensors.items()
        if k in expected and tuple(np.shape(v)) != expected[k]
    ]
    if problems:
        raise ValueError(
            "Not LPIPS VGG16 weights (torchvision vgg16 `features.N` + lpips `linN.model.1`): "
            + "; ".join(problems[:12])
            + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
            + ". Convert with launch/convert_lpips.py."
        )
    params: dict[str, Any] = {}
    for b, indices in enumerate(FEATURE_INDICES):
        for i in indices:
            w = np.asarray(tensors[f"features.{i}.weight"], np.float32)
            params[f"features_{i}"] = {
                "kernel": np.transpose(w, (2, 3, 1, 0)),
                "bias": np.asarray(tensors[f"features.{i}.bias"], np.float32),
            }
        lin = np.asarray(tensors[f"lin{b}.model.1.weight"], np.float32).reshape(-1)
        if (lin < 0).any():
            raise ValueError(
                f"lin{b}.model.1.weight has negative entries; lpips' trained lin layers are "
                "non-negative (pass its weights/v0.1/vgg.pth)."
            )
        params[f"lin{b}"] = lin
    return params


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`."""
    out: dict[str, np.ndarray] = {}
    for b, indices in enumerate(FEATURE_INDICES):
        for i in indices:
            out[f"features.{i}.weight"] = np.transpose(
                np.asarray(params[f"features_{i}"]["kernel"]), (3, 2, 0, 1)
            )
            out[f"features.{i}.bias"] = np.asarray(params[f"features_{i}"]["bias"])
        lin = np.asarray(params[f"lin{b}"])
        out[f"lin{b}.model.1.weight"] = lin.reshape(1, -1, 1, 1)
    return out


def module_for(params: Mapping[str, Any], dtype: Any = jnp.float32) -> LPIPS:
    """The `LPIPS` module whose widths match `params` (from their shapes)."""
    return LPIPS(widths=tuple(int(np.shape(params[f"lin{b}"])[0]) for b in range(5)), dtype=dtype)


def save_params(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes torch-layout tensors (validated first) as the safetensors file LPIPS reads."""
    from safetensors.numpy import save_file

    torch_to_flax(tensors)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
        os.fspath(path),
        metadata={"format": "lpips-vgg16", "layout": "torch"},
    )


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a `launch/convert_lpips.py` file into `LPIPS` params (numpy, HWIO kernels).

    Raises:
      FileNotFoundError / ValueError naming the file and the fix.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS weights {path!r} do not exist; make them with launch/convert_lpips.py "
            "from torchvision's vgg16 weights and lpips' vgg.pth."
        )
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path!r} is not a readable safetensors file ({e}); make it with "
            "launch/convert_lpips.py."
        ) from e
    try:
        return torch_to_flax(tensors)
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from None
