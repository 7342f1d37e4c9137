"""Editing at sampling time against closed forms: blend inpainting and RePaint on a
Gaussian (whose conditional law is exact), inversion round trips at the solver's order."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import analytic, editing, samplers, schedules

# A 4-d Gaussian; coordinates 0, 1 are generated, 2, 3 known (correlated with them).
_RNG = np.random.default_rng(0)
_A = _RNG.normal(size=(4, 4))
DATA = analytic.GaussianData(_RNG.normal(size=4) * 0.5, _A @ _A.T / 4 + 0.1 * np.eye(4))
MASK = np.array([[1.0, 1.0, 0.0, 0.0]])  # 1 = generate
X_KNOWN = np.array([0.8, -0.6])


def _conditional():
    """The exact law of the generated coordinates given the known ones."""
    mu, s = DATA.mean, DATA.cov
    u, k = [0, 1], [2, 3]
    gain = s[np.ix_(u, k)] @ np.linalg.inv(s[np.ix_(k, k)])
    return mu[u] + gain @ (X_KNOWN - mu[k]), s[np.ix_(u, u)] - gain @ s[np.ix_(k, u)]


def _known(b):
    return jnp.zeros((b, 4)).at[:, 2:].set(jnp.asarray(X_KNOWN, jnp.float32))


def _sampler(sch, pred, method, n, **kw):
    return functools.partial(
        samplers.sample,
        DATA.model_fn(sch, pred),
        schedule=sch,
        method=method,
        num_steps=n,
        prediction=pred,
        **kw,
    )


# ----------------------------------------------------------------------------- schedule


def test_repaint_schedule_and_its_network_evaluations():
    # K = 7 points, L = 2: jump points 6, 4, 2 (RePaint's levels 0, 2, 4), each redone twice.
    points, jumps = samplers.repaint_schedule(7, 2, 3)
    assert points.size == 6 + 3 * 2 * 2
    np.testing.assert_array_equal(points[:8], [0, 1, 0, 1, 0, 1, 2, 3])
    np.testing.assert_array_equal(np.flatnonzero(jumps), [1, 3, 7, 9, 13, 15])
    np.testing.assert_array_equal(samplers.repaint_schedule(7, 2, 1)[0], np.arange(6))
    # Evaluations counted in the compiled program.
    sch = schedules.discrete_vp()
    calls = []
    base = DATA.model_fn(sch, "epsilon")

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return base(x, t)

    for method in ("ddim", "heun"):
        calls.clear()
        fn = functools.partial(
            samplers.sample,
            counted,
            schedule=sch,
            method=method,
            num_steps=7,
            placement="trailing",
            inpaint_mask=MASK,
            jump_length=2,
            jump_n_sample=3,
        )
        out = jax.jit(fn)(jnp.zeros((2, 4)), key=jax.random.key(0), inpaint_known=_known(2))
        jax.block_until_ready(out)
        jax.effects_barrier()
        assert len(calls) == samplers.repaint_nfe(method, 7, 2, 3), method
    assert samplers.repaint_nfe("ddim", 7, 2, 3) == 19
    assert samplers.repaint_nfe("heun", 7, 2, 3) == 37
    assert samplers.repaint_nfe("ddim", 7, 2, 1) == samplers.nfe("ddim", 7)


# ----------------------------------------------------------------------------- exactness


def test_known_region_is_bit_exact_for_every_method_and_option():
    zsnr = schedules.discrete_vp(zero_terminal_snr=True)
    edm = schedules.edm()
    cases = {
        # Every method from SNR 0 with an epsilon network (asked at its stand-in point).
        m: (zsnr, "epsilon", m, dict(placement="trailing"))
        for m in samplers.METHODS
    }
    cases.update(
        heun_churn=(edm, "x0", "heun", dict(s_churn=5.0)),
        fixed_img2img=(
            zsnr,
            "v",
            "ddim",
            dict(inpaint_noise="fixed", t_final=0.0, strength=0.5, clip_x0=True),
        ),
        repaint_ddpm=(zsnr, "v", "ddpm", dict(jump_length=2, jump_n_sample=3)),
        repaint_3m=(zsnr, "epsilon", "dpmpp_3m", dict(jump_length=2, jump_n_sample=2)),
        repaint_heun=(  # jumps back to SNR 0 (point 0): an Euler step there
            zsnr,
            "epsilon",
            "heun",
            dict(placement="trailing", jump_length=3, jump_n_sample=2),
        ),
    )
    b = 8
    mask = np.ones((b, 4), np.float32)
    mask[:, 2:] = 0.0
    mask[::2, 0] = 0.0  # per-example masks too

    @jax.jit
    def run_all(noise, known, init, key):
        out = {}
        for name, (sch, pred, method, kw) in cases.items():
            if "strength" in kw:
                kw = dict(kw, init_image=init)
            fn = _sampler(sch, pred, method, 7, inpaint_mask=mask, **kw)
            out[name] = fn(noise, key=key, inpaint_known=known)
        return out

    known = _known(b).at[:, 0].set(0.3)
    noise = jax.random.normal(jax.random.key(0), (b, 4))
    outs = run_all(noise, known, noise * 0.1, jax.random.key(1))
    for name, out in outs.items():
        out = np.asarray(out)
        assert np.all(np.isfinite(out)), name
        np.testing.assert_array_equal(out[mask == 0], np.asarray(known)[mask == 0], err_msg=name)
        assert np.all(out[mask == 1] != np.asarray(known)[mask == 1]), name  # generated
    # `fixed` noise with a deterministic method draws nothing: no key needed.
    fn = _sampler(zsnr, "v", "ddim", 4, inpaint_mask=mask, inpaint_noise="fixed")
    out = jax.jit(fn)(noise, inpaint_known=known)
    np.testing.assert_array_equal(np.asarray(out)[mask == 0], np.asarray(known)[mask == 0])


@pytest.mark.parametrize("method,kw", [("ddim", {}), ("ddpm", {}), ("heun", {"s_churn": 5.0})])
def test_mask_of_ones_is_plain_sampling_from_the_same_noise(method, kw):
    # The blend draws from its own key stream (fold_in(key, 1)); the method's own noise
    # (ddpm, churn) uses the same keys as plain sampling, so with nothing known the two
    # runs are the same computation.
    sch = schedules.discrete_vp()
    noise = jax.random.normal(jax.random.key(0), (8, 4))
    fn = _sampler(sch, "epsilon", method, 8, **kw)
    plain = jax.jit(fn)(noise, key=jax.random.key(1))
    fn = _sampler(sch, "epsilon", method, 8, inpaint_mask=np.ones((1, 4)), **kw)
    blended = jax.jit(fn)(noise, key=jax.random.key(1), inpaint_known=_known(8) + 5.0)
    np.testing.assert_array_equal(blended, plain)


# ----------------------------------------------------------------------------- laws


def _inpaint_fd(sch, pred, method, n, noise, **kw):
    b = noise.shape[0]
    fn = jax.jit(_sampler(sch, pred, method, n, inpaint_mask=MASK, **kw))
    out = np.asarray(fn(noise, key=jax.random.key(1), inpaint_known=_known(b)), np.float64)
    u = out[:, :2]
    return analytic.frechet_distance(u.mean(0), np.cov(u.T), *_conditional())


def test_inpainting_approaches_the_exact_conditional_law():
    # Blend inpainting is biased (the known region enters at its noised value, not as a
    # condition): ~1e-2 here at any number of steps past ~50, whatever the method
    # (docs/samplers.md). Its discretization error falls with the steps; RePaint's
    # resampling then harmonizes the generated coordinates with the known ones. (With
    # DDPM steps at 50 steps it does not: each pass re-adds DDPM's discretization error;
    # at 250 steps it helps, 4e-3 -> 2e-3.)
    sch = schedules.discrete_vp()
    noise = jax.random.normal(jax.random.key(0), (4000, 4))
    by_steps = [_inpaint_fd(sch, "epsilon", "ddpm", n, noise) for n in (10, 50)]
    by_jumps = [
        _inpaint_fd(sch, "epsilon", "dpmpp_2m", 50, noise, jump_length=5, jump_n_sample=r)
        for r in (1, 5)
    ]
    print(by_steps, by_jumps)
    assert by_steps[1] < 0.25 * by_steps[0], by_steps  # 7.3e-2 -> 1.1e-2
    assert by_jumps[1] < 0.35 * by_jumps[0], by_jumps  # 9.7e-3 -> 2.0e-3


def test_repaint_jumps_keep_the_data_law_when_nothing_is_known():
    # The jump is the exact forward transition: with nothing known and an accurate
    # solver, RePaint still samples the data law (3e-4 without jumps and with them at
    # 20 000 samples; a jump noise of sigma_p instead of the exact one gives 2e-2).
    sch = schedules.discrete_vp()
    noise = jax.random.normal(jax.random.key(0), (8000, 4))
    fn = _sampler(
        sch,
        "epsilon",
        "dpmpp_2m",
        50,
        inpaint_mask=np.ones((1, 4)),
        jump_length=5,
        jump_n_sample=4,
    )
    out = np.asarray(jax.jit(fn)(noise, key=jax.random.key(1), inpaint_known=_known(8000)))
    fd = analytic.frechet_distance(out.mean(0), np.cov(out.T), DATA.mean, DATA.cov)
    print(fd)
    assert fd < 3e-3, fd


# ----------------------------------------------------------------------------- inversion


def _exact_inverse(data, sch, ts, images):
    """The exact noise for `images`: the x at t_{K-1} whose exact x0 prediction is the
    image, carried by the exact probability flow to t_0, over sigma(t_0)."""
    (a0, s0), (a1, s1) = (
        tuple(float(v) for v in sch.alpha_sigma(jnp.asarray(t))) for t in (ts[0], ts[-1])
    )
    lam, u = data._evals, data._evecs
    y = (np.asarray(images) - data.mean) @ u
    x = a1 * data.mean + ((a1 * a1 * lam + s1 * s1) / (a1 * lam) * y) @ u.T
    return data.flow(jnp.asarray(x), (a1, s1), (a0, s0)) / s0


@pytest.mark.parametrize("method,order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_inversion_converges_at_the_method_order(method, order):
    # EDM, exact x0 denoiser, default placements (karras / logsnr). Measured, 12..192
    # steps: the noise vs the exact one at slope 0.99 / 2.01; the round trip
    # (regenerated image vs image) at 0.96 / 3.9 (reversed and forward 2M steps cancel
    # to leading order: 2.7e-2, 1.1e-3, 4.2e-5, 3.3e-6, 5.8e-7).
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 3))
    data = analytic.GaussianData(rng.normal(size=3) * 0.5, a @ a.T / 3 + 0.05 * np.eye(3))
    sch = schedules.edm()
    steps = (24, 48, 96)
    inv_errs, trip_errs = [], []
    with jax.enable_x64(True):
        images = data.sample(jax.random.key(0), 16, jnp.float64)
        model_fn = data.model_fn(sch, "x0")
        for n in steps:
            kw = dict(schedule=sch, method=method, num_steps=n, prediction="x0")
            noise = jax.jit(functools.partial(editing.invert, model_fn, **kw))(images)
            back = jax.jit(functools.partial(samplers.sample, model_fn, **kw))(noise)
            assert noise.dtype == back.dtype == jnp.float64
            ts = samplers.step_times(sch, n, samplers.default_placement(method, sch))
            inv_errs.append(float(jnp.max(jnp.abs(noise - _exact_inverse(data, sch, ts, images)))))
            trip_errs.append(float(jnp.max(jnp.abs(back - images))))
    inv_slope, trip_slope = (
        -np.polyfit(np.log(steps), np.log(e), 1)[0] for e in (inv_errs, trip_errs)
    )
    print(method, inv_errs, inv_slope, trip_errs, trip_slope)
    assert abs(inv_slope - order) < 0.3, (method, inv_errs, inv_slope)
    assert trip_slope > order - 0.3, (method, trip_errs, trip_slope)
    assert trip_errs[-1] < (0.15 if order == 1 else 1e-4), trip_errs


def test_inversion_at_zero_terminal_snr_with_t_final_and_clipping():
    # Into SNR 0 the last reversed step is first order (the limit, finite); t_final and
    # clipping are inverted like `sample` runs them. v prediction, exact denoiser.
    data = analytic.GaussianData(np.array([0.3, -0.2]), np.array([[0.3, 0.1], [0.1, 0.2]]))
    sch = schedules.discrete_vp(zero_terminal_snr=True)
    images = jnp.clip(data.sample(jax.random.key(0), 64), -0.95, 0.95)  # clip_x0 keeps them
    model_fn = data.model_fn(sch, "v")
    errs = []
    for n in (10, 40):
        kw = dict(schedule=sch, method="dpmpp_2m", num_steps=n, prediction="v")
        kw.update(placement="trailing", t_final=0.0, clip_x0=True)
        noise = jax.jit(functools.partial(editing.invert, model_fn, clean_iters=2, **kw))(images)
        back = jax.jit(functools.partial(samplers.sample, model_fn, **kw))(noise)
        assert np.all(np.isfinite(noise))
        errs.append(float(jnp.max(jnp.abs(back - images))))
    # Measured 2.0e-1, 4.3e-2, 5.9e-3, 6.5e-4 at 10, 20, 40, 80 steps (clean_iters=1:
    # 4.2e-1 ... 9.0e-3; the first evaluation is at the image, at t_final).
    assert errs[1] < 0.05 * errs[0] and errs[1] < 1e-2, errs


# ----------------------------------------------------------------------------- options


def test_strength_rounds_to_the_nearest_step_count():
    assert [samplers.strength_steps(10, s) for s in (0.01, 0.3, 0.35, 0.94, 1.0)] == [
        1,
        3,
        4,
        9,
        10,
    ]
    sch = schedules.discrete_vp()
    noise = jax.random.normal(jax.random.key(0), (4, 4))
    fn = _sampler(sch, "epsilon", "ddim", 10, strength=0.04, return_trajectory=True)
    _, traj = jax.jit(fn)(noise, init_image=jnp.ones((4, 4)))
    assert traj.shape == (2, 4, 4)  # one step: the start and the sample
    # strength 1 is plain sampling from the same noise, whatever init_image is.
    plain = jax.jit(_sampler(sch, "epsilon", "ddim", 10))(noise)
    one = jax.jit(_sampler(sch, "epsilon", "ddim", 10))(noise, init_image=jnp.ones((4, 4)))
    np.testing.assert_array_equal(one, plain)


def test_editing_errors():
    sch = schedules.discrete_vp()
    x = jnp.zeros((2, 4))
    f = lambda x, t: x  # noqa: E731
    run = functools.partial(samplers.sample, f, x, schedule=sch, method="ddim", num_steps=5)
    with pytest.raises(ValueError, match="inpaint_mask"):
        run(key=jax.random.key(0), inpaint_known=x)
    with pytest.raises(ValueError, match="does not broadcast"):
        run(key=jax.random.key(0), inpaint_known=x, inpaint_mask=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="must match"):
        run(key=jax.random.key(0), inpaint_known=jnp.zeros((2, 5)), inpaint_mask=jnp.ones(4))
    with pytest.raises(ValueError, match="pass key"):
        run(inpaint_known=x, inpaint_mask=jnp.ones(4))
    with pytest.raises(ValueError, match="pass key"):
        run(inpaint_known=x, inpaint_mask=jnp.ones(4), inpaint_noise="fixed", jump_n_sample=2)
    with pytest.raises(ValueError, match="inpaint_noise"):
        run(key=jax.random.key(0), inpaint_known=x, inpaint_mask=jnp.ones(4), inpaint_noise="x")
    with pytest.raises(ValueError, match="needs jump_length"):
        run(key=jax.random.key(0), inpaint_known=x, inpaint_mask=jnp.ones(4), jump_n_sample=2)
    with pytest.raises(ValueError, match="no point to jump from"):
        run(
            key=jax.random.key(0),
            inpaint_known=x,
            inpaint_mask=jnp.ones(4),
            jump_length=5,
            jump_n_sample=2,
        )
    with pytest.raises(ValueError, match="apply to inpainting"):
        run(jump_length=2, jump_n_sample=2)
    with pytest.raises(ValueError, match="integer >= 1"):
        run(key=jax.random.key(0), inpaint_known=x, inpaint_mask=jnp.ones(4), jump_n_sample=0)
    inv = functools.partial(editing.invert, f, x, schedule=sch, num_steps=5)
    for method in ("ddpm", "heun", "dpmpp_2m_sde"):
        with pytest.raises(ValueError, match="inversion supports"):
            inv(method=method)
    with pytest.raises(ValueError, match="clean_iters"):
        inv(method="ddim", clean_iters=0)
    with pytest.raises(ValueError, match="t_final"):
        inv(method="ddim", t_final=990.0)
