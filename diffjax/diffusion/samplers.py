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
`t_{K-1}` (Karras et al.'s final Euler step to sigma = 0, DDIM's step to alpha_bar = 1).

Zero terminal SNR (`alpha(t_0) = 0`): all updates stay finite because `exp(-h)` with
`h = inf` is 0, so the first step is the exact limit of the first-order step. An
epsilon-network carries no information about x0 at SNR 0 (there `x_t = eps`), so with
`prediction='epsilon'` the network is evaluated at `schedule.t_from_logsnr(lo)` (the
noisiest point of the schedule's finite log-SNR range, e.g. `N-2` for discrete VP),
where its output identifies x0, instead of dividing by `alpha = 0`.
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
from diffjax.diffusion.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

PLACEMENTS = ("leading", "trailing", "linspace", "logsnr", "karras")


# --------------------------------------------------------------------------- placements


def _np_eval(fn: Callable[..., Any], *args: Any) -> Any:
    """Evaluates a schedule closure eagerly (also inside a jit trace) -> float64 NumPy."""
    with jax.ensure_compile_time_eval():
        out = fn(*(jnp.asarray(a) for a in args))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def step_times(
    schedule: Schedule,
    num_steps: int,
    placement: str | Sequence[float] = "trailing",
    *,
    rho: float = 7.0,
) -> np.ndarray:
    """The `num_steps` model-evaluation times of a sampling run, descending.

    The clean end point is not included (samplers append it). Placements:

    * `leading` (DDIM/PNDM/Stable Diffusion, discrete only): `k * (N // num_steps)`,
      `k = num_steps-1 .. 0`. Never visits `t_max`; kept for reproducing old results.
    * `trailing` (Lin et al. 2023): `num_steps + 1` points evenly spaced from `t_max` to
      the clean time `t_clean`, the clean one dropped (discrete: rounded;
      `round(linspace(N, 0, S+1)[:-1]) - 1`).
    * `linspace` (iDDPM): evenly spaced from `t_max` to `t_min` (discrete: rounded);
      where `t_min` is itself clean (flow) it equals `trailing`.
    * `logsnr`: uniform in log-SNR over `schedule.logsnr_range` (DPM-Solver).
    * `karras`: Karras et al. 2022 eq. 5 in `sigma = sigma/alpha = exp(-logsnr/2)`
      over `schedule.logsnr_range`, exponent `rho`.
    * a sequence of floats: used as given (strictly descending, within the schedule).

    For `logsnr`/`karras`, if the schedule has SNR 0 at `t_max` (outside its finite
    range), the first point is moved to `t_max` so that sampling starts from pure noise.

    Args:
      schedule: the schedule.
      num_steps: number of evaluation times (>= 1).
      placement: a name above or explicit times.
      rho: Karras exponent.

    Returns:
      float64 [num_steps], strictly descending.

    Raises:
      ValueError: unknown placement, a discrete-only placement on a continuous schedule,
        or a placement that does not give `num_steps` distinct times.
    """
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    n = int(num_steps)
    t_max, t_min, t_clean = schedule.t_max, schedule.t_min, schedule.t_clean
    if not isinstance(placement, str):
        ts = np.asarray(placement, np.float64).reshape(-1)
        if ts.shape != (n,):
            raise ValueError(f"explicit placement has {ts.size} times, num_steps is {n}")
        if np.any(ts > t_max) or np.any(ts < t_min):
            raise ValueError(f"explicit placement must lie in [{t_min}, {t_max}], got {ts}")
    elif placement == "leading":
        if not schedule.is_discrete:
            raise ValueError(
                "placement 'leading' is defined for discrete schedules only; "
                "use 'trailing', 'linspace', 'logsnr' or 'karras'"
            )
        stride = schedule.num_timesteps // n
        if stride == 0:
            raise ValueError(f"num_steps={n} exceeds the {schedule.num_timesteps} timesteps")
        ts = (np.arange(n, dtype=np.float64) * stride)[::-1]
    elif placement == "trailing":
        ts = np.linspace(t_max, t_clean, n + 1)[:-1]
        if schedule.is_discrete:
            ts = np.round(ts)
    elif placement == "linspace":
        sigma_min = _np_eval(schedule.alpha_sigma, t_min)[1]
        if sigma_min == 0:
            ts = np.linspace(t_max, t_min, n + 1)[:-1]
        else:
            ts = np.linspace(t_max, t_min, n)
        if schedule.is_discrete:
            ts = np.round(ts)
    elif placement in ("logsnr", "karras"):
        lo, hi = schedule.logsnr_range
        if placement == "logsnr":
            lams = np.linspace(lo, hi, n)
        else:
            smax, smin = math.exp(-0.5 * lo), math.exp(-0.5 * hi)
            ramp = np.linspace(0.0, 1.0, n)
            sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
            lams = -2.0 * np.log(sig)
        ts = _np_eval(schedule.t_from_logsnr, lams.astype(np.float32))
        ts = np.clip(ts, t_min, t_max)
        if _np_eval(schedule.logsnr, t_max) < lo:
            ts[0] = t_max
    else:
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
    ts = np.asarray(ts, np.float64)
    if n > 1 and not np.all(np.diff(ts) < 0):
        raise ValueError(
            f"placement {placement!r} with num_steps={n} does not give strictly descending "
            f"distinct times ({ts}); use fewer steps or another placement"
        )
    return ts


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """A sampler's static description.

    Attributes:
      name: key in `METHODS`.
      order: convergence order of the deterministic ODE solver (stochastic: weak order
        of the underlying scheme, informational).
      stochastic: whether it injects noise (needs `key`).
      evals_per_step: 1, or 2 for Heun-type methods (whose last step needs one).
      placement_discrete: default placement on discrete-time schedules.
      placement_continuous: default placement on continuous ones (not flow, where
        every method defaults to `trailing`; see `default_placement`).
      description: one line for docs and errors.
    """

    name: str
    order: int
    stochastic: bool
    evals_per_step: int
    placement_discrete: str
    placement_continuous: str
    description: str

    def nfe(self, num_steps: int) -> int:
        """Network evaluations for `num_steps` steps (Heun-type: 2N - 1).

        `heun` started at SNR 0 takes its first step as Euler and uses 2N - 2.
        """
        return self.evals_per_step * num_steps - (self.evals_per_step - 1)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ddpm", 1, True, 1, "trailing", "logsnr", "ancestral (posterior variance)"),
        Method("ddim", 1, False, 1, "trailing", "logsnr", "DDIM with eta (0: deterministic)"),
        Method("dpmpp_2m", 2, False, 1, "logsnr", "logsnr", "DPM-Solver++(2M), multistep"),
        Method("dpmpp_3m", 3, False, 1, "logsnr", "logsnr", "DPM-Solver++(3M), multistep"),
        Method("dpmpp_2m_sde", 2, True, 1, "logsnr", "logsnr", "SDE-DPM-Solver++(2M), midpoint"),
        Method("euler", 1, False, 1, "trailing", "logsnr", "EDM Euler in sigma/alpha, churn"),
        Method("heun", 2, False, 2, "trailing", "karras", "EDM Heun in sigma/alpha, churn"),
        Method("flow_euler", 1, False, 1, "trailing", "logsnr", "Euler in the flow time"),
        Method("flow_heun", 2, False, 2, "linspace", "logsnr", "Heun in the flow time"),
    )
}


