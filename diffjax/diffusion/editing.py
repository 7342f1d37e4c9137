"""Editing at sampling time with any model: inpainting (blend, RePaint) and inversion.

* **Inpainting** (`inpaint`, or `samplers.sample(..., inpaint_known=, inpaint_mask=)`):
  no special training. Before every network evaluation the known region of the state is
  replaced by the original forward-noised to the state's own level, `alpha known +
  sigma z` (`z` fresh from the key at every evaluation, or fixed: `inpaint_noise`), and
  the sample is `where(mask, x0, known)`, so known pixels come back bit-exact. One code
  path for every method and schedule: the blend sits in the solver's step, after churn
  and before the evaluation (also before Heun's second one); the x0 history of multistep
  methods stays the network's own predictions. At SNR 0 the blended known region is pure
  noise (`alpha = 0`), as it should be: an epsilon network asked at its stand-in point
  (see `samplers`) still sees the state, whose level is what the blend uses.
* **RePaint resampling** (Lugmayr et al. 2022): `jump_length`, `jump_n_sample`; after
  every `jump_length` steps the state is re-noised `jump_length` points back with the
  exact forward transition and those steps are redone, `jump_n_sample - 1` extra times
  (`samplers.repaint_schedule`, NFE `samplers.repaint_nfe`). One compiled `lax.scan`
  over the transitions, whose order is built in NumPy at trace time.
* **Inversion** (`invert`): image -> the noise that `sample` with the same method, steps,
  schedule and placement maps back to the image (DDIM inversion, DPM-Solver++(2M)
  inversion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import parametrizations, samplers
from diffjax.diffusion.methods import Transitions, get_method
from diffjax.diffusion.placements import np_eval, step_times
from diffjax.diffusion.schedules import Schedule

__all__ = [
    "INVERSION_METHODS",
    "downsample_mask",
    "inpaint",
    "inpaint_condition",
    "invert",
    "masked_image",
]

Array = jax.Array

INVERSION_METHODS = ("ddim", "dpmpp_2m")


def downsample_mask(mask: Array, factor: int, *, mode: str = "any") -> Array:
    """A pixel mask [B, H, W, 1] (1 = regenerate) on the latent grid [B, H/f, W/f, 1].

    `mode='any'`: a latent pixel is regenerated when any pixel of its f x f block is
    (max pooling; what blend inpainting of a latent model uses, so that no latent it
    keeps carries a pixel to regenerate); `mode='nearest'`: the block's top-left pixel,
    PyTorch's `interpolate(mode='nearest')` that diffusers' inpainting pipelines feed
    the 9-channel U-Nets.
    """
    mask = jnp.asarray(mask)
    b, h, w, c = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"mask of size {h}x{w} does not divide into {factor}x{factor} blocks")
    if mode == "nearest":
        return mask[:, ::factor, ::factor, :]
    if mode != "any":
        raise ValueError(f"mode must be 'any' or 'nearest', got {mode!r}")
    return mask.reshape(b, h // factor, factor, w // factor, factor, c).max(axis=(2, 4))


def masked_image(image: Array, mask: Array) -> Array:
    """`image * (mask < 0.5)`: the region to generate zeroed (diffusers' inpainting
    pipelines), `image` [B, H, W, C] in [-1, 1], `mask` [B, H, W, 1] (1 = generate)."""
    return image * (jnp.asarray(mask) < 0.5).astype(image.dtype)


def inpaint_condition(image: Array, mask: Array) -> Array:
    """What an inpainting model sees beside its state: `concat([mask, masked image])`
    on the channel axis, [B, H, W, 1 + C] (Stable Diffusion inpainting's layout, whose
    U-Net input is `[x_t, mask, masked image latents]`).

    `image` [B, H, W, C] in model space, `mask` [B, H, W, 1] with 1 (>= 0.5) where the
    model generates; the masked image is `image * (mask < 0.5)` (the region to generate
    zeroed), as in diffusers' pipelines. For latent models the masked image is encoded
    in pixels first and `mask` downsampled (`downsample_mask(..., mode='nearest')`).
    """
    regen = (jnp.asarray(mask) >= 0.5).astype(image.dtype)
    return jnp.concatenate([regen, masked_image(image, mask)], axis=-1)


def inpaint(
    model_fn: samplers.ModelFn,
    noise: Array,
    *,
    known: Array,
    mask: Array,
    key: Array | None,
    schedule: Schedule,
    method: str,
    num_steps: int,
    inpaint_noise: str = "fresh",
    jump_length: int | None = None,
    jump_n_sample: int = 1,
    **options: Any,
) -> Array | tuple[Array, Array]:
    """Inpaints `known` where `mask` is 1 with any model: `samplers.sample` with
    `inpaint_known=known, inpaint_mask=mask` (see its arguments and the module docstring).

    Args:
      model_fn, noise, schedule, method, num_steps: as for `samplers.sample`.
      key: PRNG key; None only for `inpaint_noise='fixed'` with a deterministic method
        and no RePaint.
      known: [B, ...] the image (same shape as `noise`); kept where `mask` is 0.
      mask: 1 (>= 0.5) where to generate; [B, ...] or broadcastable to it.
      inpaint_noise: `fresh` or `fixed` noise for the known region.
      jump_length, jump_n_sample: RePaint resampling (`jump_n_sample = 1`: none).
      **options: any other option of `samplers.sample` (prediction, placement, eta,
        churn, clipping, strength/init_image, t_final, return_trajectory).

    Returns:
      [B, ...] samples whose known region equals `known` bit for bit.
    """
    return samplers.sample(
        model_fn,
        noise,
        schedule=schedule,
        method=method,
        num_steps=num_steps,
        key=key,
        inpaint_known=known,
        inpaint_mask=mask,
        inpaint_noise=inpaint_noise,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        **options,
    )


def _reversed_coefficients(
    m: Any, a: np.ndarray, s: np.ndarray, schedule: Schedule, ts: np.ndarray
) -> dict[str, np.ndarray]:
    """`m`'s data-prediction updates on the reversed grid: step n from point K-1-n to
    K-2-n (towards noise), float64 [K-1] each."""
    with np.errstate(divide="ignore"):
        lam = np.log(a) - np.log(s)
    rev = lambda v: v[::-1].copy()  # noqa: E731
    grid = Transitions(
        a_s=rev(a[1:]),
        s_s=rev(s[1:]),
        lam_s=rev(lam[1:]),
        a_d=rev(a[:-1]),
        s_d=rev(s[:-1]),
        lam_d=rev(lam[:-1]),
        h=rev(lam[:-1]) - rev(lam[1:]),
    )
    c = samplers.coefficients(m, grid, 0.0)
    if a.size > 1 and a[0] == 0:
        # Into SNR 0 (h = -inf): the first-order limit, the mirror of sampling's first
        # step from there: x_0 = (sigma_0/sigma_1) (x_1 - alpha_1 x0_1) = sigma_0 eps_1.
        for name in c:
            c[name][-1] = 0.0
        c["cx"][-1] = s[0] / s[1]
        c["c0"][-1] = -a[1] * s[0] / s[1]
    for name, arr in c.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"non-finite inverse {name} coefficients for method {m.name!r} on "
                f"{schedule!r} at times {ts}; choose another placement"
            )
    return c


def invert(
    model_fn: samplers.ModelFn,
    images: Array,
    *,
    schedule: Schedule,
    method: str,
    num_steps: int,
    prediction: str = "epsilon",
    placement: str | Sequence[float] | None = None,
    rho: float = 7.0,
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    t_final: float | None = None,
    clean_iters: int = 1,
    return_trajectory: bool = False,
) -> Array | tuple[Array, Array]:
    """Inverts `sample`: images -> the noise from which `sample` regenerates them.

    `sample(model_fn, invert(model_fn, x, ...), method=, num_steps=, ...)` with the same
    schedule, prediction, placement, `rho`, clipping and `t_final` gives back `x` up to
    the solver's error, which falls at the method's order (1 for `ddim`, 2 for
    `dpmpp_2m`). Guidance or conditioning go inside `model_fn`. Jittable like `sample`.

    The same data-prediction updates as `sample`'s run on the reversed grid, from the
    clean end towards `t_0`, each evaluating the model at the point it leaves (DDIM
    inversion; DPM-Solver++(2M) inversion with its x0 history, a first-order first
    step). The clean end mirrors `sample`'s last step, which returns the x0 prediction at
    `t_{K-1}` (or the DDIM step to `t_final`): the state there solves
    `x = alpha x0 + sigma eps(x)` with `x0` the image (with `t_final`:
    `x = (alpha/alpha_f) x0 + (sigma - alpha sigma_f/alpha_f) eps(x)`). The first of
    `clean_iters` evaluations takes `eps` at the image itself (as the state at `t_{K-1}`,
    or at `t_final`), like diffusers' DDIM inversion; each further one is a fixed-point
    iteration at the current `x` (a contraction at low noise for smooth denoisers: the
    error shrinks by about `sigma^2 / (alpha^2 var + sigma^2)` per iteration on Gaussian
    data). The state reached at `t_0` is divided by `sigma(t_0)`: `sample` starts from
    `sigma(t_0) * noise`. NFE: `clean_iters + num_steps - 1`.

    Args:
      model_fn: the (possibly guided) network, `model_fn(x, t [B])`.
      images: [B, ...] data, in the model's space (pixels or latents).
      schedule, method, num_steps, prediction, placement, rho, clip_x0,
        dynamic_threshold, t_final: as for `samplers.sample`; `method` one of
        `INVERSION_METHODS`.
      clean_iters: evaluations spent on the clean end point (>= 1).
      return_trajectory: also return the states [K, B, ...] at `t_{K-1}, ..., t_0`.

    Returns:
      The noise [B, ...] float32 (and the trajectory).

    Raises:
      ValueError: a method other than `ddim`/`dpmpp_2m`, or bad options.
    """
    m = get_method(method)
    if method not in INVERSION_METHODS:
        raise ValueError(
            f"inversion supports the deterministic methods {INVERSION_METHODS}, not "
            f"{method!r}; sample with one of them from the inverted noise"
        )
    parametrizations.check_prediction(prediction)
    if isinstance(clean_iters, bool) or int(clean_iters) != clean_iters or clean_iters < 1:
        raise ValueError(f"clean_iters must be an integer >= 1, got {clean_iters!r}")
    if clip_x0 and dynamic_threshold is not None:
        raise ValueError("pass either clip_x0=True or dynamic_threshold, not both")
    if placement is None:
        placement = m.placement(schedule)
    ts = step_times(schedule, num_steps, placement, rho=rho)
    end = samplers.final_point(schedule, m, 0.0, ts, t_final)
    a, s = (np.atleast_1d(v) for v in np_eval(schedule.alpha_sigma, ts))
    stand_in = samplers.snr0_stand_in(schedule, prediction, a)
    ev = samplers.eval_points(ts.copy(), a, s, stand_in)
    coeffs = _reversed_coefficients(m, a, s, schedule, ts)

    dtype = jnp.promote_types(images.dtype, jnp.float32)
    y = jnp.asarray(images).astype(dtype)
    cast = lambda d: {n: jnp.asarray(v, dtype) for n, v in d.items()}  # noqa: E731
    solver = samplers.Solver(
        model_fn=model_fn,
        method=m,
        prediction=prediction,
        dtype=dtype,
        clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold,
        recompute_eps=clip_x0 or dynamic_threshold is not None,
        churn=False,
    )

    # The clean end: x at t_{K-1} with x0(x) = y (or the DDIM step from it = y at t_final).
    last = cast({n: v[-1] for n, v in ev.items()})
    a_f, s_f = (1.0, 0.0) if end is None else end
    if end is None:
        first = last
    else:
        ev_f = samplers.eval_points(
            np.array([float(t_final)]), np.array([a_f]), np.array([s_f]), None
        )
        first = cast({n: v[0] for n, v in ev_f.items()})
    gain, mix = a[-1] / a_f, s[-1] - a[-1] * s_f / a_f
    x = gain * y + mix * solver.denoise(y, first)[1]
    for _ in range(int(clean_iters) - 1):
        x = gain * y + mix * solver.denoise(x, last)[1]

    # Towards noise: step n leaves point K-1-n (the model runs there) for K-2-n.
    k = ts.size
    traj = [x[None]] if return_trajectory else None
    if k > 1:
        src = np.arange(k - 1, 0, -1)
        none = {"key": None, "restart": None, "jr": None, "jq": None}
        xs = (cast({n: v[src] for n, v in ev.items()}), cast(coeffs), None, None, none)
        hist = tuple(jnp.zeros_like(x) for _ in range(m.history))
        (x, _), ys = jax.lax.scan(solver.step, (x, hist), xs)
        if traj is not None:
            traj.append(ys)
    noise = x / jnp.asarray(s[0], dtype)
    if traj is None:
        return noise
    return noise, jnp.concatenate(traj, axis=0)
