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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import parametrizations
from diffjax.diffusion.schedules import Schedule

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

PLACEMENTS = ("leading", "leading_sd", "trailing", "linspace", "linspace_eps", "logsnr", "karras")


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

    * `leading` (DDIM/PNDM, discrete only): `k * (N // num_steps)`,
      `k = num_steps-1 .. 0` (Lin et al.'s Table 2). Never visits `t_max`.
    * `leading_sd` (discrete only): `leading + 1`, Stable Diffusion's scheduler
      configuration (diffusers' `timestep_spacing='leading'`, `steps_offset=1`).
    * `trailing` (Lin et al. 2023): `num_steps + 1` points evenly spaced from `t_max` to
      the clean time `t_clean`, the clean one dropped (discrete: rounded;
      `round(linspace(N, 0, S+1)[:-1]) - 1`).
    * `linspace` (iDDPM): evenly spaced from `t_max` to `t_min` (discrete: rounded);
      where `t_min` is itself clean (flow) it equals `trailing`.
    * `linspace_eps`: `linspace`, but where `t_min` is clean (flow) it ends 1/1000 of
      the range above it, `t = 0.001` for flow (diffusers' FlowMatch Euler and
      score_sde's `linspace(1, eps, N)`); elsewhere equal to `linspace`.
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
    elif placement in ("leading", "leading_sd"):
        if not schedule.is_discrete:
            raise ValueError(
                f"placement {placement!r} is defined for discrete schedules only; "
                "use 'trailing', 'linspace', 'logsnr' or 'karras'"
            )
        stride = schedule.num_timesteps // n
        offset = 1.0 if placement == "leading_sd" else 0.0
        if stride == 0 or (n - 1) * stride + offset > t_max:
            raise ValueError(f"num_steps={n} exceeds the {schedule.num_timesteps} timesteps")
        ts = (np.arange(n, dtype=np.float64) * stride)[::-1] + offset
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
    elif placement == "linspace_eps":
        t_end = t_min
        if _np_eval(schedule.alpha_sigma, t_min)[1] == 0:
            t_end = t_clean + (t_max - t_clean) / 1000.0
        ts = np.linspace(t_max, t_end, n)
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


# --------------------------------------------------------------------------- coefficients


@dataclasses.dataclass(frozen=True)
class Transitions:
    """The step grid a method's coefficient builder sees, float64 [K-1] per field.

    Transition i goes from evaluation point i (after churn) to grid point i+1 (the
    last one, to the clean point, is not here: it is always `x = x0`).

    Attributes:
      a_s, s_s, lam_s: alpha, sigma and `lambda = log(alpha/sigma)` at the start of each
        step (`lambda = -inf` at SNR 0).
      a_d, s_d, lam_d: the same at the destination.
      h: `lam_d - lam_s`, > 0; inf for a step leaving SNR 0.
    """

    a_s: np.ndarray
    s_s: np.ndarray
    lam_s: np.ndarray
    a_d: np.ndarray
    s_d: np.ndarray
    lam_d: np.ndarray
    h: np.ndarray


# A builder returns the per-step coefficients of the update
#   x_next = cx x + c0 x0_i + c1 x0_{i-1} + ... (+ cz z) (+ ch * correction)
# as float64 [K-1] arrays: `c1..c{history}` for multistep methods, `cz` only when the
# step injects noise, `ch` only for methods with a second evaluation (`Correction`).
# `eta` is the method's eta (0 for methods that take none).
CoefficientBuilder = Callable[[Transitions, float], dict[str, np.ndarray]]


def _ddim_coeffs(g: Transitions, eta: float) -> dict[str, np.ndarray]:
    """DDIM with `eta` (Song et al. 2021); eta = 0 is also EDM's and the flow Euler step."""
    frac = -np.expm1(-2.0 * g.h)  # 1 - SNR_src/SNR_dst
    keep = g.s_d * np.sqrt(1.0 - eta * eta * frac)
    c = {"cx": keep / g.s_s, "c0": g.a_d - g.a_s * keep / g.s_s}
    if eta > 0:
        c["cz"] = eta * g.s_d * np.sqrt(frac)
    return c


def _ddpm_coeffs(g: Transitions, eta: float) -> dict[str, np.ndarray]:
    """Ancestral sampling with the posterior variance: DDIM with eta = 1."""
    del eta
    return _ddim_coeffs(g, 1.0)


def _euler_coeffs(g: Transitions, eta: float) -> dict[str, np.ndarray]:
    """Euler in sigma/alpha (EDM) and in the flow time: both are deterministic DDIM."""
    del eta
    return _ddim_coeffs(g, 0.0)


def _heun_coeffs(g: Transitions, eta: float) -> dict[str, np.ndarray]:
    """Euler, then Heun's trapezoid in sigma/alpha: + a_d (sig_d - sig_s)/2 (eps' - eps)."""
    c = _euler_coeffs(g, eta)
    # Infinite from SNR 0, where the first step is taken as Euler (`Correction`).
    c["ch"] = np.where(g.a_s > 0, 0.5 * (g.s_d - g.a_d * g.s_s / g.a_s), 0.0)
    return c


def _flow_heun_coeffs(g: Transitions, eta: float) -> dict[str, np.ndarray]:
    """Euler, then Heun's trapezoid in the flow time tau = sigma/(alpha+sigma)."""
    c = _euler_coeffs(g, eta)
    tau_d, tau_s = g.s_d / (g.a_d + g.s_d), g.s_s / (g.a_s + g.s_s)
    c["ch"] = 0.5 * (g.a_d + g.s_d) * (tau_d - tau_s)
    return c


def _dpmpp_2m_coeffs(g: Transitions, eta: float) -> dict[str, np.ndarray]:
    """DPM-Solver++(2M) (eta = 0) and SDE-DPM-Solver++(2M), midpoint form (eta > 0)."""
    p = -np.expm1(-(1.0 + eta) * g.h)
    inv_r = np.zeros_like(g.h)
    inv_r[1:] = g.h[1:] / g.h[:-1]  # 1/r = h / h_prev; 0 when h_prev = inf
    # Second-order (midpoint) correction p/(2r) (x0_i - x0_{i-1}).
    c = {
        "cx": g.s_d / g.s_s * (np.exp(-eta * g.h) if eta > 0 else 1.0),
        "c0": g.a_d * p * (1.0 + 0.5 * inv_r),
        "c1": -g.a_d * p * 0.5 * inv_r,
    }
    if eta > 0:
        c["cz"] = g.s_d * np.sqrt(-np.expm1(-2.0 * eta * g.h))
    return c


def _dpmpp_3m_coeffs(g: Transitions, eta: float) -> dict[str, np.ndarray]:
    """DPM-Solver++(3M) with the exact quadratic term and a corrected warm-up."""
    del eta
    h, a_d = g.h, g.a_d
    cx = g.s_d / g.s_s
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
            c0[j + 1] += cx[j + 1] * kc
            c1[j + 1] -= cx[j + 1] * kc
    return {"cx": cx, "c0": c0, "c1": c1, "c2": c2}


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


# --------------------------------------------------------------------------- corrections

Pair = tuple[Array, Array]  # (x0, eps) predicted at one point


@dataclasses.dataclass(frozen=True)
class Correction:
    """A second model evaluation per step, at the step's end grid point (Heun-type).

    Attributes:
      name: for errors and docs.
      update: `(ch, (x0, eps) at the start, (x0, eps) at the end) -> increment` of the
        first-order step, `ch` being the builder's per-step coefficient.
      euler_from_snr0: the trapezoid is infinite on a step leaving SNR 0 (so the first
        step from there is taken as plain Euler, saving its second evaluation).
    """

    name: str
    update: Callable[[Array, Pair, Pair], Array]
    euler_from_snr0: bool


def _heun_update(ch: Array, cur: Pair, nxt: Pair) -> Array:
    return ch * (nxt[1] - cur[1])


def _flow_heun_update(ch: Array, cur: Pair, nxt: Pair) -> Array:
    return ch * ((nxt[1] - nxt[0]) - (cur[1] - cur[0]))  # the velocity eps - x0


HEUN = Correction("heun", _heun_update, euler_from_snr0=True)
FLOW_HEUN = Correction("flow_heun", _flow_heun_update, euler_from_snr0=False)


# --------------------------------------------------------------------------- methods

# Stochastic rules: whether a method injects noise of its own, given its eta. Churn
# (methods with `churn=True`, `s_churn > 0`) adds noise to any of them.
_NOISE_RULES: dict[str, Callable[[float], bool]] = {
    "never": lambda eta: False,
    "always": lambda eta: True,
    "eta": lambda eta: eta > 0,
}


class Placements(NamedTuple):
    """A method's default step placements (`step_times` names), one per schedule kind.

    Chosen by `benchmarks/samplers.py --study` (docs/samplers.md, "Why these defaults").

    Attributes:
      discrete: on discrete-time schedules (`discrete_vp`, any betas).
      continuous: on continuous ones other than `edm` and `flow` (`continuous_vp`).
      edm: on `edm`.
      flow: on `flow`.
    """

    discrete: str
    continuous: str
    edm: str
    flow: str


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything about one sampler; `sample` reads nothing else.

    Adding a method is one record here plus its `CoefficientBuilder`.

    Attributes:
      name: key in `METHODS`.
      order: convergence order of the deterministic ODE solver (stochastic: weak order
        of the underlying scheme, informational).
      description: one line for docs and errors.
      coefficients: the builder of its per-step coefficients (`CoefficientBuilder`).
      placements: its default step placements.
      history: how many earlier x0 predictions its update uses (multistep methods).
      correction: the second evaluation per step (Heun-type), or None.
      eta: default eta, or None when the method takes no `eta=` (its builder gets 0).
      churn: whether it takes EDM churn (`s_churn`, ...).
      noise: its stochastic rule, a key of `_NOISE_RULES` (`never`, `always`, or `eta`:
        when eta > 0).
    """

    name: str
    order: int
    description: str
    coefficients: CoefficientBuilder
    placements: Placements
    history: int = 0
    correction: Correction | None = None
    eta: float | None = None
    churn: bool = False
    noise: str = "never"

    def __post_init__(self) -> None:
        if self.noise not in _NOISE_RULES:
            raise ValueError(f"{self.name}: unknown noise rule {self.noise!r}")

    @property
    def evals_per_step(self) -> int:
        """1, or 2 with a `correction` (whose last step is Euler, see `nfe`)."""
        return 1 if self.correction is None else 2

    @property
    def stochastic(self) -> bool:
        """Whether it injects noise with its default options (then `sample` needs a key)."""
        return self.injects_noise(self.eta or 0.0, 0.0)

    def injects_noise(self, eta: float, s_churn: float) -> bool:
        """Whether a run with these options is stochastic."""
        return _NOISE_RULES[self.noise](eta) or (self.churn and s_churn > 0)

    def nfe(self, num_steps: int) -> int:
        """Network evaluations for `num_steps` steps (Heun-type: 2N - 1).

        `heun` started at SNR 0 takes its first step as Euler and uses 2N - 2.
        """
        return self.evals_per_step * num_steps - (self.evals_per_step - 1)

    def placement(self, schedule: Schedule) -> str:
        """Its default placement on `schedule`."""
        if schedule.is_discrete:
            return self.placements.discrete
        if schedule.name in ("edm", "flow"):
            return getattr(self.placements, schedule.name)
        return self.placements.continuous


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "ddpm",
            1,
            "ancestral (posterior variance)",
            _ddpm_coeffs,
            Placements("leading_sd", "trailing", "karras", "trailing"),
            noise="always",
        ),
        Method(
            "ddim",
            1,
            "DDIM with eta (0: deterministic)",
            _ddim_coeffs,
            Placements("leading_sd", "linspace", "karras", "trailing"),
            eta=0.0,
            noise="eta",
        ),
        Method(
            "dpmpp_2m",
            2,
            "DPM-Solver++(2M), multistep",
            _dpmpp_2m_coeffs,
            Placements("logsnr", "logsnr", "logsnr", "trailing"),
            history=1,
        ),
        Method(
            "dpmpp_3m",
            3,
            "DPM-Solver++(3M), multistep",
            _dpmpp_3m_coeffs,
            Placements("logsnr", "logsnr", "logsnr", "logsnr"),
            history=2,
        ),
        Method(
            "dpmpp_2m_sde",
            2,
            "SDE-DPM-Solver++(2M), midpoint",
            _dpmpp_2m_coeffs,
            Placements("logsnr", "logsnr", "logsnr", "logsnr"),
            history=1,
            eta=1.0,
            noise="eta",
        ),
        Method(
            "euler",
            1,
            "EDM Euler in sigma/alpha, churn",
            _euler_coeffs,
            Placements("leading_sd", "linspace", "karras", "trailing"),
            churn=True,
        ),
        Method(
            "heun",
            2,
            "EDM Heun in sigma/alpha, churn",
            _heun_coeffs,
            Placements("leading_sd", "linspace", "karras", "trailing"),
            correction=HEUN,
            churn=True,
        ),
        Method(
            "flow_euler",
            1,
            "Euler in the flow time",
            _euler_coeffs,
            Placements("leading_sd", "linspace", "karras", "trailing"),
        ),
        Method(
            "flow_heun",
            2,
            "Heun in the flow time",
            _flow_heun_coeffs,
            Placements("logsnr", "logsnr", "logsnr", "linspace_eps"),
            correction=FLOW_HEUN,
        ),
    )
}


def default_placement(method: str, schedule: Schedule) -> str:
    """The placement `sample` uses for `method` on `schedule` when none is given.

    The method's `Placements` entry for the schedule's kind (discrete, edm, flow, or
    other continuous), chosen by `benchmarks/samplers.py --study` (docs/samplers.md).
    """
    return _method(method).placement(schedule)


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
    return a_src, s_src, t_src, churn_x, churn_z


def _snr0_stand_in(
    schedule: Schedule, prediction: str, *alphas: np.ndarray
) -> tuple[float, float, float] | None:
    """Where an epsilon network would be asked at SNR 0: (t, alpha, sigma) to ask instead.

    The schedule's noisiest finite log-SNR (module docstring); None if not needed.
    """
    if prediction != "epsilon" or not any(np.any(a == 0) for a in alphas):
        return None
    t_shift = float(_np_eval(schedule.t_from_logsnr, schedule.logsnr_range[0]))
    ash, ssh = (float(v) for v in _np_eval(schedule.alpha_sigma, t_shift))
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
    a, s = _np_eval(schedule.alpha_sigma, ts)
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

    def final(self, tab: _Tables, x: Array, keys: Array | None) -> Array:
        """The last step, to the clean point: the x0 prediction at the last point."""
        e = {n: jnp.asarray(v[-1], self.dtype) for n, v in tab.ev.items()}
        x = self.apply_churn(x, e, None if keys is None else jax.random.split(keys[-1])[0])
        return self.denoise(x, e)[0]


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
    a0, s0 = _np_eval(schedule.alpha_sigma, ts[0])
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

    # Integrate, then the final step to the clean point.
    traj = [x[None]] if return_trajectory else None
    x = solver.integrate(tab, x, keys, traj)
    x0 = solver.final(tab, x, keys)
    if traj is None:
        return x0
    traj.append(x0[None])
    return x0, jnp.concatenate(traj, axis=0)
