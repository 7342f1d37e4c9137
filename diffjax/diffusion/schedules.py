"""Noise schedules: the map from a schedule's own time `t` to `(alpha, sigma)`.

A noisy sample is `x_t = alpha(t) * x0 + sigma(t) * eps` with `eps ~ N(0, I)`. Every
schedule is an immutable `Schedule` built by a factory that validates its
hyper-parameters once; the schedule holds pure closures and constant arrays, no
hidden state, so it can be closed over by jitted code.

Time conventions (what `model_fn(x, t)` receives and what `alpha_sigma` takes):

* `discrete_vp`: `t` is the training timestep index as a float in `[0, N-1]`
  (`t = 0` is the least noisy trained step). Between integer indices the log-SNR is
  interpolated linearly, so solvers may step anywhere. With zero terminal SNR the
  last interval `[N-2, N-1]` interpolates `alpha` linearly down to exactly 0,
  because log-SNR is `-inf` at `N-1`.
* `continuous_vp`: `t` in `[0, 1]`, score_sde's VP SDE
  (`log alpha = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2`).
* `edm`: `t = sigma` (Karras et al. 2022), `alpha = 1`.
* `flow`: rectified flow, `alpha = 1 - t`, `sigma = t`, `t` in `[0, 1]`.

Besides `alpha_sigma`, a schedule exposes `logsnr(t)`, its inverse `t_from_logsnr`,
the training-time distribution `sample_t`, the sampling range `t_min`/`t_max`, the
time `t_clean` at which `sigma = 0` (the end point every sampler steps to), a finite
log-SNR range for step placements, and `precondition` (identity except EDM).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[..., Array]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SCHEDULES = ("discrete_vp", "continuous_vp", "edm", "flow")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """An immutable noise schedule (see the module docstring for time conventions).

    Attributes:
      name: factory name (`discrete_vp`, `continuous_vp`, `edm`, `flow`).
      alpha_sigma: `t [...] -> (alpha [...], sigma [...])`, float32.
      logsnr: `t [...] -> log(alpha^2 / sigma^2) [...]`, decreasing in `t`; `-inf` where
        `alpha = 0`, `+inf` where `sigma = 0`.
      t_from_logsnr: inverse of `logsnr` (clipped to `[t_min, t_max]`).
      sample_t: `(key, shape) -> t [shape]`, the training-time distribution of `t`.
      t_min: smallest time a sampler evaluates the model at.
      t_max: largest time; sampling starts here.
      t_clean: time at which `sigma = 0`, `alpha = 1` (the data); samplers end here.
        Not necessarily inside `[t_min, t_max]` (discrete VP uses -1).
      logsnr_range: finite `(lo, hi)` log-SNR range used by step placements that are
        uniform in log-SNR or in Karras sigma.
      precondition: `net_fn -> model_fn` (identity except EDM).
      num_timesteps: number of training timesteps for discrete schedules, else None.
      sigma_data: data standard deviation assumed by EDM preconditioning, else None.
      hparams: the validated hyper-parameters, for export and reprs.
    """

    name: str
    alpha_sigma: Callable[[Array], tuple[Array, Array]]
    logsnr: Callable[[Array], Array]
    t_from_logsnr: Callable[[Array], Array]
    sample_t: Callable[[Array, tuple[int, ...]], Array]
    t_min: float
    t_max: float
    t_clean: float
    logsnr_range: tuple[float, float]
    precondition: Callable[[ModelFn], ModelFn]
    num_timesteps: int | None = None
    sigma_data: float | None = None
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_discrete(self) -> bool:
        """Whether the model was trained on integer timesteps only."""
        return self.num_timesteps is not None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"Schedule({self.name}: {args})"


def _identity_precondition(net_fn: ModelFn) -> ModelFn:
    return net_fn


def _alpha_sigma_from_logsnr(lam: Array) -> tuple[Array, Array]:
    # sigmoid is exact at +-inf, so SNR 0 gives (0, 1) and SNR inf gives (1, 0).
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


def _f32(t: Array) -> Array:
    t = jnp.asarray(t)
    return t.astype(jnp.promote_types(t.dtype, jnp.float32))


# --------------------------------------------------------------------------- discrete VP


def discrete_betas(
    beta_schedule: str, beta_start: float, beta_end: float, num_timesteps: int
) -> np.ndarray:
    """The beta table of a discrete VP schedule, float64 [N].

    `linear`: DDPM (Ho et al. 2020); `scaled_linear`: Stable Diffusion (linear in
    sqrt(beta)); `cosine`: Nichol & Dhariwal 2021 (offset s = 0.008, betas clipped at
    0.999; `beta_start`/`beta_end` unused).
    """
    n = num_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "cosine":
        s = 0.008
        steps = np.arange(n + 1, dtype=np.float64) / n
        abar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last is exactly 0.

    Keeps sqrt(alpha_bar[0]) unchanged. Args/returns: float64 [N].
    """
    sqrt_ab = np.sqrt(alphas_cumprod)
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab**2


