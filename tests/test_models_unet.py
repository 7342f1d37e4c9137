"""U-Net: shapes, conditioning, dropout, remat, bf16 and the published parameter counts.

Compiles are the cost on CPU, so the behaviour tests share one tiny model and its
jitted apply, use random (not initialised) params, and check variants with
`jax.eval_shape`, which traces without compiling.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import build_model, build_preset, preset_kwargs
from diffjax.models import layers as L
from diffjax.models.unet import AttentionBlock, ResBlock

# One level keeps compiles cheap; resampling paths are traced in the variants test.
TINY = dict(
    base_channels=16,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_heads=2,
    num_groups=4,
    dropout=0.5,
    num_classes=10,
    scale_shift_norm=True,
    learn_sigma=True,
)
X = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
T = jnp.array([3.0, 500.0])


def _tiny(**kw):
    return build_model("unet", **{**TINY, **kw})


def _abstract(model, shape, **kw):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]), **kw)
    )["params"]


def _count(model, shape, **kw):
    return sum(
        int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(_abstract(model, shape)))
    )


def _random_params(model, shape, scale=0.1, seed=0):
    # Real init zero-initialises the output conv (every output would be 0) and
    # compiles slowly on CPU; behaviour tests want generic weights.
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * scale),
        nn.meta.unbox(_abstract(model, shape)),
    )


@functools.cache
def _apply(model):
    return jax.jit(model.apply, static_argnames=("train",))


@functools.cache
def _setup():
    m = _tiny()
    return m, _random_params(m, X.shape)


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


def test_forward_shape_dtype_and_null_class():
    m, p = _setup()
    assert p["label_emb"]["embedding"].shape == (11, 64)  # 10 classes + the null row
    f = _apply(m)
    cond = f({"params": p}, X, T, jnp.array([3, 3]))
    null = f({"params": p}, X, T, jnp.array([10, 10]))
    assert cond.shape == (2, 8, 8, 2) and cond.dtype == jnp.float32  # learned sigma: 2C
    assert np.all(np.isfinite(null))
    assert float(jnp.max(jnp.abs(cond - null))) > 1e-3
    # labels=None means the null class.
    np.testing.assert_allclose(f({"params": p}, X, T), null, rtol=1e-6, atol=1e-6)
    # Time conditioning matters.
    other_t = f({"params": p}, X, T + 100.0, jnp.array([3, 3]))
    assert float(jnp.max(jnp.abs(cond - other_t))) > 1e-3


def test_dropout_only_in_training():
    m, p = _setup()
    f = _apply(m)
    y = jnp.array([1, 2])
    tr1 = f({"params": p}, X, T, y, train=True, rngs={"dropout": jax.random.key(1)})
    tr2 = f({"params": p}, X, T, y, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(tr1 - tr2))) > 1e-3
    # Without train=True dropout is off: the eval forward differs from both.
    e1 = f({"params": p}, X, T, y)
    assert float(jnp.max(jnp.abs(e1 - tr1))) > 1e-3


@pytest.mark.parametrize(
    "kw, c_out",
    [
        (dict(resblock_updown=True, time_embedding="fourier"), 2),
        (dict(scale_shift_norm=False, conv_resample=False, learn_sigma=False), 1),
        (dict(attention_resolutions=(), mid_attention=False, head_channels=8), 2),
        (dict(channel_mult=(1, 2, 2), out_channels=3, num_classes=0), 6),
        (dict(channel_mult=(1, 2), attention_resolutions=(4,)), 2),
    ],
)
def test_variants_trace_to_the_right_shape(kw, c_out):
    m = _tiny(**kw)
    p = _abstract(m, X.shape)
    out = jax.eval_shape(lambda p: m.apply({"params": p}, X, T), p)
    assert out.shape == (2, 8, 8, c_out) and out.dtype == jnp.float32


def test_remat_gradients_equal_plain_with_dropout():
    # Block level keeps compiles cheap; train=True checks that the recomputed
    # forward redraws the same dropout mask (static `train` argument of nn.remat).
    h = jax.random.normal(jax.random.key(2), (2, 4, 4, 16))
    emb = jax.random.normal(jax.random.key(3), (2, 32))
    # An rbg key keeps the dropout RNG (drawn again in the recompute) cheaper to compile.
    rngs = {"dropout": jax.random.key(4, impl="rbg")}

    class Net(nn.Module):
        policy: str

        @nn.compact
        def __call__(self, h, emb):
            res = L.maybe_remat(ResBlock, self.policy, static_argnums=(3,))(
                32, 0.3, True, "down", 4, name="res"
            )
            attn = L.maybe_remat(AttentionBlock, self.policy)(2, 0, 4, name="attn")
            return attn(res(h, emb, True), None, None)

    def grads(policy):
        net = Net(policy)
        p = _random_params_of(net, h, emb)

        def loss(p):
            return jnp.mean(net.apply({"params": p}, h, emb, rngs=rngs) ** 2)

        return jax.jit(jax.grad(loss))(p)

    g0 = grads("none")
    g1 = grads("dots_saveable")
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)


def _random_params_of(module, *args):
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * 0.1),
        nn.meta.unbox(abstract),
    )


def test_bfloat16_close_to_float32():
    m, p = _setup()
    y = jnp.array([1, 2])
    o32 = _apply(m)({"params": p}, X, T, y)
    o16 = _apply(_tiny(dtype="bfloat16"))({"params": p}, X, T, y)
    assert o16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(o16 - o32) / jnp.linalg.norm(o32))
    assert rel < 0.05
    # Params stay float32 whatever the compute dtype.
    p16 = _abstract(_tiny(dtype="bfloat16"), X.shape)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.meta.unbox(p16)))


def test_remat_and_dtype_keep_the_param_tree():
    # Checkpoints must restore whichever remat policy or compute dtype a run picks.
    base = jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(_abstract(_tiny(), X.shape)))
    for kw in (dict(remat_policy="full"), dict(dtype="bfloat16", remat_policy="dots_saveable")):
        other = nn.meta.unbox(_abstract(_tiny(**kw), X.shape))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), other) == base


def test_params_carry_logical_axes():
    boxed = _abstract(_tiny(), X.shape)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    axes = nn.get_partition_spec(boxed)
    assert tuple(axes["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
    assert tuple(axes["label_emb"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["time_embed"]["Dense_0"]["kernel"]) == ("embed", "mlp")


def test_bad_inputs_raise_clear_errors():
    m = _tiny()
    with pytest.raises(ValueError, match="t must be"):
        jax.eval_shape(m.init, jax.random.key(0), X, jnp.ones(3))
    with pytest.raises(ValueError, match="divisible"):
        _abstract(_tiny(channel_mult=(1, 2)), (2, 7, 7, 1))
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(_tiny(num_classes=0).init, jax.random.key(0), X, T, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="context_dim=0"):
        jax.eval_shape(m.init, jax.random.key(0), X, T, None, jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="remat_policy"):
        _abstract(_tiny(remat_policy="bogus"), X.shape)
    with pytest.raises(ValueError, match="valid ones are"):
        build_model("unet", base_chanels=3)
    with pytest.raises(ValueError, match="Unknown model"):
        build_model("vae")
    assert preset_kwargs("ddpm_cifar10")["base_channels"] == 128
