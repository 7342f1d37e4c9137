"""Sampler methods: one `Method` record per method in `METHODS`, and what they own.

A record holds its coefficient builder (a function of the step grid, `Transitions`, and
eta, in float64 NumPy), its x0 history, its second evaluation per step (`Correction`:
`HEUN`, `FLOW_HEUN`), its eta, churn and noise rules and its default `Placements`.
`samplers.sample` reads nothing else about a method, so adding one touches only this
module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from diffjax.diffusion.schedules import Schedule

Array = jax.Array


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


def _unipc_coeffs(g: Transitions, eta: float) -> dict[str, np.ndarray]:
    """UniPC (Zhao et al. 2023), UniP-2 + UniC-2 with B(h) = e^h - 1 (`bh2`), x0 form.

    Diffusers' UniPCMultistepScheduler with `solver_order=2`, `solver_type='bh2'`,
    `predict_x0=True`, `lower_order_final=True`. With `phi = 1 - e^-h`, `1/r = h/h_prev`
    and `m_j` the x0 prediction at point j:

    * UniP (predictor) from point i: `x_{i+1} = (s_d/s_s) x^c_i + a_d phi (m_i +
      rho_p D1)`, `D1 = (m_i - m_{i-1})/r`, `rho_p = 1/2` (diffusers' order-2 value),
      i.e. DPM-Solver++(2M); order 1 on the first step. The model runs at `x_{i+1}`.
    * UniC (corrector) of point i+1, once `m_{i+1}` is known: the same update from
      `x^c_i` with `rho_c . (D1, m_{i+1} - m_i)` in place of `rho_p D1`, where `rho_c`
      solves the order conditions `sum_k rho_k r_k^(n-1) = n! h phi_{n+1}(h) / B(h)`,
      n = 1, 2 (in the x0 form h -> -h: `b1 = 1/phi - 1/h`, `b2 = (1 - 2 (1 - phi/h)/h)
      / phi`, with `r_1 = -h_prev/h`, `r_2 = 1`). After the first step, whose
      predictor is first order, UniC-1 with diffusers' `rho = 1/2`.

    `x^c_{i+1} - x_{i+1}` is linear in `(m_{i+1}, m_i, m_{i-1})`, so the corrector folds
    into step i+1's coefficients (no extra evaluation, history 2). The last evaluation's
    corrector is not applied: the final step returns its x0, as diffusers' order-1 last
    step to sigma = 0 does. Local errors O(h^4) from the third point on: order 3.

    From SNR 0 (`h = inf` on the first step) `phi = 1` and `1/r = 0` on the step after:
    its predictor is first order and its UniC-2 reduces to UniC-1 with `rho = b1`
    (`rho_D1 / r_1 -> 0`); every coefficient stays finite.
    """
    del eta
    h, a_d = g.h, g.a_d
    n = h.size
    cx = g.s_d / g.s_s
    phi = -np.expm1(-h)  # 1 - e^-h = -B(-h)
    inv_r = np.zeros_like(h)
    inv_r[1:] = h[1:] / h[:-1]  # 0 after the infinite step from SNR 0
    # UniP-2 (order 1 on the first step, where inv_r = 0).
    c0 = a_d * phi * (1.0 + 0.5 * inv_r)
    c1 = -a_d * phi * 0.5 * inv_r
    c2 = np.zeros_like(h)
    # UniC of point j+1 (the end of step j), folded into step j+1.
    for j in range(n - 1):
        if j == 0:
            w_new, w_0, w_1 = 0.5, -0.5, 0.0  # UniC-1, rho_c = 1/2
        else:
            hj, ir = h[j], inv_r[j]
            b1 = 1.0 / phi[j] - 1.0 / hj
            b2 = (1.0 - 2.0 * (1.0 - phi[j] / hj) / hj) / phi[j]
            # R = [[1, 1], [r_1, 1]], r_1 = -1/ir: rho_D1 = (b1 - b2)/(1 - r_1).
            rho_d1 = (b1 - b2) * ir / (1.0 + ir)
            rho_new = b1 - rho_d1
            d = (rho_d1 - 0.5) * ir  # (rho_c - rho_p) on D1 = ir (m_j - m_{j-1})
            w_new, w_0, w_1 = rho_new, d - rho_new, -d
        k = cx[j + 1] * a_d[j] * phi[j]
        c0[j + 1] += k * w_new
        c1[j + 1] += k * w_0
        c2[j + 1] += k * w_1
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
            "unipc",
            3,
            "UniPC (bh2): UniP-2 + UniC, multistep",
            _unipc_coeffs,
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
    return get_method(method).placement(schedule)


def nfe(method: str, num_steps: int) -> int:
    """Network evaluations of `method` with `num_steps` steps."""
    return get_method(method).nfe(num_steps)


def get_method(name: str) -> Method:
    """The record of method `name`; ValueError naming the known ones if there is none."""
    if name not in METHODS:
        raise ValueError(f"unknown sampler method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]
