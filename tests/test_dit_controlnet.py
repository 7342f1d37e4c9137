"""DiT ControlNet (issue 15): zero residuals at init, weights copied from the base, the
base's `control_residuals` (unscanned and scanned), the condition embedding's sizes and
the class / text variants."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models.dit import DiT, stack_block_params
from diffjax.models.dit_controlnet import DiTControlNet, init_from_base

BASE = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
X = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
T = jnp.array([3.0, 700.0])
LABELS = jnp.array([1, 10])  # a class and the null class
CTRL = jax.random.uniform(jax.random.key(2), (2, 8, 8, 3))
SHARED = ("patch_embed", "time_embed", "label_emb", "block0", "block1")


def _random_params(model, *args, scale=0.1, seed=0, **kw):
    """Random params of the model's shapes (non-zero gates: the base computes something)."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * scale),
        nn.meta.unbox(abstract),
    )


@functools.cache
def _run(base, cn):
    """jit: the ControlNet's init, `init_from_base`, and the base's output without and
    with the residuals (one compiled program per model pair)."""

    def f(key, bp, x, t, ctrl, kw):
        cp0 = nn.meta.unbox(cn.init(key, x, t, **kw, control=ctrl)["params"])
        cp = init_from_base(bp, cp0)
        plain = base.apply({"params": bp}, x, t, **kw)
        res = cn.apply({"params": cp}, x, t, **kw, control=ctrl)
        controlled = base.apply({"params": bp}, x, t, **kw, control_residuals=res)
        return cp0, cp, plain, res, controlled

    return jax.jit(f)


@functools.cache
def _forward(base, cn):
    """jit: (base output without control, residuals, base output with them)."""

    def f(bp, cp, x, t, ctrl, kw):
        plain = base.apply({"params": bp}, x, t, **kw)
        res = cn.apply({"params": cp}, x, t, **kw, control=ctrl)
        return plain, res, base.apply({"params": bp}, x, t, **kw, control_residuals=res)

    return jax.jit(f)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(la, lb, strict=True)
    )


@pytest.fixture(scope="module")
def setup():
    base = DiT(**BASE)
    cn = DiTControlNet(**BASE, control_depth=2, conditioning_channels=3)
    bp = _random_params(base, X, T, LABELS)
    key = jax.random.key(3, impl="rbg")  # compiles faster than threefry on XLA:CPU
    cp0, cp, plain, res, controlled = _run(base, cn)(key, bp, X, T, CTRL, {"labels": LABELS})
    return dict(base=base, cn=cn, bp=bp, cp0=cp0, cp=cp, plain=plain, res=res, out=controlled)


def test_residuals_are_exactly_zero_at_init_and_leave_the_base_unchanged(setup):
    res = setup["res"]
    assert isinstance(res, tuple) and len(res) == 2  # control_depth
    for r in res:
        assert r.shape == (2, 16, 32)  # [B, (8/2)^2 tokens, hidden]
        assert float(jnp.abs(r).max()) == 0.0
    assert float(jnp.abs(setup["plain"]).max()) > 0  # the random base computes something
    np.testing.assert_array_equal(np.asarray(setup["out"]), np.asarray(setup["plain"]))


def test_shared_weights_are_copied_and_the_rest_kept_as_initialised(setup):
    bp, cp0, cp = setup["bp"], setup["cp0"], setup["cp"]
    for k in SHARED:
        assert _leaves_equal(cp[k], bp[k]), k
        assert not _leaves_equal(cp0[k], bp[k]), k  # really copied, not equal by chance
    assert sorted(k for k in cp if k.startswith("block")) == ["block0", "block1"]
    for k in ("controlnet_cond_embedding", "control_patch_embed", "control_proj0", "control_proj1"):
        assert _leaves_equal(cp[k], cp0[k]), k
    zero = ("control_patch_embed", "control_proj0", "control_proj1")
    for k in zero:
        assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(cp[k])), k
    emb = cp["controlnet_cond_embedding"]
    # control_downsample=1: widths (16, 32) with no stride-2 stage.
    assert sorted(emb) == ["blocks.0", "blocks.1", "conv_in"]
    assert emb["conv_in"]["kernel"].shape == (3, 3, 3, 16)
    assert emb["blocks.1"]["kernel"].shape == (3, 3, 16, 32)
    assert float(jnp.abs(emb["conv_in"]["kernel"]).max()) > 0

    # A scanned base (blocks stacked under 'blocks') gives the same copy.
    assert _leaves_equal(init_from_base(stack_block_params(bp, 2), cp0), cp)
    # The layout converters leave a ControlNet's (never stacked) blocks alone.
    both = stack_block_params({"base": bp, "controlnet": cp}, 2)
    assert "blocks" in both["base"] and _leaves_equal(both["controlnet"], cp)


