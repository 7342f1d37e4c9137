"""Memorization: how close generated samples come to copying training images.

For every generated sample we find its nearest and second-nearest *distinct* training
images by l2 distance in a feature space, and call the sample a copy when

    d(sample, nearest) < threshold * d(sample, second nearest)        (default 1/3)

This is the nearest/second-nearest ratio test that Yoon et al. (2023, "Diffusion
probabilistic models generalize when they fail to memorize") and Gu et al. (2023, "On
memorization in diffusion models") use to count memorized samples, with their threshold
1/3. It is the n = 1 case of the normalized distance of Carlini et al. (2023,
"Extracting training data from diffusion models"), who divide the distance to the
nearest training image by (alpha times) the mean distance to the n nearest ones: a
sample counts as a copy when it is much closer to one training image than to the rest of
the training set around it. The ratio is scale-free (it needs no per-dataset distance
threshold and means the same in pixel and feature spaces) and adapts to local density:
in a dense region of the data a new sample has several training images about equally
close (ratio near 1), while a copy sits on one of them (ratio near 0; an exact copy
gives 0). Exact duplicates in the training set are counted once (a copy of a duplicated
image would otherwise have d2 = d1 = 0 and escape the test).

Feature spaces (`eval.memorization_features`):

  * `pixels`: the uint8 pixels / 255, flattened (as Carlini et al. and Gu et al. on
    CIFAR-10); images over 64x64 are 2x2-averaged down to at most 64x64 first;
  * `digits`: the hidden layer of the digits classifier (`diffjax.eval.digits`);
  * `inception`: the FID Inception's 2048-d pool features (`eval.inception_weights`);
  * `auto`: `inception` when weights are given, else `digits` for 8x8x1 digits runs
    with `eval.digits_metrics`, else `pixels`.

The search streams the training set: features are computed a chunk at a time and a
jitted step keeps each query's running top-k (`jax.lax.top_k` of -d^2 over the chunk,
merged with the best so far), the queries sharded over the local devices. The full
N x M distance matrix is never formed and training features are never all held (except
in a small in-process cache when they fit, for periodic evaluation during training).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax.images import make_grid, to_uint8

log = logging.getLogger(__name__)

FEATURES = ("auto", "pixels", "digits", "inception")
DEFAULT_THRESHOLD = 1.0 / 3.0
PERCENTILES = (1, 5, 50, 95)
# Neighbours kept per query: the nearest and the second nearest (the training images are
# deduplicated first, so a repeated one cannot be its own second neighbour).
_TOP_K = 2
# Training features kept in memory between evaluations when they take at most this.
_CACHE_BYTES = 256 << 20


# ----------------------------------------------------------------------------- the search


@functools.cache
def _search_fns(devices: tuple[Any, ...], k: int):
    """Jitted (init, step) of the streaming top-k search on a set of devices."""
    mesh = Mesh(np.asarray(devices), ("q",))
    rows = NamedSharding(mesh, PartitionSpec("q"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(best_d2, best_idx, q, q_sq, chunk, chunk_sq, valid, offset):
        dots = jnp.matmul(q, chunk.T, precision=jax.lax.Precision.HIGHEST)
        d2 = jnp.maximum(q_sq[:, None] + chunk_sq[None, :] - 2.0 * dots, 0.0)
        d2 = jnp.where(valid[None, :], d2, jnp.inf)
        kk = min(k, chunk.shape[0])
        neg, j = jax.lax.top_k(-d2, kk)
        # The expansion picks the candidates; their distances are recomputed from the
        # differences (an exact copy gets 0, not the expansion's rounding error).
        diff = q[:, None, :] - chunk[j]
        exact = jnp.sum(jnp.square(diff), axis=-1)
        exact = jnp.where(jnp.isfinite(-neg), exact, jnp.inf)
        all_d2 = jnp.concatenate([best_d2, exact], axis=1)
        all_idx = jnp.concatenate([best_idx, j.astype(jnp.int32) + offset], axis=1)
        neg, sel = jax.lax.top_k(-all_d2, k)
        return -neg, jnp.take_along_axis(all_idx, sel, axis=1)

    step_fn = jax.jit(
        step,
        in_shardings=(rows, rows, rows, rows, replicated, replicated, replicated, replicated),
        out_shardings=(rows, rows),
        donate_argnums=(0, 1),
    )
    return step_fn, rows, replicated


def _rechunk(chunks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cuts a stream of [m, D] arrays into [size, D] arrays (the last one shorter)."""
    pending: list[np.ndarray] = []
    have = 0
    for chunk in chunks:
        chunk = np.asarray(chunk)
        while len(chunk):
            take = min(size - have, len(chunk))
            pending.append(chunk[:take])
            have += take
            chunk = chunk[take:]
            if have == size:
                yield np.concatenate(pending)
                pending, have = [], 0
    if have:
        yield np.concatenate(pending)