def discrete_vp(
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_timesteps: int = 1000,
    zero_terminal_snr: bool = False,
) -> Schedule:
    """Discrete-time VP schedule (DDPM family) with `t` = timestep index in `[0, N-1]`.

    Args:
      beta_schedule: `linear` | `scaled_linear` | `cosine`.
      beta_start: first beta (linear/scaled_linear).
      beta_end: last beta (linear/scaled_linear).
      num_timesteps: number of training timesteps N (>= 2).
      zero_terminal_snr: rescale so that alpha_bar[N-1] = 0 exactly (Lin et al. 2023).
        Use with v or x0 prediction; epsilon prediction is uninformative at SNR 0 (the
        samplers handle it, see `samplers`).

    Returns:
      A `Schedule`; `sample_t` draws integer timesteps uniformly (as float32).
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}"
        )
    if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if beta_schedule != "cosine" and not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    betas = discrete_betas(beta_schedule, beta_start, beta_end, num_timesteps)
    abar = np.cumprod(1.0 - betas)
    if zero_terminal_snr:
        abar = rescale_zero_terminal_snr(abar)
    with np.errstate(divide="ignore"):
        lam_table = np.log(abar) - np.log1p(-abar)  # float64; -inf at a zero-SNR end
    if not np.all(np.diff(lam_table) < 0):
        raise ValueError("the beta table does not give a strictly decreasing log-SNR")
    n = num_timesteps
    zero_end = bool(abar[-1] == 0.0)
    last_finite = n - 2 if zero_end else n - 1
    idx = np.arange(last_finite + 1, dtype=np.float32)
    lam_finite = lam_table[: last_finite + 1].astype(np.float32)
    alpha_pen = float(np.sqrt(abar[n - 2]))  # alpha at N-2, start of the zero-SNR interval

    def logsnr(t: Array) -> Array:
        t = jnp.clip(_f32(t), 0.0, n - 1)
        lam = jnp.interp(t, idx, lam_finite)
        if not zero_end:
            return lam
        # Last interval: alpha linear from alpha[N-2] to 0 so that alpha(N-1) = 0 exactly.
        w = jnp.clip(t - (n - 2), 0.0, 1.0)
        a = alpha_pen * (1.0 - w)
        lam_end = 2.0 * jnp.log(a) - jnp.log1p(-(a * a))
        return jnp.where(t > n - 2, lam_end, lam)

    def t_from_logsnr(lam: Array) -> Array:
        lam = _f32(lam)
        t = jnp.interp(lam, lam_finite[::-1], idx[::-1])
        if not zero_end:
            return t
        a = jnp.sqrt(jax.nn.sigmoid(lam))
        t_end = (n - 2) + (1.0 - a / alpha_pen)
        return jnp.where(lam < lam_finite[-1], t_end, t)

    def alpha_sigma(t: Array) -> tuple[Array, Array]:
        return _alpha_sigma_from_logsnr(logsnr(t))

    def sample_t(key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.randint(key, shape, 0, n).astype(jnp.float32)

    return Schedule(
        name="discrete_vp",
        alpha_sigma=alpha_sigma,
        logsnr=logsnr,
        t_from_logsnr=t_from_logsnr,
        sample_t=sample_t,
        t_min=0.0,
        t_max=float(n - 1),
        t_clean=-1.0,
        logsnr_range=(float(lam_table[last_finite]), float(lam_table[0])),
        precondition=_identity_precondition,
        num_timesteps=n,
        hparams=dict(
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            num_timesteps=n,
            zero_terminal_snr=zero_terminal_snr,
        ),
    )


def discrete_alphas_cumprod(schedule: Schedule) -> np.ndarray:
    """alpha_bar at the integer timesteps of a discrete schedule, float64 [N]."""
    if not schedule.is_discrete:
        raise ValueError(f"{schedule.name} is not a discrete schedule")
    h = schedule.hparams
    betas = discrete_betas(h["beta_schedule"], h["beta_start"], h["beta_end"], h["num_timesteps"])
    abar = np.cumprod(1.0 - betas)
    return rescale_zero_terminal_snr(abar) if h["zero_terminal_snr"] else abar


# --------------------------------------------------------------------------- continuous VP


def continuous_vp(
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    t_min: float = 1e-3,
    train_t_min: float = 1e-5,
) -> Schedule:
    """Continuous-time VP SDE of score_sde (Song et al. 2021), `t` in `[0, 1]`.

    Args:
      beta_min: beta(0).
      beta_max: beta(1).
      t_min: last time a sampler evaluates the model at (score_sde samples to 1e-3).
      train_t_min: training draws `t ~ U[train_t_min, 1]` (score_sde uses 1e-5).
    """
    if not 0.0 < beta_min <= beta_max:
        raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
    if not 0.0 < t_min < 1.0 or not 0.0 < train_t_min < 1.0:
        raise ValueError(f"t_min and train_t_min must lie in (0, 1), got {t_min}, {train_t_min}")
    d = beta_max - beta_min

    def log_alpha(t: Array) -> Array:
        return -0.25 * t * t * d - 0.5 * t * beta_min

    def logsnr(t: Array) -> Array:
        la2 = 2.0 * log_alpha(jnp.clip(_f32(t), 0.0, 1.0))
        # log(alpha^2 / (1 - alpha^2)) with expm1 for accuracy near t = 0.
        return la2 - jnp.log(-jnp.expm1(la2))

    def t_from_logsnr(lam: Array) -> Array:
        la = 0.5 * jax.nn.log_sigmoid(_f32(lam))  # log alpha, <= 0
        # Root of d/4 t^2 + beta_min/2 t + la = 0 in the cancellation-free form.
        b = 0.5 * beta_min
        t = -2.0 * la / (b + jnp.sqrt(b * b - d * la))
        return jnp.clip(t, 0.0, 1.0)

    def alpha_sigma(t: Array) -> tuple[Array, Array]:
        la2 = 2.0 * log_alpha(jnp.clip(_f32(t), 0.0, 1.0))
        return jnp.exp(0.5 * la2), jnp.sqrt(-jnp.expm1(la2))

    def sample_t(key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.uniform(key, shape, jnp.float32, train_t_min, 1.0)

    with jax.ensure_compile_time_eval():  # factories may run inside a jit trace
        lam_lo = float(logsnr(jnp.float32(1.0)))
        lam_hi = float(logsnr(jnp.float32(t_min)))
    return Schedule(
        name="continuous_vp",
        alpha_sigma=alpha_sigma,
        logsnr=logsnr,
        t_from_logsnr=t_from_logsnr,
        sample_t=sample_t,
        t_min=float(t_min),
        t_max=1.0,
        t_clean=0.0,
        logsnr_range=(lam_lo, lam_hi),
        precondition=_identity_precondition,
        hparams=dict(beta_min=beta_min, beta_max=beta_max, t_min=t_min, train_t_min=train_t_min),
    )


# --------------------------------------------------------------------------- EDM


def edm_preconditioning(sigma: Array, sigma_data: float) -> tuple[Array, Array, Array, Array]:
    """Karras et al. 2022 (Table 1) preconditioning: (c_skip, c_out, c_in, c_noise)."""
    sigma = _f32(sigma)
    s2 = sigma * sigma + sigma_data * sigma_data
    c_skip = sigma_data * sigma_data / s2
    c_out = sigma * sigma_data * jax.lax.rsqrt(s2)
    c_in = jax.lax.rsqrt(s2)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def _bcast(c: Array, x: Array) -> Array:
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def edm(
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    sigma_data: float = 0.5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> Schedule:
    """EDM (Karras et al. 2022): `t = sigma`, `alpha = 1`, log-normal training sigma.

    `precondition(net_fn)` returns the x0-predicting denoiser
    `D(x, sigma) = c_skip x + c_out net_fn(c_in x, c_noise, ...)`; train it with
    `prediction='x0'` (and `weighting='edm'`) and sample with `prediction='x0'`.
    """
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if sigma_data <= 0.0 or p_std <= 0.0:
        raise ValueError(f"sigma_data and p_std must be > 0, got {sigma_data}, {p_std}")

    def logsnr(t: Array) -> Array:
        return -2.0 * jnp.log(_f32(t))

    def t_from_logsnr(lam: Array) -> Array:
        return jnp.clip(jnp.exp(-0.5 * _f32(lam)), sigma_min, sigma_max)

    def alpha_sigma(t: Array) -> tuple[Array, Array]:
        t = _f32(t)
        return jnp.ones_like(t), t

    def sample_t(key: Array, shape: tuple[int, ...]) -> Array:
        return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))

    def precondition(net_fn: ModelFn) -> ModelFn:
        def model_fn(x: Array, t: Array, *args: Any, **kwargs: Any) -> Array:
            c_skip, c_out, c_in, c_noise = edm_preconditioning(t, sigma_data)
            out = net_fn(_bcast(c_in, x) * x, c_noise, *args, **kwargs)
            return _bcast(c_skip, x) * x.astype(jnp.float32) + _bcast(c_out, x) * out.astype(
                jnp.float32
            )

        return model_fn

    return Schedule(
        name="edm",
        alpha_sigma=alpha_sigma,
        logsnr=logsnr,
        t_from_logsnr=t_from_logsnr,
        sample_t=sample_t,
        t_min=float(sigma_min),
        t_max=float(sigma_max),
        t_clean=0.0,
        logsnr_range=(-2.0 * math.log(sigma_max), -2.0 * math.log(sigma_min)),
        precondition=precondition,
        sigma_data=float(sigma_data),
        hparams=dict(
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=sigma_data,
            p_mean=p_mean,
            p_std=p_std,
        ),
    )


# --------------------------------------------------------------------------- flow


def flow(
    logit_normal_mean: float = 0.0,
    logit_normal_std: float = 1.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
) -> Schedule:
    """Rectified flow: `alpha = 1 - t`, `sigma = t`, `t` in `[0, 1]`.

    Training draws `t = sigmoid(m + s * n)`, `n ~ N(0, 1)` (logit-normal, Esser et al.
    2024). `sigma_min`/`sigma_max` bound `sigma/alpha` for the log-SNR and Karras
    step placements only (sampling always starts at `t = 1` and ends at `t = 0`).
    """
    if logit_normal_std <= 0.0:
        raise ValueError(f"logit_normal_std must be > 0, got {logit_normal_std}")
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")

    def alpha_sigma(t: Array) -> tuple[Array, Array]:
        t = jnp.clip(_f32(t), 0.0, 1.0)
        return 1.0 - t, t

    def logsnr(t: Array) -> Array:
        t = jnp.clip(_f32(t), 0.0, 1.0)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_logsnr(lam: Array) -> Array:
        return jax.nn.sigmoid(-0.5 * _f32(lam))

    def sample_t(key: Array, shape: tuple[int, ...]) -> Array:
        n = jax.random.normal(key, shape, jnp.float32)
        return jax.nn.sigmoid(logit_normal_mean + logit_normal_std * n)

    return Schedule(
        name="flow",
        alpha_sigma=alpha_sigma,
        logsnr=logsnr,
        t_from_logsnr=t_from_logsnr,
        sample_t=sample_t,
        t_min=0.0,
        t_max=1.0,
        t_clean=0.0,
        logsnr_range=(-2.0 * math.log(sigma_max), -2.0 * math.log(sigma_min)),
        precondition=_identity_precondition,
        hparams=dict(
            logit_normal_mean=logit_normal_mean,
            logit_normal_std=logit_normal_std,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
        ),
    )


_FACTORIES: dict[str, Callable[..., Schedule]] = {
    "discrete_vp": discrete_vp,
    "continuous_vp": continuous_vp,
    "edm": edm,
    "flow": flow,
}


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Builds a schedule by name (`discrete_vp`, `continuous_vp`, `edm`, `flow`).

    Raises:
      ValueError: unknown name, unknown keyword for that schedule, or bad values.
    """
    allowed = schedule_arguments(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"schedule {name!r} does not take {unknown}; its arguments are {sorted(allowed)}"
        )
    return _FACTORIES[name](**kwargs)


def schedule_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments the schedule `name` takes.

    Raises:
      ValueError: unknown name.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
    return tuple(inspect.signature(_FACTORIES[name]).parameters)
