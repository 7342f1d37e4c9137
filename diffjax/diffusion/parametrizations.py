"""Conversions among the quantities a diffusion network can predict.

With `x_t = alpha * x0 + sigma * eps` for any `(alpha, sigma)` (VP, VE or flow):

* `epsilon`: `eps`.
* `x0`: `x0`.
* `v`: `v = alpha * eps - sigma * x0` (Salimans & Ho 2022; general `alpha, sigma`).
  Then `x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)` and
  `eps = (sigma x + alpha v) / (alpha^2 + sigma^2)`; the denominator is 1 for VP.
* `flow`: rectified-flow velocity `u = eps - x0` (`= dx_t/dt` for the flow schedule).
  Then `x0 = (x - sigma u) / (alpha + sigma)` and `eps = (x + alpha u) / (alpha + sigma)`.

`v` and `flow` convert safely everywhere (`alpha^2 + sigma^2 > 0`, `alpha + sigma > 0`).
`epsilon -> x0` divides by `alpha` and `x0 -> eps` by `sigma`: where that coefficient is
exactly 0 the quantity is not identifiable from the prediction, and the conversion returns
0 there (never inf/NaN). Samplers never evaluate a model at such a point with such a
prediction (see `samplers`). All arithmetic runs in at least float32, whatever the dtype
of the prediction.

`alpha` and `sigma` may be scalars, arrays of the full shape, or batch vectors `[B]` that
are broadcast over the trailing dimensions of `x`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

PREDICTIONS = ("epsilon", "x0", "v", "flow")


def check_prediction(prediction: str) -> None:
    """Raises a ValueError naming the options if `prediction` is unknown."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def _f32(a: Array) -> Array:
    a = jnp.asarray(a)
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _like(c: Array, x: Array) -> Array:
    """Reshapes a batch vector [B] (or scalar) to broadcast against x [B, ...]."""
    c = _f32(c)
    if c.ndim == 0 or c.ndim == x.ndim:
        return c
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def _safe_div(num: Array, den: Array) -> Array:
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def to_x0_eps(
    pred: Array, x: Array, alpha: Array, sigma: Array, prediction: str
) -> tuple[Array, Array]:
    """Converts a prediction to the pair (x0, eps).

    Args:
      pred: network output [B, ...] (any float dtype).
      x: noisy input x_t [B, ...].
      alpha, sigma: scalars, [B] or [B, ...].
      prediction: `epsilon` | `x0` | `v` | `flow`.

    Returns:
      (x0 [B, ...], eps [B, ...]) in float32 (or wider).
    """
    check_prediction(prediction)
    pred, x = _f32(pred), _f32(x)
    a, s = _like(alpha, x), _like(sigma, x)
    if prediction == "epsilon":
        return _safe_div(x - s * pred, a), pred
    if prediction == "x0":
        return pred, _safe_div(x - a * pred, s)
    if prediction == "v":
        n = a * a + s * s
        return (a * x - s * pred) / n, (s * x + a * pred) / n
    n = a + s
    return (x - s * pred) / n, (x + a * pred) / n


def from_x0_eps(x0: Array, eps: Array, alpha: Array, sigma: Array, prediction: str) -> Array:
    """The `prediction`-type quantity of a (x0, eps) pair (e.g. a regression target).

    Args:
      x0, eps: [B, ...].
      alpha, sigma: scalars, [B] or [B, ...].
      prediction: `epsilon` | `x0` | `v` | `flow`.

    Returns:
      [B, ...] float32 (or wider).
    """
    check_prediction(prediction)
    x0, eps = _f32(x0), _f32(eps)
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return _like(alpha, x0) * eps - _like(sigma, x0) * x0
    return eps - x0


def convert(pred: Array, x: Array, alpha: Array, sigma: Array, src: str, dst: str) -> Array:
    """Converts a `src`-type prediction at `(x, alpha, sigma)` into a `dst`-type one."""
    check_prediction(dst)
    if src == dst:
        check_prediction(src)
        return _f32(pred)
    x0, eps = to_x0_eps(pred, x, alpha, sigma, src)
    return from_x0_eps(x0, eps, alpha, sigma, dst)
