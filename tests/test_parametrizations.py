"""Prediction-type conversions: round trips, closed forms, safety at alpha = 0 / sigma = 0."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import parametrizations as P

PREDS = P.PREDICTIONS


def _batch(alpha, sigma):
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (len(alpha), 4, 4, 2))
    eps = jax.random.normal(k2, x0.shape)
    a, s = jnp.asarray(alpha), jnp.asarray(sigma)
    x = a[:, None, None, None] * x0 + s[:, None, None, None] * eps
    return x0, eps, x, a, s


@pytest.mark.parametrize(
    "alpha,sigma",
    [
        ([0.99, 0.7, 0.1], [0.141, 0.714, 0.995]),  # VP-like
        ([1.0, 1.0, 1.0], [0.01, 1.0, 80.0]),  # EDM
        ([0.9, 0.5, 0.05], [0.1, 0.5, 0.95]),  # flow
    ],
)
def test_round_trips_for_every_pair(alpha, sigma):
    x0, eps, x, a, s = _batch(alpha, sigma)
    for src, dst in itertools.product(PREDS, PREDS):
        pred = P.from_x0_eps(x0, eps, a, s, src)
        got = P.convert(pred, x, a, s, src, dst)
        want = P.from_x0_eps(x0, eps, a, s, dst)
        scale = 1.0 + float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, atol=3e-5 * scale, err_msg=f"{src}->{dst}")
        back_x0, back_eps = P.to_x0_eps(pred, x, a, s, src)
        np.testing.assert_allclose(back_x0, x0, atol=3e-4 * (1 + float(jnp.max(s / a))))
        np.testing.assert_allclose(back_eps, eps, atol=3e-4 * (1 + float(jnp.max(a / s))))


def test_definitions():
    x0, eps, x, a, s = _batch([0.8, 0.6], [0.6, 0.8])
    ab, sb = a[:, None, None, None], s[:, None, None, None]
    np.testing.assert_allclose(P.from_x0_eps(x0, eps, a, s, "v"), ab * eps - sb * x0, rtol=1e-6)
    np.testing.assert_allclose(P.from_x0_eps(x0, eps, a, s, "flow"), eps - x0, rtol=1e-6)
    # For the flow schedule (alpha = 1 - t, sigma = t) the flow target is dx_t/dt.
    t = jnp.asarray([0.3, 0.7])
    dxdt = jax.vmap(jax.jacfwd(lambda tt, a0, e: (1 - tt) * a0 + tt * e), (0, 0, 0))(t, x0, eps)
    np.testing.assert_allclose(P.from_x0_eps(x0, eps, 1 - t, t, "flow"), dxdt, rtol=1e-5, atol=1e-6)


def test_no_nan_at_alpha_zero_or_sigma_zero():
    x = jnp.ones((2, 3))
    a, s = jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 0.0])
    for pred in PREDS:
        x0, eps = P.to_x0_eps(jnp.full_like(x, 0.5), x, a, s, pred)
        assert np.all(np.isfinite(x0)) and np.all(np.isfinite(eps)), pred
    # v and flow identify x0 at SNR 0: x0 = -v and x0 = x - u.
    v = jnp.full((1, 3), 0.3)
    x0, eps = P.to_x0_eps(v, x[:1], jnp.zeros(1), jnp.ones(1), "v")
    np.testing.assert_allclose(x0, -v)
    np.testing.assert_allclose(eps, x[:1])
    x0, _ = P.to_x0_eps(v, x[:1], jnp.zeros(1), jnp.ones(1), "flow")
    np.testing.assert_allclose(x0, x[:1] - v)


def test_bf16_predictions_convert_in_float32():
    x0, eps, x, a, s = _batch([0.7], [0.714])
    pred = P.from_x0_eps(x0, eps, a, s, "v").astype(jnp.bfloat16)
    got_x0, got_eps = P.to_x0_eps(pred, x, a, s, "v")
    assert got_x0.dtype == jnp.float32 and got_eps.dtype == jnp.float32


def test_unknown_prediction():
    with pytest.raises(ValueError, match="unknown prediction"):
        P.check_prediction("score")
