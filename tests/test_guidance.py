"""Classifier-free guidance: formula, one batched call, scale 1, interval, rescale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import guidance, samplers, schedules


def _toy_model(calls=None):
    """Output depends on x, t and the label; label 10 is the null class."""

    def cond_model_fn(x, t, cond):
        if calls is not None:
            calls.append(x.shape[0])
        lab = cond["labels"].astype(jnp.float32)[:, None]
        return 0.5 * x + 0.01 * t[:, None] + jnp.where(lab == 10, 0.0, 0.2 * lab + 1.0)

    return cond_model_fn


def test_formula_and_single_batched_call():
    calls = []
    f = _toy_model(calls)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    t = jnp.full((4,), 7.0)
    cond = {"labels": jnp.arange(4)}
    null = {"labels": jnp.full((4,), 10)}
    guided = guidance.classifier_free(f, cond, null, 3.0)(x, t)
    assert calls == [8]  # one call on the doubled batch
    c, u = f(x, t, cond), f(x, t, null)
    np.testing.assert_allclose(guided, u + 3.0 * (c - u), rtol=1e-6)


def test_scale_one_is_the_conditional_model_exactly():
    f = _toy_model()
    x = jax.random.normal(jax.random.key(1), (4, 3))
    t = jnp.full((4,), 3.0)
    cond, null = {"labels": jnp.arange(4)}, {"labels": jnp.full((4,), 10)}
    want = f(x, t, cond)
    np.testing.assert_array_equal(guidance.classifier_free(f, cond, null, 1.0)(x, t), want)
    # A traced scale of 1 is exact too.
    traced = jax.jit(lambda w: guidance.classifier_free(f, cond, null, w)(x, t))(1.0)
    np.testing.assert_array_equal(traced, want)


def test_pytree_conditioning_with_broadcast_null():
    seen = {}

    def f(x, t, cond):
        seen.update(cond)
        return x * jnp.sum(cond["context"] * cond["context_mask"][..., None], axis=(1, 2))[:, None]

    b, seq, d = 2, 5, 4
    cond = {"context": jnp.ones((b, seq, d)), "context_mask": jnp.ones((b, seq), bool)}
    null = {"context": jnp.zeros((seq, d)), "context_mask": jnp.zeros((1, seq), bool)}
    out = guidance.classifier_free(f, cond, null, 2.0)(jnp.ones((b, 3)), jnp.zeros((b,)))
    assert seen["context"].shape == (2 * b, seq, d)
    assert seen["context_mask"].dtype == jnp.bool_
    np.testing.assert_array_equal(seen["context_mask"][b:], False)
    np.testing.assert_allclose(out, 2.0 * seq * d)  # u = 0, c = 20 per element


def test_guidance_interval():
    f = _toy_model()
    x = jnp.ones((2, 3))
    cond, null = {"labels": jnp.array([1, 2])}, {"labels": jnp.array([10, 10])}
    g = guidance.classifier_free(f, cond, null, 4.0, interval=(100.0, 500.0))
    t = jnp.array([50.0, 300.0])
    out = g(x, t)
    c, u = f(x, t, cond), f(x, t, null)
    np.testing.assert_array_equal(out[0], c[0])  # outside: conditional only
    np.testing.assert_allclose(out[1], (u + 4.0 * (c - u))[1], rtol=1e-6)


def test_guidance_rescale_matches_conditional_std():
    key1, key2 = jax.random.split(jax.random.key(2))
    x = jax.random.normal(key1, (3, 8, 8, 1))
    t = jnp.full((3,), 500.0)
    noise_c = jax.random.normal(key2, x.shape)

    def f(x2, t2, cond):
        is_c = (cond == 1).astype(jnp.float32)[:, None, None, None]
        return 0.3 * x2 + is_c * jnp.concatenate([noise_c, noise_c])

    cond, null = jnp.ones(3, jnp.int32), jnp.zeros(3, jnp.int32)
    c = f(jnp.concatenate([x, x]), None, jnp.concatenate([cond, cond]))[:3]
    std = lambda a: jnp.std(a, axis=(1, 2, 3))  # noqa: E731
    full = guidance.classifier_free(f, cond, null, 7.0, rescale=1.0)(x, t)
    np.testing.assert_allclose(std(full), std(c), rtol=1e-5)
    plain = guidance.classifier_free(f, cond, null, 7.0)(x, t)
    half = guidance.classifier_free(f, cond, null, 7.0, rescale=0.5)(x, t)
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * plain, rtol=1e-5, atol=1e-6)
    # In x0 space (schedule given): the x0 of the result has the conditional x0's std.
    sch = schedules.discrete_vp()
    g = guidance.classifier_free(f, cond, null, 7.0, rescale=1.0, schedule=sch, prediction="v")
    a, s = sch.alpha_sigma(t)
    ab, sb = a[:, None, None, None], s[:, None, None, None]
    x0_of = lambda v: ab * x - sb * v  # noqa: E731  # VP v-prediction
    np.testing.assert_allclose(std(x0_of(g(x, t))), std(x0_of(c)), rtol=1e-4)


def test_one_model_call_per_sampler_step():
    calls = []

    def f(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.zeros_like(x)

    cond, null = {"labels": jnp.zeros(2, jnp.int32)}, {"labels": jnp.full(2, 10)}
    model_fn = guidance.classifier_free(f, cond, null, 5.0)
    out = jax.jit(
        lambda x: samplers.sample(
            model_fn, x, schedule=schedules.discrete_vp(), method="ddim", num_steps=7
        )
    )(jnp.ones((2, 3)))
    jax.block_until_ready(out)
    assert len(calls) == 7


def test_validation():
    f = _toy_model()
    with pytest.raises(ValueError, match="rescale"):
        guidance.classifier_free(f, {}, {}, 2.0, rescale=1.5)
    with pytest.raises(ValueError, match="interval"):
        guidance.classifier_free(f, {}, {}, 2.0, interval=(5.0, 1.0))
