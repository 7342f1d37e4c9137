"""InceptionV3 as used for FID (pytorch-fid's network), in Flax linen, NHWC.

The network is the TensorFlow "2015-12-05" Inception graph that the original FID
(TTUR) and Inception Score code use, in the form pytorch-fid ported it: torchvision's
Inception3 with four blocks patched (`FIDInceptionA/C/E_1/E_2`):

* the average pool branches of Mixed_5b..5d (A), Mixed_6b..6e (C) and Mixed_7b (E_1)
  exclude the zero padding from the average (`count_include_pad=False`), as
  TensorFlow's average pool does;
* Mixed_7c (E_2) uses a 3x3 *max* pool in its pool branch.

Every convolution has no bias and is followed by BatchNorm (eps=1e-3) and ReLU.
Input handling is pytorch-fid's: images in [0, 1] are resized to 299x299 with
bilinear interpolation (align_corners=False, no antialiasing, also when shrinking),
scaled to [-1, 1] with `2x - 1`, and the pool3 output is the global average of the
last 8x8x2048 map.

Parameter names mirror the PyTorch state dict, so `Mixed_5b.branch1x1.conv.weight`
is `params/Mixed_5b/branch1x1/conv/kernel` here (`torch_to_flax` is the mapping).
BatchNorm running statistics live in the `batch_stats` collection, so
`load_params` returns the full variables dict `{'params', 'batch_stats'}`.

The standard weights are pytorch-fid's release file (see `FID_WEIGHTS_URL`); convert
them once with `launch/convert_inception.py` and load the safetensors with
`load_params`. Nothing here downloads anything.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# pytorch-fid's release of the TF Inception weights ported to PyTorch.
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
# The file name carries the first 8 hex digits of the SHA-256 (torch.hub convention,
# checked on download by torch.hub); the full digest is as recorded by a third-party
# project for the byte-identical torch-fidelity copy of the same file (not checked
# against pytorch-fid itself here).
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

INPUT_SIZE = 299  # Spatial size the network is evaluated at.
FEATURE_DIM = 2048  # pool3 features.
NUM_LOGITS = 1008  # Classes of the TF Inception's softmax head (1000 + 8 unused).
BN_EPS = 1e-3

# Float32 convolutions at full precision: on TPU/GPU the default f32 matmul precision
# may be bf16/TF32, which moves FID in the first decimals.
_PRECISION = jax.lax.Precision.HIGHEST

Variables = dict[str, Any]


# ----------------------------------------------------------------------------- resize


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Interpolation matrix of torch's `F.interpolate(mode='bilinear', align_corners=False)`.

    No antialiasing: each output sample mixes the two nearest input samples, also when
    shrinking (unlike `jax.image.resize`, which antialiases on downsampling).

    Args:
      in_size: input length along one axis.
      out_size: output length.

    Returns:
      float32 [out_size, in_size]; row i holds the weights of output sample i.
    """
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    # torch clamps negative source coordinates to 0 (the first output samples when
    # upsampling); at the far edge the upper neighbour is clamped to the last pixel.
    src = np.maximum(src, 0.0)
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m.astype(np.float32)


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes NHWC images like torch bilinear interpolation with align_corners=False.

    Args:
      images: float [B, H, W, C].
      size: (out_h, out_w).

    Returns:
      float32 [B, out_h, out_w, C].
    """
    _, h, w, _ = images.shape
    out_h, out_w = size
    x = images.astype(jnp.float32)
    if (h, w) == (out_h, out_w):
        return x
    mh = jnp.asarray(bilinear_matrix(h, out_h))
    mw = jnp.asarray(bilinear_matrix(w, out_w))
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=_PRECISION)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=_PRECISION)


# ----------------------------------------------------------------------------- layers


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_PRECISION,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's average pool ignores the zero padding: divide by the in-image count.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d), FID variant: pool branch excludes padding."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convs (Mixed_6b..e), FID variant."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Mixed_7b/c).

    `pool='avg'` is FIDInceptionE_1 (average pool excluding padding); `pool='max'` is
    FIDInceptionE_2 (the TF graph's max pool in Mixed_7c).
    """

    pool: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        elif self.pool == "max":
            pooled = _max_pool_3x3_same(x)
        else:
            raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}.")
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 up to pool3 (and optionally the 1008-way head).

    Attributes:
      with_logits: also apply the `fc` head (needs `fc` params; the standard weights
        file has them). Adds `logits` (pool3 @ W + b, torchvision's fc output) and
        `logits_unbiased` (pool3 @ W, what the TF Inception Score code feeds to the
        softmax) to the outputs.
      resize_input: bilinearly resize to 299x299 first (pytorch-fid's default).
      normalize_input: map [0, 1] to [-1, 1] with `2x - 1` (pytorch-fid's default).
    """

    with_logits: bool = False
    resize_input: bool = True
    normalize_input: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Computes pool3 features.

        Args:
          images: float [B, H, W, 3] in [0, 1] (pytorch-fid's input range; with
            `resize_input=False` H = W = 299 is expected).

        Returns:
          {'pool3': float32 [B, 2048]} plus, with `with_logits`, 'logits' and
          'logits_unbiased', float32 [B, 1008].
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects [B, H, W, 3] images, got {images.shape}.")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)  # 73
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_3x3_s2(x)  # 35
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)  # 17
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)  # 8
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        out = {"pool3": pool3}
        if self.with_logits:
            out["logits_unbiased"], out["logits"] = _LogitsHead(name="fc")(pool3)
        return out


class _LogitsHead(nn.Module):
    """The 2048 -> 1008 softmax head; returns (x @ W, x @ W + b)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
        bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
        unbiased = jnp.dot(x, kernel, precision=_PRECISION)
        return unbiased, unbiased + bias


# ----------------------------------------------------------------------------- names

_BN_TORCH_TO_FLAX = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_BN_FLAX_TO_TORCH = {v: k for k, v in _BN_TORCH_TO_FLAX.items()}
# PyTorch BatchNorm bookkeeping with no counterpart in an inference network.
_IGNORED_TORCH_SUFFIXES = (".num_batches_tracked",)


def torch_to_flax_name(name: str) -> str | None:
    """Maps a pytorch-fid state-dict name to the flat Flax name used in safetensors.

    `Mixed_5b.branch1x1.conv.weight` -> `params/Mixed_5b/branch1x1/conv/kernel`,
    `...bn.running_var` -> `batch_stats/.../bn/var`, `fc.weight` -> `params/fc/kernel`.

    Returns:
      The flat name, or None for entries that carry no weights (`num_batches_tracked`).

    Raises:
      ValueError: for a name that is not part of the FID Inception.
    """
    if name.endswith(_IGNORED_TORCH_SUFFIXES):
        return None
    parts = name.split(".")
    if parts[0] == "fc" and len(parts) == 2 and parts[1] in ("weight", "bias"):
        return "params/fc/" + ("kernel" if parts[1] == "weight" else "bias")
    if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
        return "params/" + "/".join(parts[:-1]) + "/kernel"
    if len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_TORCH_TO_FLAX:
        collection, leaf = _BN_TORCH_TO_FLAX[parts[-1]]
        return f"{collection}/" + "/".join(parts[:-1]) + f"/{leaf}"
    raise ValueError(
        f"{name!r} is not a parameter of the FID InceptionV3 (expected '<block>.conv.weight', "
        "'<block>.bn.{weight,bias,running_mean,running_var}' or 'fc.{weight,bias}')."
    )


def flax_to_torch_name(flat: str) -> str:
    """Inverse of `torch_to_flax_name`."""
    collection, *path, leaf = flat.split("/")
    if path == ["fc"]:
        return "fc." + {"kernel": "weight", "bias": "bias"}[leaf]
    if path[-1] == "conv" and leaf == "kernel":
        return ".".join(path) + ".weight"
    if path[-1] == "bn" and (collection, leaf) in _BN_FLAX_TO_TORCH:
        return ".".join(path) + "." + _BN_FLAX_TO_TORCH[(collection, leaf)]
    raise ValueError(f"{flat!r} is not a flat FID InceptionV3 variable name.")


def _torch_to_flax_layout(flat: str, value: np.ndarray) -> np.ndarray:
    if flat.endswith("conv/kernel"):
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    if flat == "params/fc/kernel":
        return np.transpose(value)  # [out, in] -> [in, out]
    return value


def _flax_to_torch_layout(flat: str, value: np.ndarray) -> np.ndarray:
    if flat.endswith("conv/kernel"):
        return np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    if flat == "params/fc/kernel":
        return np.transpose(value)
    return value


@functools.cache
def expected_shapes(with_logits: bool = True) -> dict[str, tuple[int, ...]]:
    """Flat Flax variable names -> shapes of the FID InceptionV3 (no computation)."""
    model = InceptionV3(with_logits=with_logits, resize_input=False)
    abstract = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )
    flat = flatten_variables(abstract)
    return {k: tuple(v.shape) for k, v in flat.items()}


def torch_state_dict_shapes(with_fc: bool = True) -> dict[str, tuple[int, ...]]:
    """PyTorch state-dict names -> shapes of pytorch-fid's network (no torch needed).

    Args:
      with_fc: include `fc.weight` [1008, 2048] and `fc.bias` [1008].
    """
    out = {}
    for flat, shape in expected_shapes(with_fc).items():
        if flat.endswith("conv/kernel"):
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif flat == "params/fc/kernel":
            shape = (shape[1], shape[0])
        out[flax_to_torch_name(flat)] = shape
    return out


def torch_to_flax(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts a pytorch-fid state dict (as numpy arrays) to flat Flax variables.

    Pure numpy: the converter script feeds it `tensor.numpy()` values, tests feed it
    random arrays. Conv weights go OIHW -> HWIO, `fc.weight` is transposed.

    Args:
      state_dict: torch name -> array (anything `np.asarray` accepts).

    Returns:
      Flat name (`params/Mixed_5b/branch1x1/conv/kernel`, ...) -> float32 array.

    Raises:
      ValueError: naming every unknown, missing or wrongly shaped tensor.
    """
    names = [n for n in state_dict if not n.endswith(_IGNORED_TORCH_SUFFIXES)]
    has_fc = "fc.weight" in names or "fc.bias" in names
    expected = torch_state_dict_shapes(with_fc=has_fc)
    problems = []
    unknown = sorted(set(names) - set(expected))
    missing = sorted(set(expected) - set(names))
    if unknown:
        problems.append(f"unexpected tensors: {_name_list(unknown)}")
    if missing:
        problems.append(f"missing tensors: {_name_list(missing)}")
    out = {}
    for name in names:
        if name not in expected:
            continue
        value = np.asarray(state_dict[name])
        if value.shape != expected[name]:
            problems.append(f"{name} has shape {value.shape}, expected {expected[name]}")
            continue
        flat = torch_to_flax_name(name)
        out[flat] = np.ascontiguousarray(_torch_to_flax_layout(flat, value), dtype=np.float32)
    if problems:
        raise ValueError(
            "The state dict is not pytorch-fid's InceptionV3 (pt_inception-2015-12-05): "
            + "; ".join(problems)
        )
    return out


def flax_to_torch(flat_variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax` (flat Flax names -> torch names and layouts)."""
    return {
        flax_to_torch_name(k): np.ascontiguousarray(_flax_to_torch_layout(k, np.asarray(v)))
        for k, v in flat_variables.items()
    }


def _name_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- (de)serialize


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Nested variables {'params': {...}, 'batch_stats': {...}} -> {'a/b/c': leaf}."""
    out = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    visit("", variables)
    return out


def unflatten_variables(flat: Mapping[str, Any]) -> Variables:
    """Inverse of `flatten_variables`."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *path, leaf = name.split("/")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def save_params(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Writes Inception variables (nested or flat) to safetensors with flat names."""
    from safetensors.numpy import save_file

    if not variables:
        raise ValueError("No Inception variables to save.")
    flat = variables if "/" in next(iter(variables)) else flatten_variables(variables)
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()}
    save_file(arrays, os.fspath(path), metadata={"format": "diffjax-fid-inception-v3"})


def load_params(path: str | os.PathLike) -> Variables:
    """Loads FID Inception variables from a safetensors file (see convert_inception.py).

    Args:
      path: safetensors written by `launch/convert_inception.py` (or `save_params`).

    Returns:
      Variables `{'params': ..., 'batch_stats': ...}` of numpy float32 arrays, ready for
      `InceptionV3().apply(variables, images)`. The `fc` head is included when the file
      has it (`has_logits(variables)`).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: naming missing, unexpected or wrongly shaped tensors.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Inception weights {path!r} not found. Convert pytorch-fid's "
            f"pt_inception-2015-12-05-6726825d.pth ({FID_WEIGHTS_URL}) with "
            "`python launch/convert_inception.py --pth=... --out=...`."
        )
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from e
    if flat and not any("/" in k for k in flat):
        raise ValueError(
            f"{path!r} holds PyTorch-named tensors; convert it with "
            "`python launch/convert_inception.py` first."
        )
    has_fc = any(k.startswith("params/fc/") for k in flat)
    expected = expected_shapes(with_logits=has_fc)
    problems = []
    unknown = sorted(set(flat) - set(expected))
    missing = sorted(set(expected) - set(flat))
    if unknown:
        problems.append(f"unexpected tensors: {_name_list(unknown)}")
    if missing:
        problems.append(f"missing tensors: {_name_list(missing)}")
    for name in sorted(set(flat) & set(expected)):
        if tuple(flat[name].shape) != expected[name]:
            problems.append(
                f"{name} has shape {tuple(flat[name].shape)}, expected {expected[name]}"
            )
    if problems:
        raise ValueError(f"{path!r} is not an FID InceptionV3 weights file: " + "; ".join(problems))
    return unflatten_variables({k: v.astype(np.float32, copy=False) for k, v in flat.items()})


def has_logits(variables: Mapping[str, Any]) -> bool:
    """Whether the variables include the 1008-way `fc` head (needed for Inception Score)."""
    return "fc" in variables.get("params", {})


def random_variables(seed: int = 0, with_logits: bool = True) -> Variables:
    """Random FID Inception variables (numpy, float32) for tests and smoke runs.

    He-normal convolutions and mildly perturbed BatchNorm statistics keep activations
    O(1) through the whole network, so features are non-degenerate. Not the real
    weights: FID numbers computed with these mean nothing.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in sorted(expected_shapes(with_logits).items()):
        if name.endswith("conv/kernel"):
            fan_in = shape[0] * shape[1] * shape[2]
            v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name == "params/fc/kernel":
            v = rng.standard_normal(shape) / np.sqrt(shape[0])
        elif name.endswith("bn/scale"):
            v = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("bn/var"):
            v = rng.uniform(0.5, 1.5, shape)
        else:  # bn bias, bn mean, fc bias
            v = 0.1 * rng.standard_normal(shape)
        flat[name] = v.astype(np.float32)
    return unflatten_variables(flat)