def default_placement(method: str, schedule: Schedule) -> str:
    """The placement `sample` uses for `method` on `schedule` when none is given.

    Chosen by `benchmarks/samplers.py --study` (docs/samplers.md): on the flow
    schedule `trailing` (uniform in t) for every method; on discrete schedules
    `Method.placement_discrete`; on other continuous ones `Method.placement_continuous`.
    """
    m = _method(method)
    if schedule.name == "flow":
        return "trailing"
    return m.placement_discrete if schedule.is_discrete else m.placement_continuous


def nfe(method: str, num_steps: int) -> int:
    """Network evaluations of `method` with `num_steps` steps."""
    return _method(method).nfe(num_steps)


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown sampler method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


# --------------------------------------------------------------------------- grid tables


@dataclasses.dataclass(frozen=True)
class _Tables:
    """Float64 per-point and per-step coefficients, built at trace time."""

    ev: dict[str, np.ndarray]  # per evaluation point i in [0, K): where the model runs
    ev_grid: dict[str, np.ndarray]  # the same at the un-churned grid points
    step: dict[str, np.ndarray]  # per transition i -> i+1, i in [0, K-1)


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
    k = ts.size
    a, s = _np_eval(schedule.alpha_sigma, ts)
    a, s = np.atleast_1d(a), np.atleast_1d(s)
    with np.errstate(divide="ignore"):
        lam = np.log(a) - np.log(s)  # half log-SNR (DPM-Solver's lambda); -inf at SNR 0

    # Stochastic churn (Karras et al. 2022, Alg. 2), raising sigma/alpha before the step.
    a_src, s_src, t_src = a.copy(), s.copy(), ts.copy()
    churn_x, churn_z = np.ones(k), np.zeros(k)
    if s_churn > 0:
        sig_max = _np_eval(schedule.alpha_sigma, schedule.t_max)
        sig_max = np.inf if sig_max[0] == 0 else sig_max[1] / sig_max[0]
        gamma = min(s_churn / num_total, math.sqrt(2.0) - 1.0)
        for i in range(k):
            if a[i] == 0:
                continue  # already pure noise
            sig = s[i] / a[i]
            if not s_tmin <= sig <= s_tmax:
                continue
            sig_hat = min(sig * (1.0 + gamma), sig_max)
            t_hat = float(_np_eval(schedule.t_from_logsnr, -2.0 * math.log(sig_hat)))
            t_hat = max(t_hat, ts[i])
            ah, sh = (float(v) for v in _np_eval(schedule.alpha_sigma, t_hat))
            a_src[i], s_src[i], t_src[i] = ah, sh, t_hat
            churn_x[i] = ah / a[i]
            churn_z[i] = ah * math.sqrt(max((sh / ah) ** 2 - sig**2, 0.0)) * s_noise
    with np.errstate(divide="ignore"):
        lam_src = np.log(a_src) - np.log(s_src)

    # Where an epsilon network would be asked at SNR 0, ask it at the schedule's noisiest
    # finite log-SNR instead (module docstring).
    shift = None
    if prediction == "epsilon" and (np.any(a_src == 0) or np.any(a == 0)):
        t_shift = float(_np_eval(schedule.t_from_logsnr, schedule.logsnr_range[0]))
        ash, ssh = (float(v) for v in _np_eval(schedule.alpha_sigma, t_shift))
        if ash <= 0:
            raise ValueError(f"{schedule!r}: its finite log-SNR range starts at SNR 0")
        shift = (t_shift, ash, ssh)

    def eval_info(t: np.ndarray, a_pt: np.ndarray, s_pt: np.ndarray) -> dict[str, np.ndarray]:
        t_ev, a_ev, s_ev = t.copy(), a_pt.copy(), s_pt.copy()
        if shift is not None:
            zero = a_pt == 0
            t_ev[zero], a_ev[zero], s_ev[zero] = shift
        return dict(t=t_ev, a_ev=a_ev, s_ev=s_ev, a_pt=a_pt, s_pt=s_pt)

    # Evaluations at the (churned) start of each step, and at the grid points themselves
    # (Heun's second evaluation lands on the next grid point, not on a churned one).
    ev = dict(**eval_info(t_src, a_src, s_src), churn_x=churn_x, churn_z=churn_z)
    ev_grid = eval_info(ts.copy(), a, s)

    # Transitions i -> i+1 between evaluation points (the last, to clean, is x = x0).
    a_d, s_d, lam_d = a[1:], s[1:], lam[1:]
    a_s, s_s, lam_s = a_src[:-1], s_src[:-1], lam_src[:-1]
    h = lam_d - lam_s  # > 0; inf when leaving SNR 0
    step: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if m.name in ("ddim", "ddpm", "euler", "heun", "flow_euler", "flow_heun"):
            e = eta if m.name in ("ddim",) else (1.0 if m.name == "ddpm" else 0.0)
            frac = -np.expm1(-2.0 * h)  # 1 - SNR_src/SNR_dst
            keep = s_d * np.sqrt(1.0 - e * e * frac)
            step["cx"] = keep / s_s
            step["c0"] = a_d - a_s * keep / s_s
            if e > 0:
                step["cz"] = e * s_d * np.sqrt(frac)
            if m.name == "heun":
                # x'' = x' + a_d (sig_d - sig_s) / 2 (eps' - eps); infinite from SNR 0,
                # where the first step is taken as Euler (see `sample`).
                step["ch"] = np.where(a_s > 0, 0.5 * (s_d - a_d * s_s / a_s), 0.0)
            if m.name == "flow_heun":
                tau_d, tau_s = s_d / (a_d + s_d), s_s / (a_s + s_s)
                step["ch"] = 0.5 * (a_d + s_d) * (tau_d - tau_s)
        elif m.name in ("dpmpp_2m", "dpmpp_2m_sde"):
            e = 0.0 if m.name == "dpmpp_2m" else eta
            p = -np.expm1(-(1.0 + e) * h)
            inv_r = np.zeros_like(h)
            inv_r[1:] = h[1:] / h[:-1]  # 1/r = h / h_prev; 0 when h_prev = inf
            # Second-order (midpoint) correction p/(2r) (x0_i - x0_{i-1}).
            step["cx"] = s_d / s_s * (np.exp(-e * h) if e > 0 else 1.0)
            step["c0"] = a_d * p * (1.0 + 0.5 * inv_r)
            step["c1"] = -a_d * p * 0.5 * inv_r
            if e > 0:
                step["cz"] = s_d * np.sqrt(-np.expm1(-2.0 * e * h))
        elif m.name == "dpmpp_3m":
            step["cx"] = s_d / s_s
            c0, c1, c2 = np.zeros_like(h), np.zeros_like(h), np.zeros_like(h)
            for i in range(h.size):
                c0[i], c1[i], c2[i] = _dpm3_coeffs(h, i, a_d[i])
            # A first-order step (the first one, and the one after an infinite step from
            # SNR 0) has local error O(h^2), which would cap the global order at 2. Once
            # x0 at its end point is known, correct that point with the trapezoid rule
            # in w = exp(lambda - lambda_end) (x0 is smooth in w, also from SNR 0 where
            # the interval in lambda is infinite): + a (1 - e^-h)/2 (x0_new - x0_old).
            # Local error O(h^3), no extra evaluation (a UniC-style corrector).
            first_order = [0] + ([1] if h.size > 1 and np.isinf(h[0]) else [])
            for j in first_order:
                if j + 1 < h.size:
                    kc = 0.5 * a_d[j] * -np.expm1(-h[j])
                    c0[j + 1] += step["cx"][j + 1] * kc
                    c1[j + 1] -= step["cx"][j + 1] * kc
            step["c0"], step["c1"], step["c2"] = c0, c1, c2
        else:  # pragma: no cover - METHODS and this switch are kept in step
            raise AssertionError(m.name)
    for name, arr in {**ev, **step, **{f"grid_{n}": v for n, v in ev_grid.items()}}.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"non-finite {name} coefficients for method {m.name!r} on {schedule!r} "
                f"at times {ts}; choose another placement"
            )
    return _Tables(ev=ev, ev_grid=ev_grid, step=step)


