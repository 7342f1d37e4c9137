"""Streaming mean and covariance of features, and FID statistics files.

`RunningStats` gives the same `mu` and `sigma` as pytorch-fid's
`np.mean(act, axis=0)` and `np.cov(act, rowvar=False)` (ddof=1) without holding all
features: batches are merged with the pairwise update of Chan, Golub & LeVeque
(1979) in float64, which avoids the cancellation of the naive sum-of-squares form.
"""

from __future__ import annotations

import os

import numpy as np


class RunningStats:
    """Streaming float64 mean and (ddof=1) covariance of D-dimensional features.

    Example:
      stats = RunningStats(2048)
      for feats in batches:  # [B, 2048]
          stats.update(feats)
      mu, sigma = stats.mu, stats.sigma
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"RunningStats needs dim >= 1, got {dim}.")
        self.dim = int(dim)
        self.count = 0
        self._mean = np.zeros(dim, np.float64)
        # Sum of outer products of deviations from the running mean.
        self._m2 = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of features.

        Args:
          features: [B, D] (any float dtype; accumulated in float64). B may be 0.
        """
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Expected features of shape [B, {self.dim}], got {x.shape}.")
        if x.shape[0] == 0:
            return
        if not np.isfinite(x).all():
            raise ValueError(
                "Features contain NaN or Inf; check the images and the network weights."
            )
        mean_b = x.mean(axis=0)
        centered = x - mean_b
        self._combine(x.shape[0], mean_b, centered.T @ centered)

    def merge(self, other: RunningStats) -> None:
        """Adds the features another `RunningStats` has seen (e.g. another process's)."""
        if other.dim != self.dim:
            raise ValueError(f"Cannot merge RunningStats of dim {other.dim} into dim {self.dim}.")
        if other.count:
            self._combine(other.count, other._mean, other._m2)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        # Chan et al.'s pairwise update of (count, mean, M2).
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    @property
    def mu(self) -> np.ndarray:
        """float64 [D] mean of all features seen."""
        if self.count == 0:
            raise ValueError("RunningStats has seen no features yet.")
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        """float64 [D, D] unbiased (ddof=1) covariance, as `np.cov(x, rowvar=False)`."""
        if self.count < 2:
            raise ValueError(
                f"A covariance needs at least 2 samples, got {self.count}; use more images."
            )
        return self._m2 / (self.count - 1)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra) -> None:
    """Writes `mu` [D] and `sigma` [D, D] to an .npz (pytorch-fid's stats format).

    Args:
      path: output file; parent directories are created.
      mu, sigma: the statistics (stored as float64).
      **extra: additional small arrays to store (e.g. `num_images`).
    """
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    _check_shapes(mu, sigma, str(path))
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:  # A file object stops numpy from appending '.npz'.
        np.savez(f, mu=mu, sigma=sigma, **extra)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads `mu` and `sigma` from an .npz written by fid_stats.py or pytorch-fid.

    Returns:
      (mu float64 [D], sigma float64 [D, D]).

    Raises:
      FileNotFoundError / ValueError with the problem and the fix.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"FID statistics {path!r} not found; compute them with "
            "`python launch/fid_stats.py --images=... --inception_weights=... --out=...`."
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path!r} is not a readable .npz file: {e}") from e
    with data:
        if not hasattr(data, "files"):
            raise ValueError(f"{path!r} is a single .npy array, not an .npz with mu and sigma.")
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(
                f"{path!r} has no {missing} (found {data.files}); an FID statistics file "
                "holds 'mu' [D] and 'sigma' [D, D]."
            )
        mu = np.asarray(data["mu"], np.float64)
        sigma = np.asarray(data["sigma"], np.float64)
    _check_shapes(mu, sigma, path)
    return mu, sigma


def _check_shapes(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{where}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}."
        )
