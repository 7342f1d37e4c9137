"""Denoising losses: `make_loss(schedule, ...)` returns a pure `loss(model_fn, x0, key)`.

The network regresses the `prediction`-type target (`parametrizations.from_x0_eps`) at
`x_t = alpha x0 + sigma eps`, `t ~ schedule.sample_t`. The per-example loss is
`w(t) * mean((pred - target)^2)` over the non-batch dimensions.

Weightings. Every weighting except `eps_mse` is defined as a weight `w_x0` on the
x0-space MSE `|x0_hat - x0|^2`, which is the same objective whatever the network
predicts; it is converted into the weight on the prediction-space MSE by dividing by
`|pred_hat - pred|^2 / |x0_hat - x0|^2`, which is `SNR` for epsilon, 1 for x0,
`(alpha^2 + sigma^2)^2 / sigma^2` for v (`SNR + 1` in VP) and `(alpha + sigma)^2 / sigma^2`
for flow (`SNR = alpha^2 / sigma^2`). The resulting weight on the prediction MSE (VP
values):

* `snr` (`w_x0 = SNR`): epsilon 1, x0 SNR, v SNR/(SNR+1).
* `min_snr` (`w_x0 = min(SNR, gamma)`): epsilon min(SNR, gamma)/SNR, x0 min(SNR, gamma),
  v min(SNR, gamma)/(SNR+1).
* `edm` (`w_x0 = SNR + 1/sigma_d^2`): epsilon 1 + 1/(sigma_d^2 SNR), x0 SNR + 1/sigma_d^2,
  v (SNR + 1/sigma_d^2)/(SNR+1).
* `uniform` (`w_x0 = 1`): epsilon 1/SNR, x0 1, v 1/(SNR+1).
* `eps_mse`: the plain, unweighted MSE on whatever is predicted (weight 1), i.e. the
  standard loss of each prediction type: Ho et al.'s L_simple for epsilon
  (`w_x0 = SNR`), plain x0 regression for x0 (`w_x0 = 1`), v-MSE for v
  (`w_x0 = SNR + 1` in VP) and the flow-matching loss for flow
  (`w_x0 = ((alpha + sigma) / sigma)^2`, `= 1/t^2` for the flow schedule).
* `min_snr`: Min-SNR-gamma (Hang et al. 2023), correct for every prediction (a common
  bug divides by SNR for v-prediction, where the right divisor is SNR + 1).
* `edm`: Karras et al. 2022 `lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2`
  on the denoiser (x0) error, with `sigma = sigma/alpha` for non-VE schedules.

Weights are evaluated in closed forms of `(alpha, sigma)` that stay finite at SNR 0
wherever the limit is finite; combinations whose weight is infinite at a zero-SNR time
the schedule can draw (epsilon prediction with `uniform` or `edm`) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import parametrizations
from diffjax.diffusion.schedules import Schedule, discrete_alphas_cumprod

Array = jax.Array
WEIGHTINGS = ("eps_mse", "snr", "min_snr", "edm", "uniform")


def _div(num: Array, den: Array) -> Array:
    # num/0 -> inf (or nan for 0/0) is left to the callers, whose formulas avoid 0/0.
    return num / den


def loss_weight(
    alpha: Array,
    sigma: Array,
    *,
    prediction: str,
    weighting: str,
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> Array:
    """Weight on the prediction-space MSE (see the module docstring).

    Args:
      alpha, sigma: [B] float.
      prediction: `epsilon` | `x0` | `v` | `flow`.
      weighting: `eps_mse` | `snr` | `min_snr` | `edm` | `uniform`.
      min_snr_gamma: gamma of `min_snr`.
      sigma_data: data standard deviation of `edm`.

    Returns:
      [B] float32 weights.
    """
    parametrizations.check_prediction(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    a = jnp.asarray(alpha, jnp.float32)
    s = jnp.asarray(sigma, jnp.float32)
    a2, s2, g, d2 = a * a, s * s, float(min_snr_gamma), float(sigma_data) ** 2
    if weighting == "eps_mse":
        return jnp.ones_like(a)
    if prediction == "epsilon":
        # w_x0 / SNR; the forms below have a finite limit at alpha = 0 where one exists.
        table = {
            "snr": jnp.ones_like(a),
            "min_snr": jnp.minimum(1.0, _div(g * s2, a2)),
            "edm": 1.0 + _div(s2, a2 * d2),
            "uniform": _div(s2, a2),
        }
    elif prediction == "x0":
        snr = _div(a2, s2)
        table = {
            "snr": snr,
            "min_snr": jnp.minimum(snr, g),
            "edm": snr + 1.0 / d2,
            "uniform": jnp.ones_like(a),
        }
    elif prediction == "v":
        n2 = (a2 + s2) ** 2  # = 1 for VP schedules
        table = {
            "snr": a2 / n2,
            "min_snr": jnp.minimum(a2, g * s2) / n2,
            "edm": (a2 + s2 / d2) / n2,
            "uniform": s2 / n2,
        }
    else:  # flow velocity u = eps - x0
        n2 = (a + s) ** 2
        table = {
            "snr": a2 / n2,
            "min_snr": jnp.minimum(a2, g * s2) / n2,
            "edm": (a2 + s2 / d2) / n2,
            "uniform": s2 / n2,
        }
    return table[weighting]


def make_loss(
    schedule: Schedule,
    *,
    prediction: str = "epsilon",
    weighting: str = "eps_mse",
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
    learn_sigma: bool = False,
    vlb_weight: float = 1.0,
) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """Builds the denoising loss for `schedule`.

    Args:
      schedule: a `schedules.Schedule`. For EDM pass the preconditioned model
        (`schedule.precondition(net_fn)`) and `prediction='x0'`.
      prediction: what `model_fn` predicts: `epsilon` | `x0` | `v` | `flow`.
      weighting: `eps_mse` | `snr` | `min_snr` | `edm` | `uniform` (module docstring).
      min_snr_gamma: gamma of `min_snr` (> 0).
      sigma_data: data standard deviation for `edm` (> 0); must match an EDM schedule's.
      learn_sigma: the network outputs 2C channels, the prediction and a variance
        interpolation `v` (Nichol & Dhariwal 2021); the loss adds `vlb_weight` times the
        variational bound term (`vlb_term`), which trains only `v`. Discrete VP with
        epsilon prediction only, as in ADM and DiT. Same name as the models' field
        (`model.kwargs.learn_sigma`).
      vlb_weight: weight of the bound (1.0 = DiT's `mse + vb` for 1000 steps).

    Returns:
      `loss(model_fn, x0, key) -> (per_example_loss [B], aux)` where
      `model_fn(x_t [B, ...], t [B]) -> prediction [B, ...]`, `x0` is [B, ...] and
      `aux` holds [B] arrays `t`, `weight` and `mse` (the unweighted MSE).

    Raises:
      ValueError: unknown prediction/weighting, bad gamma/sigma_data, or a weighting that
        is infinite on this schedule's training distribution.
    """
    parametrizations.check_prediction(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    if schedule.sigma_data is not None and abs(schedule.sigma_data - sigma_data) > 1e-12:
        raise ValueError(
            f"sigma_data={sigma_data} differs from the EDM schedule's {schedule.sigma_data}; "
            "pass the same value to both"
        )
    if learn_sigma and prediction != "epsilon":
        raise ValueError(f"learn_sigma needs prediction='epsilon', got {prediction!r}")
    with jax.ensure_compile_time_eval():  # make_loss may be called inside a jit trace
        vlb = make_vlb_term(schedule) if learn_sigma else None
        reaches_snr0 = bool(schedule.alpha_sigma(jnp.float32(schedule.t_max))[0] == 0)
    if reaches_snr0 and prediction == "epsilon" and weighting in ("uniform", "edm"):
        raise ValueError(
            f"weighting {weighting!r} with epsilon prediction is infinite at the zero-SNR "
            f"times {schedule!r} trains on; use 'eps_mse', 'snr' or 'min_snr', or predict v"
        )

    def loss(
        model_fn: Callable[[Array, Array], Array], x0: Array, key: Array
    ) -> tuple[Array, dict[str, Any]]:
        x0 = jnp.asarray(x0, jnp.float32)
        key_t, key_eps = jax.random.split(key)
        t = schedule.sample_t(key_t, (x0.shape[0],))
        eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
        alpha, sigma = schedule.alpha_sigma(t)
        bshape = (-1,) + (1,) * (x0.ndim - 1)
        x_t = alpha.reshape(bshape) * x0 + sigma.reshape(bshape) * eps
        pred = model_fn(x_t, t).astype(jnp.float32)
        vb = None
        if vlb is not None:
            if pred.shape[-1] != 2 * x0.shape[-1]:
                raise ValueError(
                    f"learn_sigma expects {2 * x0.shape[-1]} output channels, got {pred.shape}"
                )
            pred, v = jnp.split(pred, 2, axis=-1)
            vb = vlb(x0, x_t, t, jax.lax.stop_gradient(pred), v)
        if pred.shape != x0.shape:
            raise ValueError(
                f"model output shape {pred.shape} differs from the data shape {x0.shape}; "
                "a learned-variance model must split its output before the loss"
            )
        target = parametrizations.from_x0_eps(x0, eps, alpha, sigma, prediction)
        mse = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x0.ndim)))
        w = loss_weight(
            alpha,
            sigma,
            prediction=prediction,
            weighting=weighting,
            min_snr_gamma=min_snr_gamma,
            sigma_data=sigma_data,
        )
        aux = {"t": t, "weight": w, "mse": mse}
        if vb is not None:
            aux["vb"] = vb
            return w * mse + vlb_weight * vb, aux
        return w * mse, aux

    return loss


def _normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def _std_normal_cdf(x: Array) -> Array:
    return 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """log P(x) of 8-bit data in [-1, 1] under N(mean, exp(log_scale)^2) binned to 2/255."""
    centered = x - mean
    inv = jnp.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv * (centered + 1.0 / 255.0))
    cdf_minus = _std_normal_cdf(inv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_minus = jnp.log(jnp.maximum(1.0 - cdf_minus, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_minus, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_minus, log_delta)
    )


def make_vlb_term(schedule: Schedule) -> Callable[..., Array]:
    """The learned-variance bound term L_t of Nichol & Dhariwal (2021), in bits per dim.

    Returns `vb(x0, x_t, t, eps_pred, v) -> [B]`: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} |
    x_t)) for t > 0 and the discretized decoder NLL at t = 0, with the model's log
    variance `frac * log(beta_t) + (1 - frac) * log(beta_tilde_t)`, `frac = (v + 1) / 2`.
    Pass `eps_pred` through `stop_gradient` so the bound trains only the variance.
    """
    if not schedule.is_discrete:
        raise ValueError(f"learn_sigma needs a discrete VP schedule, got {schedule.name!r}")
    abar = discrete_alphas_cumprod(schedule)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1.0 - abar / abar_prev
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta_tilde_0 = 0: use beta_tilde_1 there, as the improved-DDPM reference does.
    post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    coef_x0 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    tables = {
        k: jnp.asarray(v, jnp.float32)
        for k, v in dict(
            abar=abar,
            log_beta=np.log(np.maximum(betas, 1e-20)),
            post_logvar=post_logvar,
            coef_x0=coef_x0,
            coef_xt=coef_xt,
        ).items()
    }

    def vb(x0: Array, x_t: Array, t: Array, eps_pred: Array, v: Array) -> Array:
        i = jnp.clip(jnp.round(t).astype(jnp.int32), 0, abar.shape[0] - 1)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        g = {k: tab[i].reshape(shape) for k, tab in tables.items()}
        x0_pred = (x_t - jnp.sqrt(1.0 - g["abar"]) * eps_pred) / jnp.sqrt(g["abar"])
        true_mean = g["coef_x0"] * x0 + g["coef_xt"] * x_t
        model_mean = g["coef_x0"] * x0_pred + g["coef_xt"] * x_t
        frac = (v + 1.0) / 2.0
        model_logvar = frac * g["log_beta"] + (1.0 - frac) * g["post_logvar"]
        axes = tuple(range(1, x0.ndim))
        kl = jnp.mean(_normal_kl(true_mean, g["post_logvar"], model_mean, model_logvar), axis=axes)
        nll = -jnp.mean(
            discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar), axis=axes
        )
        return jnp.where(i == 0, nll, kl) / math.log(2.0)

    return vb
