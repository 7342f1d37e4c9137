"""Step placements: where a sampling run evaluates the model (`PLACEMENTS`, `step_times`).

Pure NumPy in float64, evaluated at trace time; `np_eval` evaluates a schedule's JAX
closures eagerly for that (also inside a jit trace).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion.schedules import Schedule

PLACEMENTS = ("leading", "leading_sd", "trailing", "linspace", "linspace_eps", "logsnr", "karras")


def np_eval(fn: Callable[..., Any], *args: Any) -> Any:
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
        sigma_min = np_eval(schedule.alpha_sigma, t_min)[1]
        if sigma_min == 0:
            ts = np.linspace(t_max, t_min, n + 1)[:-1]
        else:
            ts = np.linspace(t_max, t_min, n)
        if schedule.is_discrete:
            ts = np.round(ts)
    elif placement == "linspace_eps":
        t_end = t_min
        if np_eval(schedule.alpha_sigma, t_min)[1] == 0:
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
        ts = np_eval(schedule.t_from_logsnr, lams.astype(np.float32))
        ts = np.clip(ts, t_min, t_max)
        if np_eval(schedule.logsnr, t_max) < lo:
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
