"""Inception features and FID statistics of image collections.

Images enter as numpy arrays [N, H, W, C]: uint8 in [0, 255], or float in [0, 1]
(pytorch-fid's range; floats in [0, 255] or [-1, 1] are refused, not guessed).
C = 1 is repeated to 3 channels. Any size is bilinearly resized to 299x299 like
pytorch-fid.

Feature extraction is data parallel: each fixed-size batch is split over the local
devices (a one-axis mesh), the last batch is padded and the padding dropped, and
features stream into float64 `RunningStats`, so any number of images fits in memory.
In a multi-process job each process computes the statistics of the images it is
given; combine per-process `RunningStats` with `merge`, or feed all images to one
process.

Typical use:

    variables = inception.load_params("inception.safetensors")
    mu, sigma = compute_statistics(images_uint8, variables, batch_size=200)
    fid = frechet_distance(mu, sigma, *load_statistics("cifar10_train.npz"))
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax.eval import inception
from diffjax.eval.frechet import frechet_distance
from diffjax.eval.stats import RunningStats, load_statistics
from diffjax.images import IMAGE_EXTENSIONS  # pytorch-fid's list

DEFAULT_BATCH_SIZE = 200

ImagesLike = np.ndarray | Iterable[np.ndarray]


# ----------------------------------------------------------------------------- inputs


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Validates a batch and brings it to 3 channels, keeping uint8 as uint8.

    Args:
      images: [B, H, W, C] with C in {1, 3}; uint8 (or another integer dtype with
        values in [0, 255]) or float in [0, 1].

    Returns:
      uint8 or float32 [B, H, W, 3].

    Raises:
      ValueError: wrong rank, channel count or value range, with the fix.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(
            f"Images must be [N, H, W, C], got shape {x.shape}"
            + ("; add a channel axis to grayscale images (x[..., None])." if x.ndim == 3 else ".")
        )
    if x.shape[-1] not in (1, 3):
        raise ValueError(
            f"Images must have 1 or 3 channels (NHWC), got {x.shape[-1]} (shape {x.shape}); "
            "drop alpha channels, and pass channels last."
        )
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"Integer images must lie in [0, 255], got [{x.min()}, {x.max()}].")
        x = x.astype(np.uint8)
    elif np.issubdtype(x.dtype, np.floating):
        if x.size and not np.isfinite(x).all():
            raise ValueError("Images contain NaN or Inf.")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(
                f"Float images must lie in [0, 1] (pytorch-fid's range), got "
                f"[{x.min():.4g}, {x.max():.4g}]; pass uint8 for [0, 255] data, or (x + 1) / 2 "
                "for [-1, 1] data."
            )
        x = x.astype(np.float32, copy=False)
    else:
        raise ValueError(f"Images must be uint8 or float, got dtype {x.dtype}.")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def _rebatch(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Regroups incoming arrays into batches of `batch_size` (the last may be smaller).

    Arrays of another image size or dtype close the current group first, so a folder
    of mixed sizes works (each size compiles its own resize).
    """
    buf: list[np.ndarray] = []
    buffered = 0
    key = None
    for batch in batches:
        x = to_model_input(batch)
        if len(x) == 0:
            continue
        k = (x.shape[1:], x.dtype)
        if buf and k != key:
            yield np.concatenate(buf)
            buf, buffered = [], 0
        key = k
        buf.append(x)
        buffered += len(x)
        while buffered >= batch_size:
            joined = np.concatenate(buf)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            buf, buffered = ([rest] if len(rest) else []), len(rest)
    if buf:
        yield np.concatenate(buf)


def _as_batches(images: ImagesLike) -> Iterable[np.ndarray]:
    if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
        return [np.asarray(images)]
    return images


# ----------------------------------------------------------------------------- extractor


