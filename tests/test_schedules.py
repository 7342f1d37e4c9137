"""Schedules: published tables, time conventions, inverses, training distributions."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import schedules


def test_discrete_linear_matches_ddpm_table():
    sch = schedules.discrete_vp("linear", 1e-4, 0.02, 1000)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    t = np.array([0, 1, 10, 250, 500, 998, 999], np.float32)
    a, s = sch.alpha_sigma(jnp.asarray(t))
    np.testing.assert_allclose(a, np.sqrt(abar[t.astype(int)]), rtol=2e-5)
    np.testing.assert_allclose(s, np.sqrt(1 - abar[t.astype(int)]), rtol=2e-5)
    assert sch.t_min == 0.0 and sch.t_max == 999.0 and sch.t_clean == -1.0


def test_stable_diffusion_terminal_snr_and_zero_terminal_snr_rescale():
    # Lin et al. 2023, Sec. 3.1: SD's schedule ends at sqrt(abar_T) = 0.068265 (SNR 0.004682).
    sd = schedules.discrete_vp("scaled_linear", 0.00085, 0.012, 1000)
    a, s = sd.alpha_sigma(jnp.float32(999))
    assert float(a) == pytest.approx(0.068265, abs=2e-6)
    assert float(a**2 / s**2) == pytest.approx(0.004682, abs=2e-6)
    z = schedules.discrete_vp("scaled_linear", 0.00085, 0.012, 1000, zero_terminal_snr=True)
    a_z, s_z = z.alpha_sigma(jnp.asarray([0.0, 998.0, 998.5, 999.0]))
    assert float(a_z[-1]) == 0.0 and float(s_z[-1]) == 1.0
    assert float(z.logsnr(jnp.float32(999))) == -np.inf
    np.testing.assert_allclose(a_z[0], sd.alpha_sigma(jnp.float32(0))[0], rtol=1e-6)
    # The last interval interpolates alpha linearly down to 0.
    np.testing.assert_allclose(a_z[2], a_z[1] / 2, rtol=1e-5)
    assert np.all(np.isfinite(a_z)) and np.all(np.isfinite(s_z))
    # Algorithm 1 on the published table, computed independently.
    sq = np.sqrt(np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2))
    sq = (sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])
    np.testing.assert_allclose(z.alpha_sigma(jnp.float32(500))[0], sq[500], rtol=2e-5)


def test_cosine_schedule_matches_nichol_dhariwal():
    sch = schedules.discrete_vp("cosine", num_timesteps=1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 100, 500, 900):
        expected = f((i + 1) / 1000) / f(0)
        assert float(sch.alpha_sigma(jnp.float32(i))[0]) ** 2 == pytest.approx(expected, rel=1e-4)


def test_interpolation_is_linear_in_logsnr_between_indices():
    sch = schedules.discrete_vp()
    lam = sch.logsnr(jnp.asarray([10.0, 10.25, 11.0]))
    assert float(lam[1]) == pytest.approx(0.75 * float(lam[0]) + 0.25 * float(lam[2]), rel=1e-6)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("discrete_vp", {}),
        (
            "discrete_vp",
            {
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "zero_terminal_snr": True,
            },
        ),
        ("continuous_vp", {}),
        ("edm", {}),
        ("flow", {}),
    ],
)
def test_logsnr_inverse_and_alpha_sigma_consistency(name, kwargs):
    sch = schedules.make_schedule(name, **kwargs)
    t = jnp.linspace(sch.t_min, sch.t_max, 37)[1:-1]
    lam = sch.logsnr(t)
    np.testing.assert_allclose(sch.t_from_logsnr(lam), t, rtol=2e-4, atol=2e-4 * sch.t_max)
    a, s = sch.alpha_sigma(t)
    np.testing.assert_allclose(2 * (jnp.log(a) - jnp.log(s)), lam, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(np.asarray(lam)) < 0)  # SNR decreases with t
    lo, hi = sch.logsnr_range
    assert np.isfinite(lo) and np.isfinite(hi) and lo < hi


def test_continuous_vp_closed_form():
    sch = schedules.continuous_vp(beta_min=0.1, beta_max=20.0)
    t = jnp.asarray([0.0, 0.5, 1.0])
    log_a = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    a, s = sch.alpha_sigma(t)
    np.testing.assert_allclose(a, jnp.exp(log_a), rtol=1e-6)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)
    assert float(s[0]) == 0.0


def test_edm_and_flow_conventions():
    edm = schedules.edm()
    a, s = edm.alpha_sigma(jnp.asarray([0.002, 1.0, 80.0]))
    np.testing.assert_array_equal(a, 1.0)
    np.testing.assert_allclose(s, [0.002, 1.0, 80.0])
    fl = schedules.flow()
    a, s = fl.alpha_sigma(jnp.asarray([0.0, 0.25, 1.0]))
    np.testing.assert_allclose(a, [1.0, 0.75, 0.0])
    np.testing.assert_allclose(s, [0.0, 0.25, 1.0])


def test_training_time_distributions():
    key = jax.random.key(0)
    t = np.asarray(schedules.discrete_vp(num_timesteps=10).sample_t(key, (20000,)))
    assert set(np.unique(t)) == set(range(10))
    assert np.all(np.abs(np.bincount(t.astype(int)) / 20000 - 0.1) < 0.01)
    sig = np.asarray(schedules.edm(p_mean=-1.2, p_std=1.2).sample_t(key, (20000,)))
    assert np.log(sig).mean() == pytest.approx(-1.2, abs=0.03)
    assert np.log(sig).std() == pytest.approx(1.2, abs=0.03)
    tf = np.asarray(
        schedules.flow(logit_normal_mean=0.5, logit_normal_std=0.8).sample_t(key, (20000,))
    )
    logit = np.log(tf) - np.log1p(-tf)
    assert logit.mean() == pytest.approx(0.5, abs=0.03)
    assert logit.std() == pytest.approx(0.8, abs=0.03)
    tc = np.asarray(schedules.continuous_vp().sample_t(key, (20000,)))
    assert tc.min() >= 1e-5 and tc.max() <= 1.0 and tc.mean() == pytest.approx(0.5, abs=0.01)


def test_edm_preconditioning_identities():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = schedules.edm_preconditioning(jnp.float32(sd), sd)
    assert float(c_skip) == pytest.approx(0.5)
    assert float(c_out) == pytest.approx(sd / math.sqrt(2))
    assert float(c_in) == pytest.approx(1 / (sd * math.sqrt(2)))
    assert float(c_noise) == pytest.approx(math.log(sd) / 4)
    # Unit-variance training target F = (x0 - c_skip x) / c_out for data of std sigma_data.
    sig = jnp.asarray([0.002, 0.1, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, _ = schedules.edm_preconditioning(sig, sd)
    var_target = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sig**2) / c_out**2
    np.testing.assert_allclose(var_target, 1.0, rtol=1e-5)
    np.testing.assert_allclose(c_in**2 * (sd**2 + sig**2), 1.0, rtol=1e-5)  # unit-variance input
    key1, key2 = jax.random.split(jax.random.key(1))
    x0 = sd * jax.random.normal(key1, (50000,))
    x = x0 + 3.0 * jax.random.normal(key2, (50000,))
    cs, co, _, _ = schedules.edm_preconditioning(jnp.float32(3.0), sd)
    assert float(jnp.var((x0 - cs * x) / co)) == pytest.approx(1.0, abs=0.03)


def test_edm_precondition_wraps_network():
    sch = schedules.edm(sigma_data=0.5)
    seen = {}

    def net(x, c_noise, label):
        seen.update(x=x, c_noise=c_noise, label=label)
        return jnp.full_like(x, 2.0)

    x = jnp.ones((2, 3))
    sigma = jnp.asarray([0.5, 2.0])
    out = sch.precondition(net)(x, sigma, "lbl")
    c_skip, c_out, c_in, c_noise = schedules.edm_preconditioning(sigma, 0.5)
    np.testing.assert_allclose(seen["x"], c_in[:, None] * x, rtol=1e-6)
    np.testing.assert_allclose(seen["c_noise"], c_noise, rtol=1e-6)
    assert seen["label"] == "lbl"
    np.testing.assert_allclose(out, c_skip[:, None] * x + 2.0 * c_out[:, None], rtol=1e-6)
    ident = schedules.discrete_vp().precondition(net)
    assert ident is net


def test_validation_and_immutability():
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.make_schedule("karras")
    with pytest.raises(ValueError, match="does not take"):
        schedules.make_schedule("edm", beta_start=0.1)
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        schedules.discrete_vp(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.discrete_vp(num_timesteps=1)
    with pytest.raises(ValueError, match="beta_schedule"):
        schedules.discrete_vp("quadratic")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        schedules.edm(sigma_min=1.0, sigma_max=0.5)
    sch = schedules.discrete_vp()
    with pytest.raises(dataclasses.FrozenInstanceError):
        sch.t_max = 5.0
