"""DiT: published parameter counts and forward cost, adaLN-Zero, null class, text masks.

Large presets are only traced (`jax.eval_shape`, `lower`), never allocated.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import build_model, build_preset
from diffjax.models.dit import patchify, unpatchify
from diffjax.models.summary import abstract_inputs, abstract_variables, count_params, forward_flops

SIZES = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}

# Peebles & Xie 2023, Table 4 (ImageNet 256x256, 32x32x4 latent): forward GMACs
# (the paper's "Gflops" count a multiply-add once). XL/8 is 7.39 there; the
# closed form below gives 7.39 too (7.8 would exceed even the MACs of XL/4 / 4).
PAPER_GMACS = {
    "S/2": 6.06, "S/4": 1.41, "S/8": 0.36,
    "B/2": 23.01, "B/4": 5.56, "B/8": 1.42,
    "L/2": 80.71, "L/4": 19.70, "L/8": 5.01,
    "XL/2": 118.64, "XL/4": 29.05, "XL/8": 7.39,
}  # fmt: skip
# Paper parameter counts (M) per size (the patch size changes them by < 0.5%);
# they include DiT's fixed (non-trained) sin-cos position table of T x D
# entries, which is a constant, not a param, here.
PAPER_PARAMS_M = {"S": 33.0, "B": 130.3, "L": 458.0, "XL": 675.0}


def closed_form_params(depth, d, p, c_in=4, c_out=8, classes=1000, freq=256):
    block = 18 * d * d + 15 * d  # qkv+proj 4d^2+4d, MLP 8d^2+5d, adaLN 6d^2+6d
    return (
        p * p * c_in * d + d  # patch embedding
        + freq * d + d + d * d + d  # time MLP
        + (classes + 1) * d  # label table incl. the null row
        + depth * block
        + 2 * d * d + 2 * d + d * p * p * c_out + p * p * c_out  # final layer
    )  # fmt: skip


def closed_form_macs(depth, d, p, size=32, c_in=4, c_out=8, freq=256):
    tokens = (size // p) ** 2
    per_block = 12 * d * d * tokens + 2 * tokens * tokens * d + 6 * d * d
    return (
        depth * per_block
        + tokens * p * p * c_in * d  # patch embedding
        + freq * d + d * d  # time MLP
        + 2 * d * d + tokens * d * p * p * c_out  # final layer
    )  # fmt: skip


@pytest.mark.parametrize("size", list(SIZES))
def test_param_counts_and_gmacs_match_paper(size):
    depth, d = SIZES[size]
    for p in (2, 4, 8):
        model = build_preset(f"DiT-{size}/{p}")
        inputs = abstract_inputs(model, batch_size=1, image_size=32, channels=4)
        params = abstract_variables(model, inputs)["params"]
        n = count_params(params)
        assert n == closed_form_params(depth, d, p)
        with_pos_table = n + (32 // p) ** 2 * d
        assert abs(with_pos_table / (PAPER_PARAMS_M[size] * 1e6) - 1) < 0.005, (size, p, n)
        if (size, p) == ("XL", 2):
            assert with_pos_table == 675_129_632  # the official DiT-XL/2 count
        gmacs = forward_flops(model, params, inputs) / 2e9
        assert abs(gmacs / PAPER_GMACS[f"{size}/{p}"] - 1) < 0.03, (size, p, gmacs)
        # XLA's count = dot/conv MACs plus a little elementwise work.
        analytic = closed_form_macs(depth, d, p) / 1e9
        assert 1.0 <= gmacs / analytic < 1.01, (size, p, gmacs, analytic)


TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10, learn_sigma=True)
X = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
T = jnp.array([3.0, 700.0])


def _tiny(**kw):
    return build_model("dit", **{**TINY, **kw})


def _abstract(model, **kw):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), X, T, **kw))["params"]


def _random_params(model, scale=0.1, **kw):
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * scale),
        nn.meta.unbox(_abstract(model, **kw)),
    )


@functools.cache
def _apply(model):
    return jax.jit(model.apply)


def test_output_is_exactly_zero_at_init_adaln_zero():
    m = _tiny(depth=1)
    out, variables = jax.jit(m.init_with_output)(jax.random.key(0), X, T, jnp.array([1, 2]))
    assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.float32  # learned sigma: 2C
    assert float(jnp.max(jnp.abs(out))) == 0.0
    # ...while the gates and the final projection are the only zeros.
    p = nn.meta.unbox(variables["params"])
    assert float(jnp.abs(p["block0"]["attn"]["query"]["kernel"]).max()) > 0
    assert float(jnp.abs(p["block0"]["adaLN"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(p["final"]["proj"]["kernel"]).max()) == 0.0


def test_null_class_is_in_the_table_and_changes_the_output():
    m = _tiny()
    p = _random_params(m)
    assert p["label_emb"]["embedding"].shape == (11, 32)
    f = _apply(m)
    cond = f({"params": p}, X, T, jnp.array([4, 4]))
    null = f({"params": p}, X, T, jnp.array([10, 10]))
    assert np.all(np.isfinite(null))
    assert float(jnp.max(jnp.abs(cond - null))) > 1e-3
    np.testing.assert_allclose(f({"params": p}, X, T), null, rtol=1e-6, atol=1e-6)


def test_patchify_layout_and_roundtrip():
    x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
    tok = patchify(x, 4)
    assert tok.shape == (2, 6, 48)
    # Token (1, 2) = row 1, column 2 of the 2x3 grid, holds pixels [4:8, 8:12].
    np.testing.assert_array_equal(tok[:, 1 * 3 + 2].reshape(2, 4, 4, 3), x[:, 4:8, 8:12])
    np.testing.assert_array_equal(unpatchify(tok, 4, 2, 3), x)


TEXT = dict(context_dim=16, num_classes=0, depth=1)


@functools.cache
def _text_setup():
    m = _tiny(**TEXT)
    ctx = jnp.zeros((2, 5, 16))
    return m, _random_params(m, context=ctx, context_mask=jnp.ones((2, 5), bool))


def test_padded_text_tokens_do_not_change_the_output():
    m, p = _text_setup()
    k1, k2 = jax.random.split(jax.random.key(3))
    ctx = jax.random.normal(k1, (2, 5, 16))
    mask = jnp.array([[True, True, True, False, False], [True, False, False, False, False]])
    f = _apply(m)
    out = f({"params": p}, X, T, None, ctx, mask)
    junk = jnp.where(mask[..., None], ctx, 100.0 * jax.random.normal(k2, ctx.shape))
    np.testing.assert_allclose(f({"params": p}, X, T, None, junk, mask), out, atol=1e-6)
    # The real tokens do matter.
    other = ctx.at[:, 0].add(1.0)
    assert float(jnp.max(jnp.abs(f({"params": p}, X, T, None, other, mask) - out))) > 1e-4


def test_empty_caption_is_finite_and_equals_no_context():
    m, p = _text_setup()
    ctx = jax.random.normal(jax.random.key(4), (2, 5, 16))
    empty = jnp.zeros((2, 5), bool)
    f = _apply(m)
    out = f({"params": p}, X, T, None, ctx, empty)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, f({"params": p}, X, T), atol=1e-6)

    def loss(p, ctx):
        return jnp.sum(m.apply({"params": p}, X, T, None, ctx, empty) ** 2)

    g_p, g_ctx = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, ctx)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g_p))
    assert float(jnp.max(jnp.abs(g_ctx))) == 0.0


def test_remat_gradients_equal_plain():
    m = _tiny(depth=1)
    p = _random_params(m)
    y = jnp.array([1, 10])

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, X, T, y) ** 2)))(p)

    g0 = grads(m)
    g1 = grads(_tiny(depth=1, remat_policy="full"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)


def test_remat_and_dtype_keep_the_param_tree():
    base = jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(_abstract(_tiny())))
    other = nn.meta.unbox(_abstract(_tiny(remat_policy="full", dtype="bfloat16")))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), other) == base


def test_bfloat16_close_to_float32():
    m = _tiny()
    p = _random_params(m)
    y = jnp.array([1, 2])
    o32 = _apply(m)({"params": p}, X, T, y)
    o16 = _apply(_tiny(dtype="bfloat16"))({"params": p}, X, T, y)
    assert o16.dtype == jnp.float32
    assert float(jnp.linalg.norm(o16 - o32) / jnp.linalg.norm(o32)) < 0.05


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by 2"):
        jax.eval_shape(_tiny().init, jax.random.key(0), jnp.zeros((1, 7, 8, 4)), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"context must be \[2, L, 16\]"):
        _abstract(_tiny(**TEXT), context=jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="labels must be"):
        _abstract(_tiny(), labels=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="cudnn"):
        _abstract(_tiny(attention_impl="cudnn"))