@functools.cache
def _compiled(with_logits: bool, devices: tuple[Any, ...]):
    """Jitted (prepare, network) for a device set, shared by every extractor on it.

    Two functions, so that only the cheap resize recompiles for a new image size while
    the network compiles once per batch size.
    """
    mesh = Mesh(np.asarray(devices), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def prepare(x):
        if x.dtype == jnp.uint8:
            # pytorch-fid: ToTensor gives uint8 / 255 in float32.
            x = x.astype(jnp.float32) / 255.0
        return inception.resize_bilinear(x, (inception.INPUT_SIZE, inception.INPUT_SIZE))

    model = inception.InceptionV3(with_logits=with_logits, resize_input=False)
    prepare_fn = jax.jit(prepare, in_shardings=batch, out_shardings=batch)
    network_fn = jax.jit(model.apply, in_shardings=(replicated, batch), out_shardings=batch)
    return prepare_fn, network_fn, batch, replicated


class FeatureExtractor:
    """Runs the FID InceptionV3 on numpy batches, data parallel over devices.

    Args:
      variables: from `inception.load_params` (or `inception.random_variables`).
      batch_size: images per device call; rounded up to a multiple of the device
        count. Every call is padded to this size, so the network compiles once.
      with_logits: also return the 1008-way `logits` / `logits_unbiased` (needs the
        `fc` weights; used for the Inception Score).
      devices: devices to split batches over (default: `jax.local_devices()`).
    """

    def __init__(
        self,
        variables: Mapping[str, Any],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        with_logits: bool = False,
        devices: Sequence[Any] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if with_logits and not inception.has_logits(variables):
            raise ValueError(
                "with_logits=True needs the Inception 'fc' weights, which these variables "
                "lack; convert the full pytorch-fid .pth (it includes fc.weight/fc.bias)."
            )
        self.devices = tuple(jax.local_devices() if devices is None else devices)
        n = len(self.devices)
        self.batch_size = -(-batch_size // n) * n
        self.with_logits = with_logits
        self._prepare, self._network, self._batch_sharding, replicated = _compiled(
            with_logits, self.devices
        )
        keep = variables
        if not with_logits and inception.has_logits(variables):
            keep = dict(
                variables, params={k: v for k, v in variables["params"].items() if k != "fc"}
            )
        self._variables = jax.device_put(keep, replicated)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Features of at most `batch_size` images.

        Args:
          images: [B, H, W, C], B <= batch_size (see `to_model_input` for dtypes).

        Returns:
          {'pool3': float32 [B, 2048]} (+ 'logits', 'logits_unbiased' [B, 1008]).
        """
        return self._fetch(*self._dispatch(images))

    def iterate(self, images: ImagesLike) -> Iterator[dict[str, np.ndarray]]:
        """Features of every image, one batch at a time.

        The next batch is dispatched before the previous one is fetched, so reading
        and decoding images overlaps with the device computation.

        Args:
          images: an array [N, H, W, C] or an iterable of such arrays (any sizes).
        """
        pending = None
        for batch in _rebatch(_as_batches(images), self.batch_size):
            current = self._dispatch(batch)
            if pending is not None:
                yield self._fetch(*pending)
            pending = current
        if pending is not None:
            yield self._fetch(*pending)

    def _dispatch(self, images: np.ndarray) -> tuple[dict[str, jax.Array], int]:
        x = to_model_input(images)
        b = x.shape[0]
        if b > self.batch_size:
            raise ValueError(f"Got {b} images for a batch of {self.batch_size}; use iterate().")
        if b < self.batch_size:  # Pad to the compiled size; the padding rows are dropped.
            pad = np.zeros((self.batch_size - b, *x.shape[1:]), x.dtype)
            x = np.concatenate([x, pad])
        x = jax.device_put(x, self._batch_sharding)
        return self._network(self._variables, self._prepare(x)), b

    @staticmethod
    def _fetch(out: dict[str, jax.Array], b: int) -> dict[str, np.ndarray]:
        return {k: np.asarray(v)[:b] for k, v in out.items()}


# ----------------------------------------------------------------------------- library API


def compute_statistics(
    images: ImagesLike,
    variables: Mapping[str, Any],
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    devices: Sequence[Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of images, exactly as pytorch-fid defines them.

    Args:
      images: uint8 [N, H, W, C] / float [0, 1], or an iterable of such batches
        (streamed; never all held).
      variables: FID Inception variables (`inception.load_params`).
      batch_size: images per device call.
      devices: devices to shard over (default: local devices).
      progress: called with the number of images in each finished batch.

    Returns:
      (mu float64 [2048], sigma float64 [2048, 2048]): `np.mean(f, 0)` and
      `np.cov(f, rowvar=False)` of the pool3 features f.
    """
    extractor = FeatureExtractor(variables, batch_size=batch_size, devices=devices)
    stats = RunningStats(inception.FEATURE_DIM)
    for out in extractor.iterate(images):
        stats.update(out["pool3"])
        if progress is not None:
            progress(len(out["pool3"]))
    return stats.mu, stats.sigma


def extract_features(
    images: ImagesLike,
    variables: Mapping[str, Any],
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    with_logits: bool = False,
    devices: Sequence[Any] | None = None,
) -> dict[str, np.ndarray]:
    """All pool3 features (and logits) of the images, concatenated.

    For metrics that need the features themselves (precision/recall, Inception Score);
    holds N x 2048 floats, so use `compute_statistics` for FID on large sets.

    Returns:
      {'pool3': float32 [N, 2048]} (+ 'logits', 'logits_unbiased' [N, 1008]).
    """
    extractor = FeatureExtractor(
        variables, batch_size=batch_size, with_logits=with_logits, devices=devices
    )
    parts: dict[str, list[np.ndarray]] = {}
    for out in extractor.iterate(images):
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise ValueError("No images were given.")
    return {k: np.concatenate(v) for k, v in parts.items()}


def compute_fid(
    images: ImagesLike,
    variables: Mapping[str, Any],
    reference: str | os.PathLike | tuple[np.ndarray, np.ndarray],
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    devices: Sequence[Any] | None = None,
    method: str = "sqrtm",
) -> float:
    """FID between images and reference statistics (a stats .npz path or (mu, sigma)).

    `method` is `frechet_distance`'s: 'sqrtm' (pytorch-fid's algorithm, tens of seconds
    at D=2048 on a small CPU) or 'eigh' (same value to rounding, several times faster).
    """
    if isinstance(reference, (str, os.PathLike)):
        ref_mu, ref_sigma = load_statistics(reference)
    else:
        ref_mu, ref_sigma = reference
    mu, sigma = compute_statistics(images, variables, batch_size, devices=devices)
    return frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method)


def fid_from_images(
    images: ImagesLike,
    reference_stats: str | os.PathLike,
    inception_weights: str | os.PathLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
    method: str = "sqrtm",
    *,
    devices: Sequence[Any] | None = None,
) -> float:
    """FID of images against a statistics .npz, loading the Inception safetensors.

    Args:
      images: uint8 [N, H, W, C] (or float [0, 1]), or an iterable of batches.
      reference_stats: .npz with `mu`, `sigma` (fid_stats.py or pytorch-fid output).
      inception_weights: safetensors from launch/convert_inception.py.
      batch_size: images per device call.
      method: `frechet_distance`'s method ('sqrtm' as pytorch-fid, or the faster 'eigh').
      devices: devices to shard over (default: local devices).
    """
    ref = load_statistics(reference_stats)  # Fail on a bad path before any compute.
    variables = inception.load_params(inception_weights)
    return compute_fid(images, variables, ref, batch_size, devices=devices, method=method)


# ----------------------------------------------------------------------------- image sources


def load_npz_images(path: str | os.PathLike, key: str = "images") -> np.ndarray:
    """Reads `images` uint8 [N, H, W, C] from an .npz (launch/sample.py's output format)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file {path!r} not found.")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path!r} is not a readable .npz file: {e}") from e
    if not hasattr(data, "files"):
        raise ValueError(f"{path!r} is a single .npy array; save images with np.savez(images=...).")
    with data:
        if key not in data.files:
            raise ValueError(f"{path!r} has no {key!r} array (found {data.files}).")
        images = data[key]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{path!r}: {key!r} must be uint8 [N, H, W, C] with C in (1, 3), got "
            f"{images.dtype} {images.shape}."
        )
    return images


def list_image_files(directory: str | os.PathLike) -> list[str]:
    """Sorted image files (pytorch-fid's extensions) directly inside `directory`."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Image directory {directory!r} not found.")
    files = sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f))
    )
    if not files:
        raise ValueError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found directly in {directory!r}."
        )
    return files


