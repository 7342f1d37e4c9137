"""`make_sample_fn`: a Flax model, its conditioning, guidance and a sampler as one jitted fn.

The samplers themselves (pure math on a `model_fn(x, t)`) live in
`diffjax.diffusion.samplers`; drawing batches of images from a run or an export is
`diffjax.generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import parallel
from diffjax.diffusion import guidance as guidance_lib
from diffjax.diffusion import samplers


def null_condition(
    cond: dict[str, jax.Array], num_classes: int, *, guess_mode: bool = False
) -> dict[str, jax.Array]:
    """The unconditional counterpart of `cond` (model keyword arguments): the null class,
    an all-False caption mask; a ControlNet's control stays (diffusers), except in guess
    mode, where the unconditional branch runs without it (`control_scale` 0)."""
    null = dict(cond)
    if guess_mode and "control_scale" in null:
        null["control_scale"] = jnp.zeros_like(null["control_scale"])
    if "labels" in null:
        null["labels"] = jnp.full_like(null["labels"], num_classes)
    if "context_mask" in null:
        null["context_mask"] = jnp.zeros_like(null["context_mask"])
    return null


def make_sample_fn(
    apply_fn: Callable,
    schedule: Any,
    *,
    method: str,
    num_steps: int,
    prediction: str = "epsilon",
    guidance: float = 1.0,
    guidance_rescale: float = 0.0,
    num_classes: int = 0,
    control_window: tuple[float, float] | None = None,
    guess_mode: bool = False,
    jit: bool = True,
    **sampler_kwargs: Any,
) -> Callable[..., jax.Array]:
    """Builds `sample_fn(params, noise, cond, key, null_cond=None) -> images`, jitted once per shape.

    Args:
      apply_fn: the Flax module's `apply`.
      schedule: a `diffjax.diffusion.schedules` schedule.
      method, num_steps, prediction: the sampler (see `diffjax.diffusion.samplers`).
      guidance: classifier-free guidance scale; a Python 1.0 uses the conditional model
        alone (one network call per evaluation), an array is always applied.
      guidance_rescale: guidance rescale factor.
      num_classes: value of the null label.
      control_window: `(t_lo, t_hi)` in the schedule's time (`samplers.step_window`):
        a ControlNet's `control_scale` (in `cond`) applies only to evaluations at
        `t_lo <= t <= t_hi`, zero elsewhere (diffusers' control_guidance_start/end).
      guess_mode: a ControlNet's guess mode: the derived null condition has
        `control_scale` 0 (a given `null_cond` that carries `control_scale` keeps its own).
      jit: return the function jitted (False for embedding in a larger traced fn).
      **sampler_kwargs: passed to `samplers.sample` (eta, clip_x0, ...).

    `cond` holds the model's conditioning keywords (`labels`, or `context` and
    `context_mask`), batched like `noise`; `{}` for unconditional models. `null_cond`
    is guidance's unconditional branch; None derives it from `cond` (the null class, an
    all-False caption mask), a pretrained text model passes the encoding of its negative
    prompt (keys it lacks, e.g. a ControlNet's `control`, are derived from `cond`). Images come
    back in model space ([-1, 1] for pixels), float32.
    """

    def sample_fn(params, noise, cond, key, null_cond=None):
        channels = noise.shape[-1]

        def net_fn(x, t, c):
            out = apply_fn({"params": params}, x, t, **c)
            # A learned-variance model also outputs its sigma channels; sampling uses
            # the mean prediction only.
            return out[..., :channels].astype(jnp.float32)

        cond_model_fn = schedule.precondition(net_fn)
        if control_window is not None:
            cond_model_fn = _windowed(cond_model_fn, control_window)

        if cond and not (isinstance(guidance, (int, float)) and guidance == 1.0):
            null = null_condition(cond, num_classes, guess_mode=guess_mode)
            if null_cond is not None:
                # A given null (a text stage's encoded "") wins; keys it lacks (a
                # ControlNet's control and scale) are derived from `cond`.
                null = {**null, **null_cond}
            model_fn = guidance_lib.classifier_free(
                cond_model_fn,
                cond,
                null,
                guidance,
                rescale=guidance_rescale,
                schedule=schedule,
                prediction=prediction,
            )
        else:
            model_fn = lambda x, t: cond_model_fn(x, t, cond)  # noqa: E731
        return samplers.sample(
            model_fn,
            noise,
            schedule=schedule,
            method=method,
            num_steps=num_steps,
            prediction=prediction,
            key=key,
            **sampler_kwargs,
        )

    return (
        jax.jit(sample_fn, compiler_options=parallel.compiler_options(program="sample"))
        if jit
        else sample_fn
    )


def _windowed(cond_model_fn: Callable, window: tuple[float, float]) -> Callable:
    """`cond_model_fn` with `cond["control_scale"]` zeroed outside `window` (by t)."""
    lo, hi = window

    def fn(x, t, c):
        if "control_scale" in c:
            keep = ((t >= lo) & (t <= hi)).astype(jnp.float32)
            c = {**c, "control_scale": c["control_scale"] * keep[:, None]}
        return cond_model_fn(x, t, c)

    return fn


def cycle_labels(n: int, num_classes: int) -> jnp.ndarray:
    """Labels 0..K-1 repeated to length n (the sampling contract of launch/sample.py)."""
    return jnp.arange(n, dtype=jnp.int32) % max(num_classes, 1)


def check_noise(
    noise: np.ndarray | None, num_samples: int, shape: tuple[int, ...]
) -> np.ndarray | None:
    """Validates user-given initial noise: float [num_samples, *shape] (NHWC)."""
    if noise is None:
        return None
    noise = np.asarray(noise)
    want = (num_samples, *shape)
    if noise.shape != want:
        raise ValueError(
            f"--noise must hold float32 [N, h, w, c] = {list(want)} (NHWC; latent shape for "
            f"latent models, before any init_noise_sigma scaling), got {list(noise.shape)}."
        )
    if not np.issubdtype(noise.dtype, np.floating):
        raise ValueError(f"--noise must be floating point, got {noise.dtype}.")
    return noise.astype(np.float32)


def noise_batches(
    num_samples: int,
    batch_size: int,
    mesh: Any,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    noise: np.ndarray | None = None,
    progress: bool = False,
):
    """The batches of a sampling run: yields `(start, n, noise, key)` in order.

    Every batch has the same shape (one compilation; the tail is padded and its extra
    images are dropped by the caller, `n` being the real count); `batch_size` is rounded
    to a multiple of the mesh's device count. `noise` [batch, *shape] is drawn from
    `seed` and the batch index, so image i does not depend on the device count; a given
    `noise` [num_samples, *shape] (checked) replaces the draw. `key` is the sampler's.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    given = check_noise(noise, num_samples, shape)
    ndev = mesh.devices.size
    batch_size = max(ndev, batch_size - batch_size % ndev)
    key = jax.random.key(seed)
    starts = range(0, num_samples, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sample", unit="batch", dynamic_ncols=True)
    for b, start in enumerate(starts):
        n = min(batch_size, num_samples - start)
        k_noise, k_sample = jax.random.split(jax.random.fold_in(key, b))
        z = jax.random.normal(k_noise, (batch_size, *shape), jnp.float32)
        if given is not None:
            z = jnp.concatenate([jnp.asarray(given[start : start + n]), z[n:]])
        yield start, n, z, k_sample
