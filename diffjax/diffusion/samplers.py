"""Samplers: one compiled `lax.scan` per call, selected by name from `METHODS`.

`sample(model_fn, noise, *, schedule, method, num_steps, ...)` integrates from
`t_max` (or from the `strength` point for img2img) to the data. Every method works
on any schedule and any prediction type: the network output is converted to the
pair `(x0, eps)` in float32 and every update is written in data-prediction form,
`x_next = A x + sum_j B_j x0_j (+ C z)`, whose coefficients are computed once at
trace time in float64 NumPy from the step grid, so no per-step host round trip and
no division by `alpha` or `sigma` where they vanish.

The grid has `num_steps` evaluation times `t_0 > ... > t_{K-1}` (from a placement,
see `step_times`) followed by the clean end point (`alpha = 1`, `sigma = 0`). The last
step of every method goes to the clean point and returns the x0 prediction at
`t_{K-1}` (Karras et al.'s final Euler step to sigma = 0, DDIM's step to alpha_bar = 1),
or, with `t_final`, lands on that time with the deterministic DDIM update (diffusers'
DDIM with `set_alpha_to_one=False` ends at alpha_bar[0], `t_final = 0`).

Zero terminal SNR (`alpha(t_0) = 0`): all updates stay finite because `exp(-h)` with
`h = inf` is 0, so the first step is the exact limit of the first-order step. An
epsilon-network carries no information about x0 at SNR 0 (there `x_t = eps`), so with
`prediction='epsilon'` the network is evaluated at `schedule.t_from_logsnr(lo)` (the
noisiest point of the schedule's finite log-SNR range, e.g. `N-2` for discrete VP),
where its output identifies x0, instead of dividing by `alpha = 0`.

The method records live in `diffjax.diffusion.methods`, the placements in
`diffjax.diffusion.placements`; their public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import parametrizations
from diffjax.diffusion.methods import (
    METHODS,
    Method,
    Pair,
    Placements,
    Transitions,
    default_placement,
    get_method,
    nfe,
)
from diffjax.diffusion.placements import PLACEMENTS, np_eval, step_times
from diffjax.diffusion.schedules import Schedule

__all__ = [
    "METHODS",
    "PLACEMENTS",
    "Method",
    "ModelFn",
    "Placements",
    "default_placement",
    "dynamic_threshold_x0",
    "nfe",
    "sample",
    "step_times",
    "step_window",
]

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


# --------------------------------------------------------------------------- grid tables


@dataclasses.dataclass(frozen=True)
class _Tables:
    """Float64 per-point and per-step coefficients, built at trace time."""

    ev: dict[str, np.ndarray]  # per evaluation point i in [0, K): where the model runs
    ev_grid: dict[str, np.ndarray]  # the same at the un-churned grid points
    step: dict[str, np.ndarray]  # per transition i -> i+1, i in [0, K-1)


def _churned(
    schedule: Schedule,
    ts: np.ndarray,
    a: np.ndarray,
    s: np.ndarray,
    *,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    num_total: int,
) -> tuple[np.ndarray, ...]:
    """Karras et al. 2022, Alg. 2: each point's noise level raised before its step.

    Returns (alpha, sigma, t) at the churned points and the churn map
    `x <- churn_x x + churn_z z`, float64 [K] each.
    """
    k = ts.size
    a_src, s_src, t_src = a.copy(), s.copy(), ts.copy()
    churn_x, churn_z = np.ones(k), np.zeros(k)
    if s_churn <= 0:
        return a_src, s_src, t_src, churn_x, churn_z
    sig_max = np_eval(schedule.alpha_sigma, schedule.t_max)
    sig_max = np.inf if sig_max[0] == 0 else sig_max[1] / sig_max[0]
    gamma = min(s_churn / num_total, math.sqrt(2.0) - 1.0)
    for i in range(k):
        if a[i] == 0:
            continue  # already pure noise
        sig = s[i] / a[i]
        if not s_tmin <= sig <= s_tmax:
            continue
        sig_hat = min(sig * (1.0 + gamma), sig_max)
        t_hat = float(np_eval(schedule.t_from_logsnr, -2.0 * math.log(sig_hat)))
        t_hat = max(t_hat, ts[i])
        ah, sh = (float(v) for v in np_eval(schedule.alpha_sigma, t_hat))
        a_src[i], s_src[i], t_src[i] = ah, sh, t_hat
        churn_x[i] = ah / a[i]
        churn_z[i] = ah * math.sqrt(max((sh / ah) ** 2 - sig**2, 0.0)) * s_noise
    return a_src, s_src, t_src, churn_x, churn_z


def _snr0_stand_in(
    schedule: Schedule, prediction: str, *alphas: np.ndarray
) -> tuple[float, float, float] | None:
    """Where an epsilon network would be asked at SNR 0: (t, alpha, sigma) to ask instead.

    The schedule's noisiest finite log-SNR (module docstring); None if not needed.
    """
    if prediction != "epsilon" or not any(np.any(a == 0) for a in alphas):
        return None
    t_shift = float(np_eval(schedule.t_from_logsnr, schedule.logsnr_range[0]))
    ash, ssh = (float(v) for v in np_eval(schedule.alpha_sigma, t_shift))
    if ash <= 0:
        raise ValueError(f"{schedule!r}: its finite log-SNR range starts at SNR 0")
    return t_shift, ash, ssh


def _eval_points(
    t: np.ndarray, a_pt: np.ndarray, s_pt: np.ndarray, stand_in: tuple | None
) -> dict[str, np.ndarray]:
    """Where the model runs (`t`, `a_ev`, `s_ev`) for states at (`a_pt`, `s_pt`)."""
    t_ev, a_ev, s_ev = t.copy(), a_pt.copy(), s_pt.copy()
    if stand_in is not None:
        zero = a_pt == 0
        t_ev[zero], a_ev[zero], s_ev[zero] = stand_in
    return dict(t=t_ev, a_ev=a_ev, s_ev=s_ev, a_pt=a_pt, s_pt=s_pt)


def _build_tables(
    schedule: Schedule,
    ts: np.ndarray,
    m: Method,
    prediction: str,
    *,
    eta: float,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    num_total: int,
) -> _Tables:
    a, s = np_eval(schedule.alpha_sigma, ts)
    a, s = np.atleast_1d(a), np.atleast_1d(s)
    a_src, s_src, t_src, churn_x, churn_z = _churned(
        schedule,
        ts,
        a,
        s,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        num_total=num_total,
    )
    with np.errstate(divide="ignore"):
        lam = np.log(a) - np.log(s)  # half log-SNR (DPM-Solver's lambda); -inf at SNR 0
        lam_src = np.log(a_src) - np.log(s_src)
    stand_in = _snr0_stand_in(schedule, prediction, a_src, a)

    # Evaluations at the (churned) start of each step, and at the grid points themselves
    # (Heun's second evaluation lands on the next grid point, not on a churned one).
    ev = dict(**_eval_points(t_src, a_src, s_src, stand_in), churn_x=churn_x, churn_z=churn_z)
    ev_grid = _eval_points(ts.copy(), a, s, stand_in)
    grid = Transitions(
        a_s=a_src[:-1],
        s_s=s_src[:-1],
        lam_s=lam_src[:-1],
        a_d=a[1:],
        s_d=s[1:],
        lam_d=lam[1:],
        h=lam[1:] - lam_src[:-1],
    )
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        step = m.coefficients(grid, eta)
    for name, arr in {**ev, **step, **{f"grid_{n}": v for n, v in ev_grid.items()}}.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"non-finite {name} coefficients for method {m.name!r} on {schedule!r} "
                f"at times {ts}; choose another placement"
            )
    return _Tables(ev=ev, ev_grid=ev_grid, step=step)


# --------------------------------------------------------------------------- clipping


def dynamic_threshold_x0(x0: Array, percentile: float) -> Array:
    """Imagen dynamic thresholding (Saharia et al. 2022).

    Per example, `s = max(1, quantile(|x0|, percentile))`, then `clip(x0, -s, s) / s`.

    Args:
      x0: [B, ...] predicted data.
      percentile: quantile in (0, 1], e.g. 0.995.
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


