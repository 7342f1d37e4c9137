"""Classifier-free guidance (Ho & Salimans 2022) as a `model_fn(x, t)` wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.diffusion import parametrizations
from diffjax.diffusion.schedules import Schedule

Array = jax.Array


def _per_example_std(x: Array) -> Array:
    axes = tuple(range(1, x.ndim))
    return jnp.std(x, axis=axes, keepdims=True)


def classifier_free(
    cond_model_fn: Callable[[Array, Array, Any], Array],
    cond: Any,
    null_cond: Any,
    scale: float | Array,
    *,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
    schedule: Schedule | None = None,
    prediction: str = "epsilon",
) -> Callable[[Array, Array], Array]:
    """Wraps a conditional network into a guided `model_fn(x, t)`.

    Each call makes ONE call `cond_model_fn(concat[x, x], concat[t, t],
    concat[cond, null_cond])` on a doubled batch and returns
    `u + scale * (c - u)` from its conditional (`c`) and unconditional (`u`) halves.

    Args:
      cond_model_fn: `(x [2B, ...], t [2B], cond) -> prediction [2B, ...]`.
      cond: pytree of batched arrays with leading dim B (labels [B] int, or a dict
        with `context` [B, L, D] and `context_mask` [B, L]).
      null_cond: same structure; leaves of shape [B, ...], [1, ...] or without the
        batch dim are broadcast to the matching `cond` leaf.
      scale: guidance weight w (1 = the conditional model exactly; 0 = unconditional).
      rescale: guidance rescale phi in [0, 1] (Lin et al. 2023, Sec. 3.4): blend the
        guided output with its copy rescaled to the conditional output's per-example
        standard deviation. With `schedule` given, the rescale is done on the x0
        predictions (the image statistics that over-expose) and converted back;
        without it, on the raw predictions (as diffusers does).
      interval: `(t_lo, t_hi)` in the schedule's time: guide only where
        `t_lo <= t <= t_hi`, elsewhere return the conditional output (Kynkäänniemi
        et al. 2024).
      schedule: needed for x0-space rescale.
      prediction: what the network predicts (for x0-space rescale).

    Returns:
      `model_fn(x [B, ...], t [B]) -> guided prediction [B, ...]` (float32).
    """
    parametrizations.check_prediction(prediction)
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must lie in [0, 1], got {rescale}")
    if interval is not None and not interval[0] <= interval[1]:
        raise ValueError(f"interval must be (t_lo, t_hi) with t_lo <= t_hi, got {interval}")
    static_one = isinstance(scale, (int, float)) and float(scale) == 1.0

    if static_one and rescale == 0.0:
        # Guidance 1 is the conditional model; skip the unconditional half entirely.
        def cond_only(x: Array, t: Array) -> Array:
            return cond_model_fn(x, t, cond).astype(jnp.float32)

        return cond_only

    def doubled(c: Array, n: Array) -> Array:
        c, n = jnp.asarray(c), jnp.asarray(n)
        if n.ndim < c.ndim:
            n = n.reshape((1,) * (c.ndim - n.ndim) + n.shape)
        return jnp.concatenate([c, jnp.broadcast_to(n, c.shape).astype(c.dtype)], axis=0)

    cond2 = jax.tree.map(doubled, cond, null_cond)

    def model_fn(x: Array, t: Array) -> Array:
        b = x.shape[0]
        out = cond_model_fn(
            jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), cond2
        ).astype(jnp.float32)
        c, u = out[:b], out[b:]
        w = jnp.asarray(scale, jnp.float32)
        guided = jnp.where(w == 1.0, c, u + w * (c - u))
        if rescale > 0.0:
            if schedule is not None:
                a, s = schedule.alpha_sigma(t)
                x0_c, _ = parametrizations.to_x0_eps(c, x, a, s, prediction)
                x0_g, _ = parametrizations.to_x0_eps(guided, x, a, s, prediction)
                ratio = _per_example_std(x0_c) / (_per_example_std(x0_g) + 1e-12)
                x0_r = rescale * (x0_g * ratio) + (1.0 - rescale) * x0_g
                eps_r = _eps_from_x0(x0_r, x, a, s)
                guided = parametrizations.from_x0_eps(x0_r, eps_r, a, s, prediction)
            else:
                ratio = _per_example_std(c) / (_per_example_std(guided) + 1e-12)
                guided = rescale * (guided * ratio) + (1.0 - rescale) * guided
        if interval is not None:
            inside = (t >= interval[0]) & (t <= interval[1])
            guided = jnp.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), guided, c)
        return guided

    return model_fn


def _eps_from_x0(x0: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """The eps consistent with `x = alpha x0 + sigma eps` (0 where sigma = 0)."""
    _, eps = parametrizations.to_x0_eps(x0, x, alpha, sigma, "x0")
    return eps
