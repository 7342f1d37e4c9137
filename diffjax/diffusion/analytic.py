"""Data laws with closed-form denoisers, for testing and benchmarking samplers.

* `GaussianData(mean, cov)`: `E[x0 | x_t]`, `E[eps | x_t]` and the exact
  probability-flow map between any two noise levels are affine and closed form. In
  the eigenbasis of `cov` each coordinate evolves independently and the flow keeps
  its standardized value `(x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)` fixed.
* `MixtureData(weights, means, stds)`: isotropic Gaussian mixture; the denoiser is a
  responsibility-weighted sum of Gaussian denoisers (non-linear in `x_t`).

Both give `model_fn(schedule, prediction)` in the `samplers.sample` convention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import parametrizations
from diffjax.diffusion.schedules import Schedule

Array = jax.Array


def _col(c: Array, x: Array) -> Array:
    c = jnp.asarray(c, x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianData:
    """N(mean, cov) in D dimensions.

    Attributes:
      mean: [D].
      cov: [D, D] symmetric positive definite.
    """

    mean: np.ndarray
    cov: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, np.float64)
        cov = np.asarray(self.cov, np.float64)
        if cov.shape != (mean.size, mean.size) or not np.allclose(cov, cov.T):
            raise ValueError("cov must be a symmetric [D, D] matrix matching mean [D]")
        evals, evecs = np.linalg.eigh(cov)
        if evals.min() <= 0:
            raise ValueError("cov must be positive definite")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)
        object.__setattr__(self, "_evals", evals)
        object.__setattr__(self, "_evecs", evecs)

    @property
    def dim(self) -> int:
        return self.mean.size

    def _proj(self, x: Array, alpha: Array) -> Array:
        mu, u = jnp.asarray(self.mean, x.dtype), jnp.asarray(self._evecs, x.dtype)
        return (x - _col(alpha, x) * mu) @ u

    def x0_eps(self, x: Array, alpha: Array, sigma: Array) -> tuple[Array, Array]:
        """Exact (E[x0 | x_t], E[eps | x_t]) for x [B, D], alpha/sigma scalar or [B]."""
        a, s = _col(alpha, x), _col(sigma, x)
        lam = jnp.asarray(self._evals, x.dtype)
        u = jnp.asarray(self._evecs, x.dtype)
        y = self._proj(x, alpha)
        var = a * a * lam + s * s
        x0 = jnp.asarray(self.mean, x.dtype) + (a * lam / var * y) @ u.T
        eps = (s / var * y) @ u.T
        return x0, eps

    def flow(self, x: Array, src: tuple[float, float], dst: tuple[float, float]) -> Array:
        """Exact probability-flow map from noise level (alpha, sigma) `src` to `dst`."""
        lam = jnp.asarray(self._evals, x.dtype)
        u = jnp.asarray(self._evecs, x.dtype)
        (a0, s0), (a1, s1) = src, dst
        z = self._proj(x, a0) / jnp.sqrt(a0 * a0 * lam + s0 * s0)
        return a1 * jnp.asarray(self.mean, x.dtype) + (jnp.sqrt(a1 * a1 * lam + s1 * s1) * z) @ u.T

    def sample(self, key: Array, n: int, dtype: jnp.dtype = jnp.float32) -> Array:
        z = jax.random.normal(key, (n, self.dim), dtype)
        scale = jnp.asarray(np.sqrt(self._evals), dtype)
        return jnp.asarray(self.mean, dtype) + (z * scale) @ jnp.asarray(self._evecs, dtype).T

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean, self.cov

    def model_fn(self, schedule: Schedule, prediction: str) -> Callable[[Array, Array], Array]:
        return _model_fn(self.x0_eps, schedule, prediction)


@dataclasses.dataclass(frozen=True, eq=False)
class MixtureData:
    """Mixture of isotropic Gaussians sum_k w_k N(means[k], stds[k]^2 I).

    Attributes:
      weights: [K] positive, summing to 1.
      means: [K, D].
      stds: [K] positive.
    """

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, np.float64)
        mu = np.asarray(self.means, np.float64)
        sd = np.asarray(self.stds, np.float64)
        if mu.ndim != 2 or w.shape != (mu.shape[0],) or sd.shape != w.shape:
            raise ValueError("need weights [K], means [K, D], stds [K]")
        if np.any(w <= 0) or abs(w.sum() - 1) > 1e-9 or np.any(sd <= 0):
            raise ValueError("weights must be positive and sum to 1; stds positive")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", mu)
        object.__setattr__(self, "stds", sd)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def x0_eps(self, x: Array, alpha: Array, sigma: Array) -> tuple[Array, Array]:
        """Exact (E[x0 | x_t], E[eps | x_t]) for x [B, D], alpha/sigma scalar or [B]."""
        a, s = _col(alpha, x)[..., None], _col(sigma, x)[..., None]  # [B, 1, 1]
        mu = jnp.asarray(self.means, x.dtype)  # [K, D]
        v = a * a * jnp.asarray(self.stds**2, x.dtype)[:, None] + s * s  # [B, K, 1]
        diff = x[:, None, :] - a * mu  # [B, K, D]
        logp = (
            jnp.log(jnp.asarray(self.weights, x.dtype))
            - 0.5 * self.dim * jnp.log(v[..., 0])
            - 0.5 * jnp.sum(diff * diff, axis=-1) / v[..., 0]
        )
        r = jax.nn.softmax(logp, axis=-1)[..., None]  # [B, K, 1]
        x0_k = mu + a * jnp.asarray(self.stds**2, x.dtype)[:, None] / v * diff
        eps_k = s / v * diff
        return jnp.sum(r * x0_k, axis=1), jnp.sum(r * eps_k, axis=1)

    def sample(self, key: Array, n: int, dtype: jnp.dtype = jnp.float32) -> Array:
        kc, kz = jax.random.split(key)
        comp = jax.random.choice(kc, self.weights.size, (n,), p=jnp.asarray(self.weights))
        z = jax.random.normal(kz, (n, self.dim), dtype)
        mu = jnp.asarray(self.means, dtype)[comp]
        return mu + jnp.asarray(self.stds, dtype)[comp][:, None] * z

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.weights @ self.means
        second = sum(
            w * (s * s * np.eye(self.dim) + np.outer(m, m))
            for w, m, s in zip(self.weights, self.means, self.stds, strict=True)
        )
        return mean, second - np.outer(mean, mean)

    def model_fn(self, schedule: Schedule, prediction: str) -> Callable[[Array, Array], Array]:
        return _model_fn(self.x0_eps, schedule, prediction)


def _model_fn(
    x0_eps: Callable[[Array, Array, Array], tuple[Array, Array]],
    schedule: Schedule,
    prediction: str,
) -> Callable[[Array, Array], Array]:
    parametrizations.check_prediction(prediction)

    def model_fn(x: Array, t: Array) -> Array:
        a, s = schedule.alpha_sigma(t)
        a, s = a.astype(x.dtype), s.astype(x.dtype)
        x0, eps = x0_eps(x, a, s)
        return parametrizations.from_x0_eps(x0, eps, a, s, prediction).astype(x.dtype)

    return model_fn


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between two Gaussians, float64.

    `|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)`, with symmetric square
    roots from `eigh` (stable for nearly singular covariances).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)

    def sqrtm(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((c + c.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = sqrtm(c1)
    cross = np.trace(sqrtm(r1 @ c2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * cross)