def _dpm3_coeffs(h: np.ndarray, i: int, a_d: float) -> tuple[float, float, float]:
    """Coefficients of (x0_i, x0_{i-1}, x0_{i-2}) in DPM-Solver++(3M) step i.

    Lower order on the first two steps (1, then 2: the Taylor form with phi_2).
    """
    hi = h[i]
    phi1 = -np.expm1(-hi)  # 1 - e^-h
    if i == 0:
        return a_d * phi1, 0.0, 0.0
    phi2 = 1.0 - phi1 / hi  # (e^-h - 1 + h) / h
    r0 = h[i - 1] / hi
    if i == 1:
        # D1 = (m0 - m1) / r0; x += a_d phi2 D1.
        return a_d * (phi1 + phi2 / r0), -a_d * phi2 / r0, 0.0
    phi3 = phi2 / hi - 0.5
    r1 = h[i - 2] / hi

    def combo(m0: float, m1: float, m2: float) -> float:
        d1_0 = (m0 - m1) / r0
        d1_1 = (m1 - m2) / r1
        q = r0 / (r0 + r1)
        d1 = d1_0 + q * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return a_d * (phi1 * m0 + phi2 * d1 - 2.0 * phi3 * d2)

    return combo(1.0, 0.0, 0.0), combo(0.0, 1.0, 0.0), combo(0.0, 0.0, 1.0)


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
      return_trajectory: also return the states [K+1, B, ...]: the start, the state at
        each later evaluation point and the final sample (K = steps run).

    Returns:
      Samples [B, ...] float32 (and the trajectory).

    Raises:
      ValueError: unknown method/placement/prediction, a missing key, bad strength, or
        options the method does not take.
    """
    m = _method(method)
    parametrizations.check_prediction(prediction)
    if placement is None:
        placement = default_placement(method, schedule)
    if eta is None:
        eta = {"ddim": 0.0, "dpmpp_2m_sde": 1.0}.get(m.name, 0.0)
    elif m.name not in ("ddim", "dpmpp_2m_sde"):
        raise ValueError(f"eta applies to 'ddim' and 'dpmpp_2m_sde', not {m.name!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    if s_churn > 0 and m.name not in ("euler", "heun"):
        raise ValueError(f"churn (s_churn > 0) applies to 'euler' and 'heun', not {m.name!r}")
    if clip_x0 and dynamic_threshold is not None:
        raise ValueError("pass either clip_x0=True or dynamic_threshold, not both")
    if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold is a quantile in (0, 1], got {dynamic_threshold}")
    stochastic = m.stochastic or (m.name == "ddim" and eta > 0) or s_churn > 0
    if m.name == "dpmpp_2m_sde" and eta == 0:
        stochastic = False
    if stochastic and key is None:
        raise ValueError(f"method {m.name!r} with these options is stochastic: pass key=")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    if strength < 1.0 and init_image is None:
        raise ValueError("strength < 1 needs init_image=")

    ts_all = step_times(schedule, num_steps, placement, rho=rho)
    start = 0
    if strength < 1.0:
        run = int(num_steps * strength)
        if run < 1:
            raise ValueError(
                f"strength={strength} with num_steps={num_steps} runs no step; "
                "raise num_steps or strength"
            )
        start = num_steps - run
    ts = ts_all[start:]
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
    k = ts.size

    dtype = jnp.promote_types(noise.dtype, jnp.float32)
    noise = noise.astype(dtype)
    a0, s0 = _np_eval(schedule.alpha_sigma, ts[0])
    if strength < 1.0:
        x = a0 * init_image.astype(dtype) + s0 * noise
    else:
        x = s0 * noise
    x = x.astype(dtype)
    shifted = any(bool(np.any(e["a_ev"] != e["a_pt"])) for e in (tab.ev, tab.ev_grid))
    recompute_eps = clip_x0 or dynamic_threshold is not None or shifted
    ev = {n: jnp.asarray(v, dtype) for n, v in tab.ev.items()}
    ev_grid = {n: jnp.asarray(v, dtype) for n, v in tab.ev_grid.items()}
    st = {n: jnp.asarray(v, dtype) for n, v in tab.step.items()}

    def denoise(x: Array, e: dict[str, Array]) -> tuple[Array, Array]:
        out = model_fn(x, _bvec(e["t"], x))
        x0, eps = parametrizations.to_x0_eps(out, x, e["a_ev"], e["s_ev"], prediction)
        x0, eps = x0.astype(dtype), eps.astype(dtype)
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
        elif dynamic_threshold is not None:
            x0 = dynamic_threshold_x0(x0, dynamic_threshold)
        if recompute_eps:
            eps = (x - e["a_pt"] * x0) / e["s_pt"]
        return x0, eps

    def churn(x: Array, e: dict[str, Array], key: Array | None) -> Array:
        if s_churn <= 0:
            return x
        z = jax.random.normal(key, x.shape, dtype)
        return e["churn_x"] * x + e["churn_z"] * z

    def at(d: dict[str, Array], i: int | Array) -> dict[str, Array]:
        return {n: v[i] for n, v in d.items()}

    two_eval = m.name in ("heun", "flow_heun")
    hist_len = {"dpmpp_2m": 1, "dpmpp_2m_sde": 1, "dpmpp_3m": 2}.get(m.name, 0)

    def step(carry: tuple, xs: tuple, *, second_order: bool = True) -> tuple[tuple, Array]:
        x, hist = carry
        e, c, e_next, key = xs
        k_churn, k_step = (None, None) if key is None else tuple(jax.random.split(key))
        x = churn(x, e, k_churn)
        x0, eps = denoise(x, e)
        x_new = c["cx"] * x + c["c0"] * x0
        if hist_len >= 1:
            x_new = x_new + c["c1"] * hist[0]
        if hist_len >= 2:
            x_new = x_new + c["c2"] * hist[1]
        if "cz" in c and stochastic:
            x_new = x_new + c["cz"] * jax.random.normal(k_step, x.shape, dtype)
        if two_eval and second_order:
            x0_n, eps_n = denoise(x_new, e_next)
            if m.name == "heun":
                x_new = x_new + c["ch"] * (eps_n - eps)
            else:
                x_new = x_new + c["ch"] * ((eps_n - x0_n) - (eps - x0))
        hist = ((x0,) + hist)[:hist_len]
        return (x_new, hist), x_new

    need_keys = stochastic
    keys = jax.random.split(key, k) if need_keys else None
    hist0 = tuple(jnp.zeros_like(x) for _ in range(hist_len))
    carry = (x, hist0)
    traj = [x[None]] if return_trajectory else None

    first = 0
    if m.name == "heun" and k > 1 and tab.ev["a_pt"][0] == 0:
        # Heun's trapezoid needs a finite first step; from SNR 0 take it as Euler.
        xs0 = (at(ev, 0), at(st, 0), at(ev_grid, 1), None if keys is None else keys[0])
        carry, y = step(carry, xs0, second_order=False)
        first = 1
        if return_trajectory:
            traj.append(y[None])
    if k - 1 > first:
        xs = (
            {n: v[first : k - 1] for n, v in ev.items()},
            {n: v[first:] for n, v in st.items()},
            {n: v[first + 1 : k] for n, v in ev_grid.items()},
            None if keys is None else keys[first : k - 1],
        )
        carry, ys = jax.lax.scan(step, carry, xs)
        if return_trajectory:
            traj.append(ys)
    x = carry[0]
    # Final step to the clean point: the x0 prediction at the last evaluation point.
    x = churn(x, at(ev, k - 1), None if keys is None else jax.random.split(keys[k - 1])[0])
    x0, _ = denoise(x, at(ev, k - 1))
    if return_trajectory:
        traj.append(x0[None])
        return x0, jnp.concatenate(traj, axis=0)
    return x0