# --------------------------------------------------------------------------- sampling


def _bvec(c: Array, x: Array) -> Array:
    return jnp.broadcast_to(jnp.asarray(c, x.dtype), (x.shape[0],))


def _at(d: dict[str, Array], i: int | Array) -> dict[str, Array]:
    return {n: v[i] for n, v in d.items()}


def _check_options(
    m: Method,
    *,
    eta: float | None,
    s_churn: float,
    s_noise: float,
    clip_x0: bool,
    dynamic_threshold: float | None,
    key: Array | None,
    strength: float,
    init_image: Array | None,
) -> tuple[float, bool]:
    """Refuses options `m` does not take -> (eta for its builder, stochastic)."""
    if eta is None:
        eta = m.eta or 0.0
    elif m.eta is None:
        takes = sorted(n for n, x in METHODS.items() if x.eta is not None)
        raise ValueError(f"eta applies to {' and '.join(map(repr, takes))}, not {m.name!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    if s_churn > 0 and not m.churn:
        takes = sorted(n for n, x in METHODS.items() if x.churn)
        raise ValueError(
            f"churn (s_churn > 0) applies to {' and '.join(map(repr, takes))}, not {m.name!r}"
        )
    if clip_x0 and dynamic_threshold is not None:
        raise ValueError("pass either clip_x0=True or dynamic_threshold, not both")
    if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold is a quantile in (0, 1], got {dynamic_threshold}")
    stochastic = m.injects_noise(eta, s_churn)
    if stochastic and key is None:
        raise ValueError(f"method {m.name!r} with these options is stochastic: pass key=")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    if strength < 1.0 and init_image is None:
        raise ValueError("strength < 1 needs init_image=")
    return eta, stochastic


def _run_times(
    schedule: Schedule,
    num_steps: int,
    placement: str | Sequence[float],
    rho: float,
    strength: float,
) -> np.ndarray:
    """The evaluation times of this run: the whole grid, or its last part (`strength`)."""
    ts = step_times(schedule, num_steps, placement, rho=rho)
    if strength < 1.0:
        run = int(num_steps * strength)
        if run < 1:
            raise ValueError(
                f"strength={strength} with num_steps={num_steps} runs no step; "
                "raise num_steps or strength"
            )
        ts = ts[num_steps - run :]
    return ts


def _final_point(
    schedule: Schedule, m: Method, eta: float, ts: np.ndarray, t_final: float | None
) -> tuple[float, float] | None:
    """(alpha, sigma) at `t_final`, where the last step lands; None for the clean point."""
    if t_final is None:
        return None
    if m.injects_noise(eta, 0.0):
        raise ValueError(
            f"t_final is a deterministic last step; method {m.name!r} with eta={eta} injects "
            "noise at every step (its last step would need noise too). Use t_final=None, or "
            "'ddim' with eta=0 or another deterministic method."
        )
    t_final = float(t_final)
    if not schedule.t_min <= t_final < ts[-1]:
        raise ValueError(
            f"t_final={t_final} must lie in [t_min, t_last) = [{schedule.t_min}, {ts[-1]}) "
            "(below the last evaluation time); use t_final=None for the clean point."
        )
    a, s = np_eval(schedule.alpha_sigma, t_final)
    return float(a), float(s)


@dataclasses.dataclass(frozen=True)
class _Solver:
    """One run's per-step arithmetic, with the model and every static option bound."""

    model_fn: ModelFn
    method: Method
    prediction: str
    dtype: Any
    clip_x0: bool
    dynamic_threshold: float | None
    recompute_eps: bool  # eps from the clipped x0, or where the model ran elsewhere
    churn: bool

    def denoise(self, x: Array, e: dict[str, Array]) -> Pair:
        out = self.model_fn(x, _bvec(e["t"], x))
        x0, eps = parametrizations.to_x0_eps(out, x, e["a_ev"], e["s_ev"], self.prediction)
        x0, eps = x0.astype(self.dtype), eps.astype(self.dtype)
        if self.clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
        elif self.dynamic_threshold is not None:
            x0 = dynamic_threshold_x0(x0, self.dynamic_threshold)
        if self.recompute_eps:
            eps = (x - e["a_pt"] * x0) / e["s_pt"]
        return x0, eps

    def apply_churn(self, x: Array, e: dict[str, Array], key: Array | None) -> Array:
        if not self.churn:
            return x
        z = jax.random.normal(key, x.shape, self.dtype)
        return e["churn_x"] * x + e["churn_z"] * z

    def step(self, carry: tuple, xs: tuple, *, second_order: bool = True) -> tuple[tuple, Array]:
        """One transition i -> i+1: `lax.scan` body over (ev, step, ev_grid[i+1], key)."""
        x, hist = carry
        e, c, e_next, key = xs
        k_churn, k_step = (None, None) if key is None else tuple(jax.random.split(key))
        x = self.apply_churn(x, e, k_churn)
        x0, eps = self.denoise(x, e)
        x_new = c["cx"] * x + c["c0"] * x0
        for j in range(self.method.history):
            x_new = x_new + c[f"c{j + 1}"] * hist[j]
        if "cz" in c:
            x_new = x_new + c["cz"] * jax.random.normal(k_step, x.shape, self.dtype)
        corr = self.method.correction
        if corr is not None and second_order:
            x_new = x_new + corr.update(c["ch"], (x0, eps), self.denoise(x_new, e_next))
        hist = ((x0,) + hist)[: self.method.history]
        return (x_new, hist), x_new

    def integrate(
        self, tab: _Tables, x: Array, keys: Array | None, traj: list[Array] | None
    ) -> Array:
        """All steps but the last: the state at the last evaluation point."""
        ev, ev_grid, st = (
            {n: jnp.asarray(v, self.dtype) for n, v in d.items()}
            for d in (tab.ev, tab.ev_grid, tab.step)
        )
        k = tab.ev["t"].size
        carry = (x, tuple(jnp.zeros_like(x) for _ in range(self.method.history)))
        first = 0
        corr = self.method.correction
        if corr is not None and corr.euler_from_snr0 and k > 1 and tab.ev["a_pt"][0] == 0:
            # The trapezoid needs a finite first step; from SNR 0 take it as Euler.
            xs0 = (_at(ev, 0), _at(st, 0), _at(ev_grid, 1), None if keys is None else keys[0])
            carry, y = self.step(carry, xs0, second_order=False)
            first = 1
            if traj is not None:
                traj.append(y[None])
        if k - 1 > first:
            xs = (
                {n: v[first : k - 1] for n, v in ev.items()},
                {n: v[first:] for n, v in st.items()},
                {n: v[first + 1 : k] for n, v in ev_grid.items()},
                None if keys is None else keys[first : k - 1],
            )
            carry, ys = jax.lax.scan(self.step, carry, xs)
            if traj is not None:
                traj.append(ys)
        return carry[0]

    def final(
        self, tab: _Tables, x: Array, keys: Array | None, end: tuple[float, float] | None = None
    ) -> Array:
        """The last step: the x0 prediction at the last point (the clean point), or,
        with `end = (alpha, sigma)` of `t_final`, the deterministic DDIM step there."""
        e = {n: jnp.asarray(v[-1], self.dtype) for n, v in tab.ev.items()}
        x = self.apply_churn(x, e, None if keys is None else jax.random.split(keys[-1])[0])
        x0, eps = self.denoise(x, e)
        if end is None:
            return x0
        return jnp.asarray(end[0], self.dtype) * x0 + jnp.asarray(end[1], self.dtype) * eps


def step_window(
    schedule: Schedule,
    method: str,
    num_steps: int,
    start: float,
    end: float,
    *,
    placement: str | Sequence[float] | None = None,
    rho: float = 7.0,
) -> tuple[float, float]:
    """The schedule-time interval `(t_lo, t_hi)` holding the evaluation times of the
    steps `i` (of N) with `start <= i / N` and `(i + 1) / N <= end`: where diffusers'
    `control_guidance_start/end` apply a ControlNet. The bounds lie halfway to the
    neighbouring grid times (open-ended at the first and last step), so evaluations at
    the grid's own times fall clearly inside or outside; no step -> `t_lo > t_hi`.
    """
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(
            f"control guidance start/end must satisfy 0 <= start < end <= 1, got {start}, {end}."
        )
    if placement is None:
        placement = get_method(method).placement(schedule)
    ts = np.asarray(step_times(schedule, num_steps, placement, rho=rho), np.float64)
    n = ts.size
    first = math.ceil(start * n - 1e-9)
    last = math.floor(end * n + 1e-9) - 1
    if first > last:
        return math.inf, -math.inf
    hi = math.inf if first == 0 else float(ts[first] + ts[first - 1]) / 2
    lo = -math.inf if last == n - 1 else float(ts[last] + ts[last + 1]) / 2
    return lo, hi


def sample(
    model_fn: ModelFn,
    noise: Array,
    *,
    schedule: Schedule,
    method: str,
    num_steps: int,
    prediction: str = "epsilon",
    key: Array | None = None,
    placement: str | Sequence[float] | None = None,
    eta: float | None = None,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    strength: float = 1.0,
    init_image: Array | None = None,
    t_final: float | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, Array]:
    """Draws samples by integrating from noise to data.

    Jittable as a whole: bind everything except `noise`, `key` and `init_image` with
    `functools.partial` before `jax.jit`. The model is called as
    `model_fn(x [B, ...] float32, t [B] float32)` in the schedule's time convention.

    Args:
      model_fn: the (possibly guided/preconditioned) network.
      noise: standard normal [B, ...]; the start is `sigma(t_0) * noise` (or
        `alpha init_image + sigma noise` when `strength < 1`).
      schedule: a `schedules.Schedule`.
      method: a key of `METHODS`.
      num_steps: solver steps N (network evaluations: `nfe(method, N)`).
      prediction: what `model_fn` predicts: `epsilon` | `x0` | `v` | `flow`.
      key: PRNG key, required by stochastic methods and churn.
      placement: step placement (`step_times`); None uses
        `default_placement(method, schedule)`.
      eta: DDIM eta (default 0) or SDE-DPM-Solver++ eta (default 1); other methods
        refuse it.
      rho: Karras placement exponent.
      s_churn, s_tmin, s_tmax, s_noise: EDM churn (euler/heun only), with `s_tmin`/
        `s_tmax` in units of `sigma/alpha`.
      clip_x0: clip the x0 prediction to [-1, 1] (pixel-space models).
      dynamic_threshold: Imagen dynamic-thresholding percentile (e.g. 0.995) or None.
      strength: img2img/SDEdit strength in (0, 1]: run the last
        `int(num_steps * strength)` steps of the grid, starting from `init_image` noised
        to the first of them.
      init_image: [B, ...] data for `strength < 1`.
      t_final: None (the last step goes to the clean point and returns the x0
        prediction), or a time in `[t_min, t_last)` (`t_last` the last evaluation time)
        where the last step lands instead, with the deterministic DDIM update
        `alpha(t_final) x0 + sigma(t_final) eps` from the last evaluation: diffusers'
        DDIM with `set_alpha_to_one=False` ends at `t_final = 0` (alpha_bar[0]) this way.
        Refused for runs that inject noise of their own (`ddpm`, `eta > 0`).
      return_trajectory: also return the states [K+1, B, ...]: the start, the state at
        each later evaluation point and the final sample (K = steps run).

    Returns:
      Samples [B, ...] float32 (and the trajectory).

    Raises:
      ValueError: unknown method/placement/prediction, a missing key, bad strength, a
        `t_final` outside `[t_min, t_last)` or on a noise-injecting run, or options the
        method does not take.
    """
    m = get_method(method)
    parametrizations.check_prediction(prediction)
    if placement is None:
        placement = m.placement(schedule)
    eta, stochastic = _check_options(
        m,
        eta=eta,
        s_churn=s_churn,
        s_noise=s_noise,
        clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold,
        key=key,
        strength=strength,
        init_image=init_image,
    )

    # Initialise: the grid, its coefficient tables and the start point.
    ts = _run_times(schedule, num_steps, placement, rho, strength)
    end = _final_point(schedule, m, eta, ts, t_final)
    tab = _build_tables(
        schedule,
        ts,
        m,
        prediction,
        eta=eta,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        num_total=num_steps,
    )
    dtype = jnp.promote_types(noise.dtype, jnp.float32)
    noise = noise.astype(dtype)
    a0, s0 = np_eval(schedule.alpha_sigma, ts[0])
    x = s0 * noise if strength >= 1.0 else a0 * init_image.astype(dtype) + s0 * noise
    x = x.astype(dtype)
    moved = any(bool(np.any(e["a_ev"] != e["a_pt"])) for e in (tab.ev, tab.ev_grid))
    solver = _Solver(
        model_fn=model_fn,
        method=m,
        prediction=prediction,
        dtype=dtype,
        clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold,
        recompute_eps=clip_x0 or dynamic_threshold is not None or moved,
        churn=s_churn > 0,
    )
    keys = jax.random.split(key, ts.size) if stochastic else None

    # Integrate, then the final step to the clean point (or to t_final).
    traj = [x[None]] if return_trajectory else None
    x = solver.integrate(tab, x, keys, traj)
    x0 = solver.final(tab, x, keys, end)
    if traj is None:
        return x0
    traj.append(x0[None])
    return x0, jnp.concatenate(traj, axis=0)