def nearest_neighbours(
    queries: np.ndarray,
    references: np.ndarray | Iterable[np.ndarray],
    *,
    k: int = 2,
    chunk_size: int = 4096,
    devices: tuple[Any, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest references of every query by l2 distance, streamed in chunks.

    Args:
      queries: float [N, D].
      references: float [M, D], or an iterable of [m, D] arrays (any sizes: a stream of
        training features that is never held whole).
      k: neighbours per query; the references must number at least `k`.
      chunk_size: references per device step (every step has this shape, so the search
        compiles once; the last chunk is padded and its padding masked).
      devices: devices to shard the queries over (default: the local devices).

    Returns:
      (distances float64 [N, k] ascending, indices int64 [N, k] into the references in
      stream order).
    """
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or not len(queries):
        raise ValueError(f"queries must be a non-empty [N, D] array, got {queries.shape}.")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}.")
    if isinstance(references, np.ndarray):
        chunk_size = max(1, min(chunk_size, len(references)))
        references = [references]
    devices = tuple(jax.local_devices() if devices is None else devices)
    step, rows, replicated = _search_fns(devices, k)
    n, dim = queries.shape
    padded = -(-n // len(devices)) * len(devices)
    # Centre both sets on the queries' mean: |q|^2 + |r|^2 - 2 q.r then cancels less.
    centre = queries.mean(axis=0, dtype=np.float64).astype(np.float32)
    q = np.zeros((padded, dim), np.float32)
    q[:n] = queries - centre
    q_dev = jax.device_put(q, rows)
    q_sq = jax.device_put(np.sum(np.square(q, dtype=np.float64), axis=1).astype(np.float32), rows)
    best_d2 = jax.device_put(np.full((padded, k), np.inf, np.float32), rows)
    best_idx = jax.device_put(np.full((padded, k), -1, np.int32), rows)
    total = 0
    for chunk in _rechunk(references, chunk_size):
        if chunk.ndim != 2 or chunk.shape[1] != dim:
            raise ValueError(f"reference chunks must be [m, {dim}], got {chunk.shape}.")
        m = len(chunk)
        c = np.zeros((chunk_size, dim), np.float32)
        c[:m] = chunk - centre
        valid = np.arange(chunk_size) < m
        c_sq = np.sum(np.square(c, dtype=np.float64), axis=1).astype(np.float32)
        best_d2, best_idx = step(
            best_d2,
            best_idx,
            q_dev,
            q_sq,
            jax.device_put(c, replicated),
            jax.device_put(c_sq, replicated),
            jax.device_put(valid, replicated),
            jax.device_put(np.int32(total), replicated),
        )
        total += m
    if total < k:
        raise ValueError(f"nearest_neighbours needs at least k={k} references, got {total}.")
    d2 = np.asarray(best_d2, np.float64)[:n]
    return np.sqrt(np.maximum(d2, 0.0)), np.asarray(best_idx, np.int64)[:n]


def copy_ratio(distances: np.ndarray) -> np.ndarray:
    """d(nearest) / d(second nearest) per row of `distances` [N, >=2]; 0/0 counts as 0."""
    d1, d2 = distances[:, 0], distances[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 0.0)


def percentiles(values: np.ndarray) -> dict[str, float]:
    """{'p1', 'p5', 'p50', 'p95'} of `values`."""
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


# ----------------------------------------------------------------------------- features


def resolve_features(
    features: str, *, inception_weights: str, digits_metrics: bool, image_shape
) -> str:
    """The feature space `eval.memorization_features` names ('auto' resolved)."""
    if features not in FEATURES:
        raise ValueError(
            f"Unknown eval.memorization_features {features!r}; choose one of {FEATURES}."
        )
    digits_shape = tuple(image_shape) == (8, 8, 1)
    if features == "auto":
        # Digits runs: the digits classifier's features (Inception sees an 8x8 digit
        # upsampled to 299x299, at 100x the cost, and was not trained on such images).
        if digits_metrics and digits_shape:
            return "digits"
        return "inception" if inception_weights else "pixels"
    if features == "inception" and not inception_weights:
        raise ValueError(
            "eval.memorization_features='inception' needs eval.inception_weights (convert "
            "pytorch-fid's weights with launch/convert_inception.py), or use 'pixels'."
        )
    if features == "digits" and not digits_shape:
        raise ValueError(
            f"eval.memorization_features='digits' needs 8x8x1 digits, got images of shape "
            f"{tuple(image_shape)}; use 'pixels' or 'inception'."
        )
    return features


# Pixel features of larger images are 2x2-averaged down to at most this size (64x64x3 =
# 12,288 numbers a sample; a 256x256 one would be 196,608).
_MAX_PIXEL_SIZE = 64


def _pixel_features(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32) / np.float32(255.0)
    while max(x.shape[1:3]) > _MAX_PIXEL_SIZE and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return x.reshape(len(x), -1)


def featurizer(
    features: str, *, inception_weights: str = "", batch_size: int = 500
) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [B, H, W, C] -> float32 [B, D] features of a resolved feature space."""
    if features == "pixels":
        return _pixel_features
    if features == "digits":
        from diffjax.eval.digits import reference

        clf = reference()["classifier"]
        return lambda x: clf.features(x).astype(np.float32)
    if features == "inception":
        from diffjax.eval import inception
        from diffjax.eval.fid import FeatureExtractor

        extractor = FeatureExtractor(
            inception.load_params(inception_weights), batch_size=batch_size
        )

        def inception_features(x: np.ndarray) -> np.ndarray:
            return np.concatenate([o["pool3"] for o in extractor.iterate(x)])

        return inception_features
    raise ValueError(f"Unknown feature space {features!r}; choose one of {FEATURES[1:]}.")


# ----------------------------------------------------------------------------- training set


def source_labels(source: Any) -> np.ndarray | None:
    """The int labels of every record of `source` when it holds them as an array (an
    `ArraySource`, a class folder, `data.num_examples`' cut); None otherwise (reading
    them would mean reading every record)."""
    labels = getattr(source, "labels", None)
    if labels is None or callable(labels):
        return None
    labels = np.asarray(labels)
    return labels if labels.shape == (len(source),) else None


def training_batches(
    source: Any, *, batch_size: int = 1024, num_examples: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(uint8 images [b, H, W, C], source indices [b], labels [b] or None) in order.

    An in-memory source (`images` holding exactly its records) is sliced; any other is
    read record by record.
    """
    n = len(source) if num_examples <= 0 else min(int(num_examples), len(source))
    images = getattr(source, "images", None)
    in_memory = isinstance(images, np.ndarray) and len(images) == len(source)
    labels = source_labels(source)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        idx = np.arange(start, stop)
        if in_memory:
            batch = to_uint8(images[start:stop])
            lab = None if labels is None else labels[start:stop]
        else:
            recs = [source[int(i)] for i in idx]
            batch = to_uint8(np.stack([np.asarray(r["image"]) for r in recs]))
            have = all("labels" in r for r in recs)
            lab = np.asarray([int(r["labels"]) for r in recs]) if have else None
        yield batch, idx, lab


class _TrainingFeatures:
    """One pass over the training set: deduplicated features, their source indices and
    every record's label (None when a record has none)."""

    def __init__(self, source, featurize, *, num_examples: int, batch_size: int):
        self._source, self._featurize = source, featurize
        self._num_examples, self._batch_size = num_examples, batch_size
        self.indices: list[np.ndarray] = []
        self.labels: list[np.ndarray] | None = []
        self.num_records = 0
        self._seen: set[bytes] = set()

    def __iter__(self) -> Iterator[np.ndarray]:
        for images, idx, labels in training_batches(
            self._source, batch_size=self._batch_size, num_examples=self._num_examples
        ):
            self.num_records += len(idx)
            if labels is None or self.labels is None:
                self.labels = None
            else:
                self.labels.append(labels)
            keep = []
            for j, image in enumerate(images):
                digest = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
                if digest not in self._seen:
                    self._seen.add(digest)
                    keep.append(j)
            if keep:
                self.indices.append(idx[keep])
                yield self._featurize(images[keep])


_cache: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray | None, int]] = {}


def _training_features(source, features_key, featurize, num_examples, batch_size):
    """(features [M, D] or a stream of them, a callable giving (indices, labels,
    num_records) once the features were consumed)."""
    key = (repr(source), len(source), features_key, num_examples)
    if key in _cache:
        feats, indices, labels, count = _cache[key]
        return feats, lambda: (indices, labels, count)
    scan = _TrainingFeatures(source, featurize, num_examples=num_examples, batch_size=batch_size)
    n = len(source) if num_examples <= 0 else min(num_examples, len(source))
    held: list[np.ndarray] = []
    fits = [True]

    def stream():
        for f in scan:
            if fits[0] and sum(h.nbytes for h in held) + f.nbytes <= _CACHE_BYTES:
                held.append(f)
            else:
                fits[0] = False
                held.clear()
            yield f

    def done():
        indices = np.concatenate(scan.indices) if scan.indices else np.zeros(0, np.int64)
        labels = None if not scan.labels else np.concatenate(scan.labels)
        if fits[0] and held:
            _cache.clear()
            _cache[key] = (np.concatenate(held), indices, labels, scan.num_records)
        return indices, labels, scan.num_records

    log.info("Memorization: computing features of %d training records...", n)
    return stream(), done


# ----------------------------------------------------------------------------- the metric


def check_threshold(threshold: float) -> None:
    """`eval.copy_threshold` is a ratio of distances in (0, 1]."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"eval.copy_threshold must lie in (0, 1] (a ratio d(nearest) / d(second "
            f"nearest); 1/3 is the published criterion), got {threshold}."
        )


def memorization_metrics(
    images_uint8: np.ndarray,
    source: Any,
    *,
    features: str,
    threshold: float = DEFAULT_THRESHOLD,
    inception_weights: str = "",
    num_examples: int = 0,
    batch_size: int = 500,
    num_pairs: int = 16,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """Nearest training images of generated samples and the copy fraction.

    Args:
      images_uint8: generated uint8 [N, H, W, C].
      source: the training data source (records with `image` float in [-1, 1]).
      features: a resolved feature space ('pixels', 'digits', 'inception').
      threshold: a sample is a copy when d(nearest) < threshold * d(second nearest).
      inception_weights: for 'inception'.
      num_examples: search only the first this many training records (0 = all).
      batch_size: training records read and featurized at a time.
      num_pairs: sample/neighbour pairs in the returned grid (the closest ones).

    Returns:
      (metrics, a uint8 grid image of the closest pairs (each sample left of its nearest
      training image, four pairs a row), the labels of the training records searched
      or None when the records have none).
    """
    images_uint8 = np.asarray(images_uint8)
    check_threshold(threshold)
    shape = tuple(source[0]["image"].shape)
    if shape != images_uint8.shape[1:]:
        raise ValueError(
            f"The training images have shape {shape} but the samples {images_uint8.shape[1:]}; "
            "the memorization check compares pixels of the same shape."
        )
    start = time.perf_counter()
    featurize = featurizer(features, inception_weights=inception_weights, batch_size=batch_size)
    queries = featurize(images_uint8)
    key = (features, inception_weights)
    references, done = _training_features(source, key, featurize, num_examples, batch_size)
    # About 64 MiB of training features a device step (4096 rows of 2048 Inception ones).
    chunk = int(np.clip((64 << 20) // (4 * queries.shape[1]), 256, 8192))
    dist, idx = nearest_neighbours(queries, references, k=_TOP_K, chunk_size=chunk)
    train_indices, train_labels, num_records = done()
    nearest = train_indices[idx[:, 0]]
    ratio = copy_ratio(dist)
    copies = ratio < threshold
    metrics = {
        "copy_fraction": float(np.mean(copies)),
        "num_copies": int(np.sum(copies)),
        "num_samples": int(len(images_uint8)),
        "threshold": float(threshold),
        "rule": "d(nearest) < threshold * d(second nearest), l2, distinct training images",
        "features": features,
        "num_train": int(len(train_indices)),
        "num_train_records": int(num_records),
        "nn_distance": percentiles(dist[:, 0]),
        "nn_ratio": percentiles(ratio),
        "seconds": time.perf_counter() - start,
    }
    order = np.argsort(dist[:, 0], kind="stable")[:num_pairs]
    tiles = []
    for i in order:
        tiles.append(images_uint8[i])
        tiles.append(to_uint8(source[int(nearest[i])]["image"]))
    grid = make_grid(np.stack(tiles), ncols=8)
    return metrics, grid, train_labels