def test_init_from_base_refuses_a_mismatched_base(setup):
    cp0 = setup["cp0"]
    uncond = _random_params(DiT(**{**BASE, "num_classes": 0}), X, T)
    with pytest.raises(ValueError, match="no 'label_emb'"):
        init_from_base(uncond, cp0)
    wider = _random_params(DiT(**{**BASE, "hidden_size": 64}), X, T, LABELS)
    with pytest.raises(ValueError, match="'patch_embed' differs"):
        init_from_base(wider, cp0)
    with pytest.raises(ValueError, match="not a DiTControlNet"):
        init_from_base(cp0, setup["bp"])  # arguments swapped


def test_trained_controlnet_changes_the_output_and_gets_gradients(setup):
    base, cn, bp, cp = setup["base"], setup["cn"], setup["bp"], setup["cp"]
    rng = np.random.default_rng(7)
    trained = dict(cp)
    for k in ("control_patch_embed", "control_proj0", "control_proj1"):
        trained[k] = jax.tree.map(
            lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * 0.1), cp[k]
        )
    kw = {"labels": LABELS}
    bp_before = jax.tree.map(np.array, bp)

    @jax.jit
    def grads(bp, cp):
        def loss(cp):
            r = cn.apply({"params": cp}, X, T, **kw, control=CTRL)
            out = base.apply({"params": bp}, X, T, **kw, control_residuals=r)
            return jnp.mean(out**2), (r, out)

        return jax.grad(loss, has_aux=True)(cp)

    g, (res, out) = grads(bp, trained)
    assert all(float(jnp.abs(r).max()) > 0 for r in res)
    assert float(jnp.abs(out - setup["plain"]).max()) > 1e-3
    for k in ("controlnet_cond_embedding", "control_patch_embed", "block0", "control_proj1"):
        assert max(float(jnp.abs(v).max()) for v in jax.tree.leaves(g[k])) > 0, k
    # At init the zero projections block every gradient but their own.
    g0, (res0, _) = grads(bp, cp)
    assert all(float(jnp.abs(r).max()) == 0 for r in res0)
    assert float(jnp.abs(g0["control_proj0"]["kernel"]).max()) > 0
    for k in ("controlnet_cond_embedding", "control_patch_embed", "block0", "patch_embed"):
        assert max(float(jnp.abs(v).max()) for v in jax.tree.leaves(g0[k])) == 0, k
    assert _leaves_equal(bp, bp_before)  # the base is only read


def test_scanned_base_with_residuals_equals_the_unscanned_one(setup):
    base, bp = setup["base"], setup["bp"]
    scanned = DiT(**BASE, scan_layers=True)
    sp = stack_block_params(bp, 2)
    rng = np.random.default_rng(3)
    res = tuple(jnp.asarray(rng.standard_normal((2, 16, 32)).astype(np.float32)) for _ in range(2))
    kw = {"labels": LABELS}

    @jax.jit
    def outs(bp, sp, res):
        # N = 1 < depth (zero-padded in the scan) and N = depth.
        return [
            (
                base.apply({"params": bp}, X, T, **kw, control_residuals=res[:n]),
                scanned.apply({"params": sp}, X, T, **kw, control_residuals=res[:n]),
            )
            for n in (1, 2)
        ]

    pairs = outs(bp, sp, res)
    for unrolled, scan in pairs:
        np.testing.assert_allclose(np.asarray(scan), np.asarray(unrolled), atol=1e-5, rtol=1e-5)
    (a1, _), (a2, _) = pairs
    assert float(jnp.abs(a1 - setup["plain"]).max()) > 1e-3  # the residuals do something
    assert float(jnp.abs(a2 - a1).max()) > 1e-3  # ...and the second one too

    bad = (res[0], res[1][..., :8])
    for model, p in ((base, bp), (scanned, sp)):
        with pytest.raises(ValueError, match="3 control residuals but the model has depth=2"):
            jax.eval_shape(
                lambda p, m=model: m.apply({"params": p}, X, T, control_residuals=res + res[:1]), p
            )
        with pytest.raises(ValueError, match=r"residual 1 has shape \(2, 16, 8\)"):
            jax.eval_shape(
                lambda p, m=model: m.apply({"params": p}, X, T, control_residuals=bad), p
            )
        with pytest.raises(ValueError, match="tuple/list"):
            jax.eval_shape(
                lambda p, m=model: m.apply({"params": p}, X, T, control_residuals=res[0]), p
            )