def read_image(path: str) -> np.ndarray:
    """One image file as uint8 [H, W, 3] (Pillow, converted to RGB like pytorch-fid)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"Cannot read image {path!r}: {e}. Remove or replace the file.") from e


def iterate_image_files(files: Sequence[str]) -> Iterator[np.ndarray]:
    """Yields each file as a [1, H, W, 3] uint8 batch (regrouped by the extractor)."""
    for f in files:
        yield read_image(f)[None]


def source_to_uint8(image: np.ndarray) -> np.ndarray:
    """A data-source image (float [-1, 1], diffjax's record convention) -> uint8.

    Rounds like saving to PNG would, so reference statistics of a source match those
    of the same images written to disk, and of generated samples saved as uint8.
    """
    return np.clip(np.round((np.asarray(image, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def iterate_source_images(
    source: Any, batch_size: int = DEFAULT_BATCH_SIZE, num_examples: int | None = None
) -> Iterator[np.ndarray]:
    """Batches of uint8 images from a random-access source (records with `image`).

    Args:
      source: anything with `__len__` and `__getitem__` returning dicts whose `image`
        is float [H, W, C] in [-1, 1] (`diffjax.data.make_source(...)`, a grain
        MapDataset, ...).
      batch_size: images per yielded batch.
      num_examples: read only the first this many records (default: all).

    Yields:
      uint8 [b, H, W, C].
    """
    n = len(source) if num_examples is None else min(int(num_examples), len(source))
    for start in range(0, n, batch_size):
        recs = [source[i] for i in range(start, min(start + batch_size, n))]
        try:
            imgs = np.stack([np.asarray(r["image"]) for r in recs])
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"Source records must be dicts with an 'image' array: {e}") from e
        if np.issubdtype(imgs.dtype, np.floating):
            if imgs.min() < -1.0 - 1e-3 or imgs.max() > 1.0 + 1e-3:
                raise ValueError(
                    f"Source images must be float in [-1, 1], got [{imgs.min():.4g}, "
                    f"{imgs.max():.4g}]."
                )
            imgs = source_to_uint8(imgs)
        yield imgs


def compute_source_statistics(
    source: Any,
    variables: Mapping[str, Any],
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    num_examples: int | None = None,
    devices: Sequence[Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FID reference statistics of a data source (see `iterate_source_images`)."""
    return compute_statistics(
        iterate_source_images(source, batch_size, num_examples),
        variables,
        batch_size,
        devices=devices,
        progress=progress,
    )
