"""Improved precision and recall (Kynkäänniemi et al. 2019) in a feature space.

Each set's manifold is the union of balls around its points, each ball reaching the
point's k-th nearest neighbour within the same set (k=3 in the paper). Precision is the
fraction of generated points inside the real manifold; recall is the fraction of real
points inside the generated manifold. Distances are computed in row blocks on the
default JAX device (squared Euclidean, float32), so N x N matrices are never held.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_smallest_sq(rows: jax.Array, cols: jax.Array, k: int) -> jax.Array:
    # k-th smallest squared distance counting the point itself (index 0 = self).
    d = _sq_distances(rows, cols)
    return -jax.lax.top_k(-d, k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(rows: jax.Array, centers: jax.Array, radii_sq: jax.Array) -> jax.Array:
    return jnp.any(_sq_distances(rows, centers) <= radii_sq[None, :], axis=1)


def _sq_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    a2 = jnp.sum(a * a, axis=1)[:, None]
    b2 = jnp.sum(b * b, axis=1)[None, :]
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(a2 - 2.0 * ab + b2, 0.0)


def _blocks(x: np.ndarray, block: int):
    # Pad every block to the same size so each jitted function compiles once.
    for start in range(0, len(x), block):
        part = x[start : start + block]
        n = len(part)
        if n < block:
            part = np.concatenate([part, np.zeros((block - n, x.shape[1]), x.dtype)])
        yield part, n


def knn_radii(features: np.ndarray, k: int = 3, block_size: int = 1024) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in the same set.

    Args:
      features: [N, D], N > k.
      k: neighbourhood size.
      block_size: rows per device call.

    Returns:
      float32 [N] squared radii.
    """
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) <= k:
        raise ValueError(f"Need features [N, D] with N > k={k}, got {x.shape}.")
    cols = jnp.asarray(x)
    out = [
        np.asarray(_kth_smallest_sq(jnp.asarray(b), cols, k))[:n] for b, n in _blocks(x, block_size)
    ]
    return np.concatenate(out)


def manifold_coverage(
    queries: np.ndarray, centers: np.ndarray, radii_sq: np.ndarray, block_size: int = 1024
) -> float:
    """Fraction of `queries` inside at least one ball (centers[i], sqrt(radii_sq[i]))."""
    q = np.asarray(queries, np.float32)
    c = jnp.asarray(np.asarray(centers, np.float32))
    r = jnp.asarray(np.asarray(radii_sq, np.float32))
    hits = 0
    for b, n in _blocks(q, block_size):
        hits += int(np.asarray(_inside_any_ball(jnp.asarray(b), c, r))[:n].sum())
    return hits / len(q)


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, block_size: int = 1024
) -> dict[str, float]:
    """Improved precision and recall of generated features against real ones.

    Args:
      real_features: [N, D] (e.g. Inception pool3 of real images).
      fake_features: [M, D] in the same feature space.
      k: neighbourhood size (3 in the paper).
      block_size: rows per device call (memory ~ block_size x max(N, M) floats).

    Returns:
      {'precision': float, 'recall': float}, both in [0, 1].
    """
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"Features must be [N, D] and [M, D], got {real.shape} and {fake.shape}.")
    real_radii = knn_radii(real, k, block_size)
    fake_radii = knn_radii(fake, k, block_size)
    return {
        "precision": manifold_coverage(fake, real, real_radii, block_size),
        "recall": manifold_coverage(real, fake, fake_radii, block_size),
    }