def test_downsampling_condition_embedding_and_control_size_errors(setup):
    base, bp = setup["base"], setup["bp"]
    cn = DiTControlNet(
        **BASE, control_depth=1, control_downsample=2, embedding_channels=(8, 12)
    )  # conditioning_channels=0: x's 4 channels
    ctrl = jax.random.uniform(jax.random.key(4), (2, 16, 16, 4))
    # Random ControlNet params (the zero init is tested above; XLA:CPU compiles a DiT's
    # init slowly): the residuals are then non-zero.
    cp = init_from_base(bp, _random_params(cn, X, T, LABELS, control=ctrl, seed=1))
    plain, res, out = _forward(base, cn)(bp, cp, X, T, ctrl, {"labels": LABELS})
    emb = cp["controlnet_cond_embedding"]
    shapes = {k: v["kernel"].shape for k, v in emb.items()}
    # One stage: conv 8 -> 8, stride-2 conv 8 -> 12.
    assert shapes == {"conv_in": (3, 3, 4, 8), "blocks.0": (3, 3, 8, 8), "blocks.1": (3, 3, 8, 12)}
    assert cp["control_patch_embed"]["kernel"].shape == (2, 2, 12, 32)
    assert len(res) == 1 and res[0].shape == (2, 16, 32)
    assert float(jnp.abs(out - plain).max()) > 1e-3

    # An SD-like 8x latent factor: three stride-2 stages down to the latent grid.
    sd_like = DiTControlNet(**BASE, control_downsample=8, embedding_channels=(16, 32, 96, 256))
    big = jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32)
    params = jax.eval_shape(lambda c: sd_like.init(jax.random.key(0), X, T, control=c), big)
    params = params["params"]
    emb = nn.meta.unbox(params)["controlnet_cond_embedding"]
    assert [emb[f"blocks.{i}"]["kernel"].shape[-1] for i in range(6)] == [16, 32, 32, 96, 96, 256]

    for bad in ((2, 8, 8, 4), (2, 16, 16, 3), (2, 16, 15, 4)):
        with pytest.raises(ValueError, match=r"control must be \[B, H\*2, W\*2, Cc\]"):
            jax.eval_shape(
                lambda p, c: cn.apply({"params": p}, X, T, control=c), cp, jnp.zeros(bad)
            )
    with pytest.raises(ValueError, match="power of two"):
        DiTControlNet(**BASE, control_downsample=3).init(jax.random.key(0), X, T, control=ctrl)
    with pytest.raises(ValueError, match="control_depth=3 must be in"):
        DiTControlNet(**BASE, control_depth=3).init(jax.random.key(0), X, T, control=X)


def test_text_variant():
    # Token ids through the model's own text encoder, then masked cross-attention.
    fields = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=0)
    fields.update(context_dim=16, text_vocab_size=20, text_depth=1)
    kw = {"context": jnp.array([[3, 4, 0], [5, 0, 0]])}
    base, cn = DiT(**fields), DiTControlNet(**fields)  # control_depth 0: depth // 2 = 1
    bp = _random_params(base, X, T, **kw)
    cp = init_from_base(bp, _random_params(cn, X, T, **kw, control=X, seed=1))
    assert _leaves_equal(cp["text_encoder"], bp["text_encoder"])
    assert "cross_attn" in cp["block0"] and "block1" not in cp
    plain, res, out = _forward(base, cn)(bp, cp, X, T, X, kw)
    assert len(res) == 1 and res[0].shape == (2, 16, 32)
    assert float(jnp.abs(out - plain).max()) > 1e-3
