"""The learned-variance bound term against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import losses, schedules


@pytest.fixture(scope="module")
def setup():
    sched = schedules.discrete_vp(num_timesteps=1000)
    abar = schedules.discrete_alphas_cumprod(sched)
    x0 = jax.random.uniform(jax.random.key(0), (4, 3, 3, 2), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([1.0, 10.0, 500.0, 999.0])
    a = jnp.asarray(np.sqrt(abar[[1, 10, 500, 999]]), jnp.float32).reshape(-1, 1, 1, 1)
    x_t = a * x0 + jnp.sqrt(1 - a**2) * eps
    return sched, abar, x0, eps, t, x_t


def test_exact_mean_and_posterior_variance_give_zero_kl(setup):
    sched, _, x0, eps, t, x_t = setup
    vb = losses.make_vlb_term(sched)(x0, x_t, t, eps, -jnp.ones_like(x0))
    np.testing.assert_allclose(vb, 0.0, atol=2e-4)


def test_beta_variance_gives_the_closed_form_kl(setup):
    sched, abar, x0, eps, t, x_t = setup
    vb = losses.make_vlb_term(sched)(x0, x_t, t, eps, jnp.ones_like(x0))
    idx = np.array([1, 10, 500, 999])
    beta = 1 - abar[idx] / abar[idx - 1]
    beta_tilde = beta * (1 - abar[idx - 1]) / (1 - abar[idx])
    expected = 0.5 * (-1 + np.log(beta) - np.log(beta_tilde) + beta_tilde / beta) / np.log(2)
    np.testing.assert_allclose(vb, expected, rtol=1e-3, atol=1e-8)


def test_learn_sigma_loss_trains_only_v_through_the_bound(setup):
    sched, *_ = setup
    loss = losses.make_loss(sched, learn_sigma=True)
    x0 = jnp.zeros((8, 2, 2, 1))

    def total(out_scale, v_scale):
        def model_fn(x, t):
            return jnp.concatenate([out_scale * x, v_scale * jnp.ones_like(x)], axis=-1)

        per_example, aux = loss(model_fn, x0, jax.random.key(0))
        return per_example.mean(), aux

    (_, aux) = total(1.0, 0.0)
    assert set(aux) >= {"mse", "vb"} and bool(jnp.all(aux["vb"] >= -1e-6))
    g_v = jax.grad(lambda v: total(1.0, v)[0])(0.3)
    assert float(g_v) != 0.0
    # The mean's gradient equals the plain MSE's: the bound sees a stopped prediction.
    plain = losses.make_loss(sched)
    g_mean = jax.grad(lambda s: total(s, 0.3)[0])(0.7)
    g_plain = jax.grad(lambda s: plain(lambda x, t: s * x, x0, jax.random.key(0))[0].mean())(0.7)
    np.testing.assert_allclose(g_mean, g_plain, rtol=1e-5)
    with pytest.raises(ValueError, match="discrete VP"):
        losses.make_loss(schedules.flow(), learn_sigma=True)
