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

Editing: `inpaint_known`/`inpaint_mask` inpaint with any model (the known region of
every state the model sees is the original noised to that state's level; the sample
pastes it back exactly), optionally with RePaint resampling (`jump_length`,
`jump_n_sample`: the run's transitions follow `repaint_schedule`, still one `lax.scan`);
`diffjax.diffusion.editing` has the entry points and the inversion.

The method records live in `diffjax.diffusion.methods`, the placements in
`diffjax.diffusion.placements`; their public names are re-exported here. The grid
pieces `coefficients`, `eval_points`, `snr0_stand_in`, `final_point` and the per-step
arithmetic `Solver` are shared with `editing.invert`, which runs them on reversed grids.
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
    "repaint_nfe",
    "repaint_schedule",
    "sample",
    "step_times",
    "step_window",
    "strength_steps",
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
    grid: Transitions | None = None  # what `step` was built from (restarts rebuild from it)
    eta: float = 0.0


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


def snr0_stand_in(
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


def eval_points(
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
    stand_in = snr0_stand_in(schedule, prediction, a_src, a)

    # Evaluations at the (churned) start of each step, and at the grid points themselves
    # (Heun's second evaluation lands on the next grid point, not on a churned one).
    ev = dict(**eval_points(t_src, a_src, s_src, stand_in), churn_x=churn_x, churn_z=churn_z)
    ev_grid = eval_points(ts.copy(), a, s, stand_in)
    grid = Transitions(
        a_s=a_src[:-1],
        s_s=s_src[:-1],
        lam_s=lam_src[:-1],
        a_d=a[1:],
        s_d=s[1:],
        lam_d=lam[1:],
        h=lam[1:] - lam_src[:-1],
    )
    step = coefficients(m, grid, eta)
    for name, arr in {**ev, **step, **{f"grid_{n}": v for n, v in ev_grid.items()}}.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"non-finite {name} coefficients for method {m.name!r} on {schedule!r} "
                f"at times {ts}; choose another placement"
            )
    return _Tables(ev=ev, ev_grid=ev_grid, step=step, grid=grid, eta=eta)


def coefficients(m: Method, grid: Transitions, eta: float) -> dict[str, np.ndarray]:
    """`m`'s per-step coefficients on `grid` (infinite intermediate values allowed)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return m.coefficients(grid, eta)


# --------------------------------------------------------------------------- the run's plan


def repaint_schedule(
    num_steps: int, jump_length: int, jump_n_sample: int
) -> tuple[np.ndarray, np.ndarray]:
    """RePaint's resampling schedule (Lugmayr et al. 2022, `get_schedule_jump`) on a grid
    of `num_steps` evaluation points `0 .. K-1` (0 the noisiest).

    The points `p = K-1-j` for `j = 0, L, 2L, ... < K - L` (`L = jump_length`; RePaint's
    levels `j` counted from the least noisy point) are jump points: on arriving at one,
    the state is re-noised back to point `p - L` and the `L` steps to `p` are redone,
    `jump_n_sample - 1` times, before the run goes on. Transitions taken:
    `K - 1 + J (jump_n_sample - 1) L`, `J` the number of jump points.

    Returns:
      (points, jumps): int [T] the point each transition starts from (it ends at
      `points + 1`), bool [T] whether the state is re-noised `L` points back after it.
    """
    k, big_l, r = int(num_steps), int(jump_length), int(jump_n_sample)
    left = {k - 1 - j: r - 1 for j in range(0, k - big_l, big_l)}
    points, jumps = [], []
    i = 0
    while i < k - 1:
        points.append(i)
        i += 1
        jump = left.get(i, 0) > 0
        jumps.append(jump)
        if jump:
            left[i] -= 1
            i -= big_l
    return np.asarray(points, np.int64), np.asarray(jumps, bool)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The transitions of a run in order, float64/NumPy, built at trace time.

    Transition `n` steps from point `points[n]` to `points[n] + 1` with the
    coefficients `step[...][n]`; plain sampling is `points = 0 .. K-2`.
    """

    points: np.ndarray  # int [T]
    step: dict[str, np.ndarray]  # per transition
    restart: np.ndarray | None = None  # bool [T]: a new pass (history cleared) or None
    jump: dict[str, np.ndarray] | None = None  # jr, jq [T]: x <- jr x + jq z after it

    @property
    def size(self) -> int:
        return int(self.points.size)


def _plan(tab: _Tables, m: Method, repaint: tuple[int, int] | None) -> _Plan:
    """Plain sampling's transitions, or RePaint's (`repaint = (jump_length, n_sample)`).

    After a jump a multistep method starts a new pass: its history is cleared and its
    coefficients are those of a grid that begins at the point it jumped back to (so its
    warm-up steps are redone too). The jump is the exact forward transition of the
    state from grid point q to the noisier point p = q - L,
    `x_p = (alpha_p / alpha_q) x_q + sqrt(sigma_p^2 - (alpha_p / alpha_q)^2 sigma_q^2) z`.
    """
    k = tab.ev["t"].size
    if repaint is None:
        return _Plan(points=np.arange(k - 1), step=tab.step)
    big_l = repaint[0]
    points, jumps = repaint_schedule(k, *repaint)
    restart = np.concatenate([[False], jumps[:-1]])
    # The point each transition's pass started from.
    origin = np.zeros_like(points)
    for n in range(1, points.size):
        origin[n] = points[n] if restart[n] else origin[n - 1]
    if m.history == 0:
        step = {c: v[points] for c, v in tab.step.items()}
    else:
        subs = {}
        for p in np.unique(origin):
            g = tab.grid
            sub = Transitions(**{f.name: getattr(g, f.name)[p:] for f in dataclasses.fields(g)})
            subs[int(p)] = coefficients(m, sub, tab.eta)
        step = {
            c: np.asarray([subs[int(o)][c][q - o] for q, o in zip(points, origin, strict=True)])
            for c in tab.step
        }
    a, s = tab.ev_grid["a_pt"], tab.ev_grid["s_pt"]
    q = points + 1
    p = np.maximum(q - big_l, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(a) - np.log(s)
        jr = np.where(jumps, a[p] / a[q], 1.0)
        jq = np.where(jumps, s[p] * np.sqrt(np.maximum(-np.expm1(2.0 * (lam[p] - lam[q])), 0)), 0)
    jump = {"jr": jr, "jq": jq}
    for name, arr in {**step, **jump}.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"non-finite RePaint {name} coefficients for method {m.name!r}")
    return _Plan(points=points, step=step, restart=restart, jump=jump)


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
    """The evaluation times of this run: the whole grid, or its last
    `round(num_steps * strength)` points (half up, at least one) for `strength < 1`."""
    ts = step_times(schedule, num_steps, placement, rho=rho)
    if strength < 1.0:
        ts = ts[num_steps - strength_steps(num_steps, strength) :]
    return ts


def strength_steps(num_steps: int, strength: float) -> int:
    """Steps (and network evaluations of a one-evaluation method) an img2img run with
    `strength` takes: `round(num_steps * strength)`, halves up, at least 1."""
    return max(1, min(int(num_steps), math.floor(num_steps * strength + 0.5)))


def final_point(
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
class _Inpaint:
    """Blend inpainting: the known region of every state the model sees is the
    forward-noised original at that state's noise level.

    Attributes:
      known: [B, ...] the original.
      regen: bool, broadcastable to it: True where the sample is generated.
      fixed: the one noise used for the known region at every level ([B, ...]), or None
        for a fresh draw at every evaluation.
    """

    known: Array
    regen: Array
    fixed: Array | None

    def blend(self, x: Array, a: Array, s: Array, key: Array | None) -> Array:
        z = self.fixed if self.fixed is not None else jax.random.normal(key, x.shape, x.dtype)
        return jnp.where(self.regen, x, a * self.known + s * z)

    def paste(self, x: Array) -> Array:
        return jnp.where(self.regen, x, self.known)


@dataclasses.dataclass(frozen=True)
class Solver:
    """One run's per-step arithmetic, with the model and every static option bound."""

    model_fn: ModelFn
    method: Method
    prediction: str
    dtype: Any
    clip_x0: bool
    dynamic_threshold: float | None
    recompute_eps: bool  # eps from the clipped x0, or where the model ran elsewhere
    churn: bool
    inpaint: _Inpaint | None = None

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

    def blend(self, x: Array, e: dict[str, Array], key: Array | None) -> Array:
        """Inpainting: the known region at the level of the state `x` (`a_pt`, `s_pt`:
        at SNR 0 that is pure noise, wherever an epsilon network is asked instead)."""
        if self.inpaint is None:
            return x
        return self.inpaint.blend(x, e["a_pt"], e["s_pt"], key)

    def apply_churn(self, x: Array, e: dict[str, Array], key: Array | None) -> Array:
        if not self.churn:
            return x
        z = jax.random.normal(key, x.shape, self.dtype)
        return e["churn_x"] * x + e["churn_z"] * z

    def step(self, carry: tuple, xs: tuple, *, second_order: bool = True) -> tuple[tuple, Array]:
        """One transition i -> i+1: `lax.scan` body over (ev, step, ev_grid[i+1], key,
        edit), `edit` holding the transition's inpainting key and RePaint restart flag
        and jump (`x <- jr x + jq z` after the step), each None when not used."""
        x, hist = carry
        e, c, e_next, key, ed = xs
        k_churn, k_step = (None, None) if key is None else tuple(jax.random.split(key))
        k_blend, k_pred, k_jump = (
            (None,) * 3 if ed["key"] is None else tuple(jax.random.split(ed["key"], 3))
        )
        if ed["restart"] is not None:  # a new RePaint pass: no history from the last one
            hist = tuple(jnp.where(ed["restart"], jnp.zeros_like(h), h) for h in hist)
        x = self.apply_churn(x, e, k_churn)
        x = self.blend(x, e, k_blend)
        x0, eps = self.denoise(x, e)
        x_new = c["cx"] * x + c["c0"] * x0
        for j in range(self.method.history):
            x_new = x_new + c[f"c{j + 1}"] * hist[j]
        if "cz" in c:
            x_new = x_new + c["cz"] * jax.random.normal(k_step, x.shape, self.dtype)
        corr = self.method.correction
        if corr is not None and second_order:
            nxt = self.denoise(self.blend(x_new, e_next, k_pred), e_next)
            x_new = x_new + corr.update(c["ch"], (x0, eps), nxt)
        hist = ((x0,) + hist)[: self.method.history]
        if ed["jr"] is not None:
            x_new = ed["jr"] * x_new + ed["jq"] * jax.random.normal(k_jump, x.shape, self.dtype)
        return (x_new, hist), x_new

    def integrate(
        self,
        tab: _Tables,
        plan: _Plan,
        x: Array,
        keys: Array | None,
        edit_keys: Array | None,
        traj: list[Array] | None,
    ) -> Array:
        """Every transition of `plan`: the state at the last evaluation point."""
        cast = lambda d: {n: jnp.asarray(v, self.dtype) for n, v in d.items()}  # noqa: E731
        pts = plan.points
        xs = (
            cast({n: v[pts] for n, v in tab.ev.items()}),
            cast(plan.step),
            cast({n: v[pts + 1] for n, v in tab.ev_grid.items()}),
            None if keys is None else keys[: plan.size],
            {
                "key": None if edit_keys is None else edit_keys[: plan.size],
                "restart": None if plan.restart is None else jnp.asarray(plan.restart),
                "jr": None if plan.jump is None else jnp.asarray(plan.jump["jr"], self.dtype),
                "jq": None if plan.jump is None else jnp.asarray(plan.jump["jq"], self.dtype),
            },
        )
        carry = (x, tuple(jnp.zeros_like(x) for _ in range(self.method.history)))
        first = 0
        corr = self.method.correction
        if corr is not None and corr.euler_from_snr0 and plan.size and tab.ev["a_pt"][0] == 0:
            # The trapezoid needs a finite first step; from SNR 0 take it as Euler. (A
            # RePaint pass that restarts there has `ch = 0`: Euler, one evaluation spent.)
            carry, y = self.step(carry, jax.tree.map(lambda v: v[0], xs), second_order=False)
            first = 1
            if traj is not None:
                traj.append(y[None])
        if plan.size > first:
            carry, ys = jax.lax.scan(self.step, carry, jax.tree.map(lambda v: v[first:], xs))
            if traj is not None:
                traj.append(ys)
        return carry[0]

    def final(
        self,
        tab: _Tables,
        x: Array,
        key: Array | None,
        edit_key: Array | None,
        end: tuple[float, float] | None = None,
    ) -> Array:
        """The last step: the x0 prediction at the last point (the clean point), or,
        with `end = (alpha, sigma)` of `t_final`, the deterministic DDIM step there;
        inpainting pastes the known region back exactly."""
        e = {n: jnp.asarray(v[-1], self.dtype) for n, v in tab.ev.items()}
        x = self.apply_churn(x, e, None if key is None else jax.random.split(key)[0])
        x = self.blend(x, e, edit_key)
        x0, eps = self.denoise(x, e)
        if end is not None:
            x0 = jnp.asarray(end[0], self.dtype) * x0 + jnp.asarray(end[1], self.dtype) * eps
        return x0 if self.inpaint is None else self.inpaint.paste(x0)


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


INPAINT_NOISE = ("fresh", "fixed")
# The editing noise's key is `fold_in(key, _EDIT_STREAM)`: `fold_in(key, i)` is the i-th
# key of `split(key, n)` (threefry, partitionable), so a small constant would reuse one
# of the method's per-step keys.
_EDIT_STREAM = 2**32 - 1


def _check_inpaint(
    noise: Array,
    *,
    known: Array | None,
    mask: Array | None,
    inpaint_noise: str,
    jump_length: int | None,
    jump_n_sample: int,
    key: Array | None,
    num_run: int,
) -> tuple[int, int] | None:
    """Refuses inconsistent editing options -> RePaint's (jump_length, jump_n_sample)."""
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both inpaint_known= and inpaint_mask= (or neither)")
    for name, v in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if known is None:
        if jump_length is not None or jump_n_sample != 1:
            raise ValueError(
                "jump_length/jump_n_sample (RePaint resampling) apply to inpainting: "
                "pass inpaint_known= and inpaint_mask="
            )
        return None
    if tuple(known.shape) != tuple(noise.shape):
        raise ValueError(
            f"inpaint_known has shape {tuple(known.shape)}, the noise {tuple(noise.shape)}: "
            "they must match"
        )
    mask_shape = tuple(jnp.shape(mask))
    try:
        fits = np.broadcast_shapes(mask_shape, tuple(noise.shape)) == tuple(noise.shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"inpaint_mask of shape {mask_shape} does not broadcast to the samples' shape "
            f"{tuple(noise.shape)}; give [B, ...] or a shape that broadcasts (e.g. [1, H, W, 1])"
        )
    if inpaint_noise not in INPAINT_NOISE:
        raise ValueError(f"inpaint_noise must be one of {INPAINT_NOISE}, got {inpaint_noise!r}")
    repaint = jump_n_sample > 1
    if key is None and (inpaint_noise == "fresh" or repaint):
        why = "RePaint re-noises the state" if repaint else "inpaint_noise='fresh' draws noise"
        raise ValueError(f"inpainting: {why} at every step; pass key=")
    if not repaint:
        return None
    if jump_length is None:
        raise ValueError("jump_n_sample > 1 (RePaint) needs jump_length= (RePaint uses 10)")
    if jump_length >= num_run:
        raise ValueError(
            f"jump_length={jump_length} with {num_run} steps leaves no point to jump from; "
            f"RePaint needs jump_length < the number of steps run"
        )
    return int(jump_length), int(jump_n_sample)


def repaint_nfe(method: str, num_steps: int, jump_length: int, jump_n_sample: int) -> int:
    """Network evaluations of an inpainting run with RePaint resampling.

    `nfe(method, T + 1)` for the `T = K - 1 + J (jump_n_sample - 1) jump_length`
    transitions of `repaint_schedule` (K = `num_steps`, J jump points) and the last
    step; `jump_n_sample = 1` is plain sampling's `nfe(method, num_steps)`.
    """
    return nfe(method, repaint_schedule(num_steps, jump_length, jump_n_sample)[0].size + 1)


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
    inpaint_known: Array | None = None,
    inpaint_mask: Array | None = None,
    inpaint_noise: str = "fresh",
    jump_length: int | None = None,
    jump_n_sample: int = 1,
    return_trajectory: bool = False,
) -> Array | tuple[Array, Array]:
    """Draws samples by integrating from noise to data (optionally inpainting).

    Jittable as a whole: bind everything except `noise`, `key`, `init_image`,
    `inpaint_known` and `inpaint_mask` with `functools.partial` before `jax.jit`. The model is called as
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
        `round(num_steps * strength)` steps of the grid (`strength_steps`: halves up, at
        least 1), starting from `init_image` noised to the first of them; strength 1 is
        plain sampling from `noise`.
      init_image: [B, ...] data for `strength < 1`.
      t_final: None (the last step goes to the clean point and returns the x0
        prediction), or a time in `[t_min, t_last)` (`t_last` the last evaluation time)
        where the last step lands instead, with the deterministic DDIM update
        `alpha(t_final) x0 + sigma(t_final) eps` from the last evaluation: diffusers'
        DDIM with `set_alpha_to_one=False` ends at `t_final = 0` (alpha_bar[0]) this way.
        Refused for runs that inject noise of their own (`ddpm`, `eta > 0`).
      inpaint_known: [B, ...] the image to inpaint (same shape as `noise`): blend
        inpainting with any model. Before every network evaluation the known region of
        the state is replaced by `alpha known + sigma z` at the state's own noise level
        (after churn; for Heun's second evaluation too; the x0 history of multistep
        methods stays the network's predictions), and the sample is
        `where(mask, x0, known)`: known pixels are returned bit-exact.
      inpaint_mask: 1 (>= 0.5) where to generate, 0 where to keep `inpaint_known`;
        [B, ...] or broadcastable to it (e.g. [1, H, W, 1]).
      inpaint_noise: `fresh` (a new z from `key` at every evaluation, RePaint's choice)
        or `fixed` (z = `noise` at every level, diffusers' inpainting pipelines; then a
        deterministic method needs no key).
      jump_length, jump_n_sample: RePaint resampling (Lugmayr et al. 2022; they use 10
        and 10): see `repaint_schedule`; `jump_n_sample = 1` (default) is none. Every
        method is allowed; after a jump a multistep method starts a new pass (history
        cleared). NFE: `repaint_nfe`. Needs `key`.
      return_trajectory: also return the states [T+2, B, ...]: the start, the state
        after each of the T transitions (plain sampling: T = K - 1, K = steps run; with
        RePaint, after a jump, the re-noised state) and the final sample.

    Returns:
      Samples [B, ...] float32 (and the trajectory).

    Raises:
      ValueError: unknown method/placement/prediction, a missing key, bad strength, a
        `t_final` outside `[t_min, t_last)` or on a noise-injecting run, options the
        method does not take, or inpainting inputs of the wrong shape.
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

    # Initialise: the grid, its coefficient tables, the transitions and the start point.
    ts = _run_times(schedule, num_steps, placement, rho, strength)
    repaint = _check_inpaint(
        noise,
        known=inpaint_known,
        mask=inpaint_mask,
        inpaint_noise=inpaint_noise,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        key=key,
        num_run=ts.size,
    )
    end = final_point(schedule, m, eta, ts, t_final)
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
    plan = _plan(tab, m, repaint)
    dtype = jnp.promote_types(noise.dtype, jnp.float32)
    noise = noise.astype(dtype)
    a0, s0 = np_eval(schedule.alpha_sigma, ts[0])
    x = s0 * noise if strength >= 1.0 else a0 * init_image.astype(dtype) + s0 * noise
    x = x.astype(dtype)
    moved = any(bool(np.any(e["a_ev"] != e["a_pt"])) for e in (tab.ev, tab.ev_grid))
    inpaint = None
    if inpaint_known is not None:
        inpaint = _Inpaint(
            known=jnp.asarray(inpaint_known).astype(dtype),
            regen=jnp.asarray(inpaint_mask) >= 0.5,
            fixed=noise if inpaint_noise == "fixed" else None,
        )
    solver = Solver(
        model_fn=model_fn,
        method=m,
        prediction=prediction,
        dtype=dtype,
        clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold,
        recompute_eps=clip_x0 or dynamic_threshold is not None or moved,
        churn=s_churn > 0,
        inpaint=inpaint,
    )
    # The method's own keys as in plain sampling; the editing noise from another stream.
    keys = jax.random.split(key, plan.size + 1) if stochastic else None
    edit_keys = None
    if inpaint is not None and (inpaint.fixed is None or repaint is not None):
        edit_keys = jax.random.split(jax.random.fold_in(key, _EDIT_STREAM), plan.size + 1)

    # Integrate, then the final step to the clean point (or to t_final).
    traj = [x[None]] if return_trajectory else None
    x = solver.integrate(tab, plan, x, keys, edit_keys, traj)
    x0 = solver.final(
        tab,
        x,
        None if keys is None else keys[-1],
        None if edit_keys is None else edit_keys[-1],
        end,
    )
    if traj is None:
        return x0
    traj.append(x0[None])
    return x0, jnp.concatenate(traj, axis=0)
