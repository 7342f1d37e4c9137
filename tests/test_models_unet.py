"""U-Net: shapes, conditioning, dropout, remat, bf16 and the published parameter counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import build_model, build_preset, preset_kwargs


def _count(model, shape, **kw):
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]), **kw)
    )
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(variables["params"])))


def _tiny(**kw):
    base = dict(
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        num_groups=4,
        dropout=0.0,
        num_classes=10,
    )
    base.update(kw)
    return build_model("unet", **base)


def _init(model, x, t, **kw):
    return nn.meta.unbox(model.init(jax.random.key(0), x, t, **kw)["params"])


def _randomize(params, scale=0.05):
    # Zero-initialised output convs make every output 0; perturb for behaviour tests.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(
        tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    )


def test_ddpm_cifar10_param_count_matches_paper():
    # Ho et al. 2020: 35.7M; the reference implementation has 35,746,307.
    n = _count(build_preset("ddpm_cifar10"), (1, 32, 32, 3))
    assert n == 35_746_307
    assert abs(n / 35.7e6 - 1) < 0.005


def test_adm_imagenet64_param_count_matches_paper():
    # Dhariwal & Nichol 2021, class-conditional ImageNet 64x64: ~296M.
    n = _count(build_preset("adm_imagenet64"), (1, 64, 64, 3))
    assert abs(n / 296e6 - 1) < 0.005


def test_digits_unet_is_cpu_sized():
    n = _count(build_preset("unet_digits"), (1, 8, 8, 1))
    assert 0.5e6 < n < 1.5e6


def test_forward_shapes_and_learned_sigma():
    x = jnp.ones((2, 8, 8, 1))
    t = jnp.array([3.0, 500.0])
    for learn_sigma, c_out in ((False, 1), (True, 2)):
        m = _tiny(learn_sigma=learn_sigma)
        p = _init(m, x, t)
        out = m.apply({"params": p}, x, t, jnp.array([1, 10]))
        assert out.shape == (2, 8, 8, c_out) and out.dtype == jnp.float32
        # Zero-initialised output conv (ADM): the untrained net predicts 0.
        assert float(jnp.max(jnp.abs(out))) == 0.0


def test_null_class_path_differs_and_is_finite():
    m = _tiny(scale_shift_norm=True)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([10.0, 10.0])
    p = _randomize(_init(m, x, t))
    assert p["label_emb"]["embedding"].shape == (11, 64)  # 10 classes + null row
    cond = m.apply({"params": p}, x, t, jnp.array([3, 3]))
    null = m.apply({"params": p}, x, t, jnp.array([10, 10]))
    default = m.apply({"params": p}, x, t)
    assert np.all(np.isfinite(null))
    assert float(jnp.max(jnp.abs(cond - null))) > 1e-4
    np.testing.assert_array_equal(null, default)  # labels=None is the null class


def test_time_conditioning_and_time_scale():
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 1))
    m = _tiny(num_classes=0)
    p = _randomize(_init(m, x, jnp.zeros(1)))
    a = m.apply({"params": p}, x, jnp.array([0.1]))
    b = m.apply({"params": p}, x, jnp.array([0.9]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    m1000 = _tiny(num_classes=0, time_scale=1000.0)
    np.testing.assert_allclose(
        m1000.apply({"params": p}, x, jnp.array([0.1])),
        m.apply({"params": p}, x, jnp.array([100.0])),
        rtol=1e-5,
        atol=1e-5,
    )


def test_dropout_only_in_training():
    m = _tiny(dropout=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([1.0, 2.0])
    p = _randomize(_init(m, x, t))
    e1 = m.apply({"params": p}, x, t)
    e2 = m.apply({"params": p}, x, t)
    np.testing.assert_array_equal(e1, e2)
    tr1 = m.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(1)})
    tr2 = m.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(tr1 - tr2))) > 1e-4


def test_resblock_updown_fourier_and_additive_variants_run():
    x = jnp.ones((2, 8, 8, 3))
    t = jnp.array([0.5, 0.7])
    m = _tiny(resblock_updown=True, scale_shift_norm=True, time_embedding="fourier")
    out = m.apply({"params": _init(m, x, t)}, x, t)
    assert out.shape == (2, 8, 8, 3)
    m = _tiny(conv_resample=False, attention_resolutions=(), mid_attention=False, head_channels=8)
    out = m.apply({"params": _init(m, x, t)}, x, t)
    assert out.shape == (2, 8, 8, 3)


def test_remat_gradients_equal_plain():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([1.0, 2.0])
    y = jnp.array([0, 10])
    plain = _tiny(scale_shift_norm=True)
    p = _randomize(_init(plain, x, t))

    def grads(model):
        def loss(p):
            return jnp.mean(model.apply({"params": p}, x, t, y) ** 2)

        return jax.grad(loss)(p)

    g0 = grads(plain)
    for policy in ("full", "dots_saveable"):
        g1 = grads(_tiny(scale_shift_norm=True, remat_policy=policy))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)


def test_bfloat16_close_to_float32():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([1.0, 2.0])
    m32 = _tiny()
    p = _randomize(_init(m32, x, t))
    o32 = m32.apply({"params": p}, x, t)
    o16 = _tiny(dtype="bfloat16").apply({"params": p}, x, t)
    assert o16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(o16 - o32) / jnp.linalg.norm(o32))
    assert rel < 0.05
    # Params stay float32 whatever the compute dtype.
    p16 = _init(_tiny(dtype="bfloat16"), x, t)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p16))


def test_params_carry_logical_axes():
    m = _tiny()
    boxed = m.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), jnp.ones(1))["params"]
    axes = nn.get_partition_spec(boxed)
    assert tuple(axes["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
    assert tuple(axes["label_emb"]["embedding"]) == ("vocab", "embed")
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert all(isinstance(v, nn.Partitioned) for v in leaves)


def test_bad_inputs_raise_clear_errors():
    m = _tiny()
    x = jnp.ones((2, 8, 8, 1))
    with pytest.raises(ValueError, match="t must be"):
        m.init(jax.random.key(0), x, jnp.ones(3))
    with pytest.raises(ValueError, match="divisible"):
        m.init(jax.random.key(0), jnp.ones((2, 7, 7, 1)), jnp.ones(2))
    with pytest.raises(ValueError, match="num_classes=0"):
        _tiny(num_classes=0).init(jax.random.key(0), x, jnp.ones(2), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="remat_policy"):
        _tiny(remat_policy="bogus").init(jax.random.key(0), x, jnp.ones(2))
    with pytest.raises(ValueError, match="valid ones are"):
        build_model("unet", base_chanels=3)
    assert preset_kwargs("ddpm_cifar10")["base_channels"] == 128
