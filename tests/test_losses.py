"""Loss weightings (min-SNR per prediction, EDM) and the loss closure."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import losses, parametrizations, schedules

GAMMA = 5.0


def _vp(lam):
    a = jnp.sqrt(jax.nn.sigmoid(lam))
    s = jnp.sqrt(jax.nn.sigmoid(-lam))
    return a, s


def test_min_snr_weights_match_hang_et_al_for_each_prediction():
    lam = jnp.linspace(-8.0, 8.0, 17)
    a, s = _vp(lam)
    snr = jnp.exp(lam)
    clipped = jnp.minimum(snr, GAMMA)
    expected = {"epsilon": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
    for pred, want in expected.items():
        got = losses.loss_weight(a, s, prediction=pred, weighting="min_snr", min_snr_gamma=GAMMA)
        np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=pred)
    # The common v-prediction bug (dividing by SNR) gives a different, wrong weight.
    wrong = clipped / snr
    got_v = losses.loss_weight(a, s, prediction="v", weighting="min_snr", min_snr_gamma=GAMMA)
    assert not np.allclose(got_v, wrong, rtol=1e-2)


@pytest.mark.parametrize("weighting", ["snr", "min_snr", "edm", "uniform"])
def test_weightings_are_the_same_x0_objective_for_every_prediction(weighting):
    # One fixed denoiser error, expressed as each prediction type: the weighted losses
    # must agree (the weighting is a property of the objective, not of the output).
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    lam = jnp.asarray([-3.0, -0.5, 1.0, 4.0])
    a, s = _vp(lam)
    shape = (4, 6)
    x0 = jax.random.normal(k1, shape)
    eps = jax.random.normal(k2, shape)
    x = a[:, None] * x0 + s[:, None] * eps
    x0_hat = x0 + 0.1 * jax.random.normal(k3, shape)
    eps_hat = (x - a[:, None] * x0_hat) / s[:, None]
    per_pred = {}
    for pred in parametrizations.PREDICTIONS:
        hat = parametrizations.from_x0_eps(x0_hat, eps_hat, a, s, pred)
        tgt = parametrizations.from_x0_eps(x0, eps, a, s, pred)
        w = losses.loss_weight(a, s, prediction=pred, weighting=weighting, sigma_data=0.5)
        per_pred[pred] = w * jnp.mean((hat - tgt) ** 2, axis=1)
    ref = per_pred["x0"]
    for pred, val in per_pred.items():
        np.testing.assert_allclose(val, ref, rtol=2e-4, err_msg=pred)


def test_edm_weighting_is_karras_lambda():
    sigma = jnp.asarray([0.002, 0.5, 3.0, 80.0])
    sd = 0.5
    w = losses.loss_weight(
        jnp.ones_like(sigma), sigma, prediction="x0", weighting="edm", sigma_data=sd
    )
    np.testing.assert_allclose(w, (sigma**2 + sd**2) / (sigma * sd) ** 2, rtol=1e-5)


def test_weights_finite_at_zero_snr_where_the_limit_is():
    a, s = jnp.zeros(1), jnp.ones(1)
    for pred in ("epsilon", "v", "flow"):
        w = losses.loss_weight(a, s, prediction=pred, weighting="min_snr")
        assert np.isfinite(w).all(), pred
    assert float(losses.loss_weight(a, s, prediction="epsilon", weighting="min_snr")[0]) == 1.0


def test_loss_closure_targets_and_aux():
    sch = schedules.discrete_vp(num_timesteps=100)
    x0 = jnp.full((64, 4, 4, 1), 0.5)
    zero_model = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    key = jax.random.key(3)
    for pred in ("epsilon", "x0", "v"):
        loss = losses.make_loss(sch, prediction=pred, weighting="eps_mse")
        per, aux = jax.jit(functools.partial(loss, zero_model))(x0, key)
        assert per.shape == (64,) and per.dtype == jnp.float32
        assert set(aux) >= {"t", "weight", "mse"}
        t = aux["t"]
        assert np.all((t >= 0) & (t <= 99)) and np.all(t == jnp.round(t))
        a, s = sch.alpha_sigma(t)
        # E[target^2] with x0 = 0.5 and eps ~ N(0, 1): eps -> 1, x0 -> 0.25, v -> a^2 + s^2/4.
        want = {"epsilon": jnp.ones_like(a), "x0": 0.25 * jnp.ones_like(a), "v": a**2 + s**2 / 4}
        assert float(jnp.mean(per)) == pytest.approx(float(jnp.mean(want[pred])), rel=0.08)
    # The noisy input is alpha x0 + sigma eps.
    seen = {}

    def spy(x, t):
        seen["x"], seen["t"] = x, t
        return jnp.zeros_like(x)

    def resid_std(x0, key):
        losses.make_loss(sch, prediction="x0")(spy, x0, key)
        a, s = sch.alpha_sigma(seen["t"])
        return jnp.std((seen["x"] - a[:, None, None, None] * x0) / s[:, None, None, None])

    assert float(jax.jit(resid_std)(x0, key)) == pytest.approx(1.0, abs=0.05)


def test_bf16_model_output_gives_float32_loss():
    sch = schedules.edm()
    loss = losses.make_loss(sch, prediction="x0", weighting="edm")
    model = sch.precondition(lambda x, c: jnp.zeros(x.shape, jnp.bfloat16))
    per, _ = jax.jit(functools.partial(loss, model))(
        jnp.zeros((8, 3), jnp.bfloat16), jax.random.key(0)
    )
    assert per.dtype == jnp.float32 and np.all(np.isfinite(per))


def test_validation():
    sch = schedules.discrete_vp()
    with pytest.raises(ValueError, match="unknown weighting"):
        losses.make_loss(sch, weighting="p2")
    with pytest.raises(ValueError, match="unknown prediction"):
        losses.make_loss(sch, prediction="score")
    with pytest.raises(ValueError, match="sigma_data"):
        losses.make_loss(schedules.edm(sigma_data=1.0), prediction="x0", sigma_data=0.5)
    ztsnr = schedules.discrete_vp(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="infinite"):
        losses.make_loss(ztsnr, prediction="epsilon", weighting="uniform")
    losses.make_loss(ztsnr, prediction="v", weighting="min_snr")  # fine
