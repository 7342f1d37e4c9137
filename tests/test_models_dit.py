"""DiT: published parameter counts and forward cost, adaLN-Zero, null class, text masks.

Large presets are only traced (`jax.eval_shape`, `lower`), never allocated.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from diffjax import parallel
from diffjax.models import LOGICAL_AXIS_RULES, build_model, build_preset, param_shardings
from diffjax.models.dit import patchify, stack_block_params, unpatchify, unstack_block_params
from diffjax.models.partitioning import sharding_context
from diffjax.models.summary import abstract_inputs, abstract_variables, count_params, forward_flops
from diffjax.train.state import TrainState

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


# ----------------------------------------------------------------------------- scan_layers


def _params(model, seed, **kw):
    # Random values everywhere (adaLN-Zero's zeros would hide a block mix-up).
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: (rng.standard_normal(a.shape) * 0.1).astype(np.float32),
        nn.meta.unbox(_abstract(model, **kw)),
    )


SCAN = dict(depth=3, hidden_size=16, num_heads=2)


@pytest.mark.parametrize("extra", [{}, {"context_dim": 8, "num_classes": 0}])
def test_scan_layers_matches_unscanned_both_ways(extra):
    cond = dict(context=jax.random.normal(jax.random.key(5), (2, 3, 8))) if extra else {}
    if not extra:
        cond = dict(labels=jnp.array([1, 10]))
    plain, scanned = _tiny(**SCAN, **extra), _tiny(**SCAN, **extra, scan_layers=True)
    p_plain, p_scan = _params(plain, 1, **cond), _params(scanned, 2, **cond)
    stacked = stack_block_params(p_plain, SCAN["depth"])
    assert jax.tree.structure(stacked) == jax.tree.structure(p_scan)
    assert stacked["blocks"]["adaLN"]["kernel"].shape == (3, 16, 96)

    def out(model, p):
        return _apply(model)({"params": p}, X, T, **cond)

    np.testing.assert_allclose(out(scanned, stacked), out(plain, p_plain), rtol=1e-5, atol=1e-5)
    unstacked = unstack_block_params(p_scan)
    np.testing.assert_allclose(out(plain, unstacked), out(scanned, p_scan), rtol=1e-5, atol=1e-5)
    # Exact round trips.
    jax.tree.map(np.testing.assert_array_equal, unstack_block_params(stacked), p_plain)
    jax.tree.map(np.testing.assert_array_equal, stack_block_params(unstacked, 3), p_scan)


def test_scan_layers_with_remat_gradients_match_unscanned():
    kw = dict(SCAN, depth=2)
    plain = _tiny(**kw)
    scanned = _tiny(**kw, scan_layers=True, remat_policy="dots_saveable")
    p = _params(plain, 3)
    y = jnp.array([1, 10])

    def grads(model, p):
        return jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, X, T, y) ** 2)))(p)

    g_scan = unstack_block_params(grads(scanned, stack_block_params(p, 2)))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_scan, grads(plain, p)
    )


def test_scan_layers_keeps_param_count_and_flops():
    plain, scanned = _tiny(**SCAN), _tiny(**SCAN, scan_layers=True)
    inputs = abstract_inputs(plain, batch_size=2, image_size=8, channels=4)
    a, b = (
        abstract_variables(plain, inputs)["params"],
        abstract_variables(scanned, inputs)["params"],
    )
    assert count_params(a) == count_params(b)
    assert forward_flops(plain, a, inputs) == forward_flops(scanned, b, inputs)
    # The stacked axis is named, so param shardings know it (and never split it).
    spec = nn.get_partition_spec(b)["blocks"]["attn"]["query"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "heads", "kv")


def test_block_param_converters_on_a_train_state():
    # A text model: its encoder's own block0.. must stay as they are.
    kw = dict(**SCAN, context_dim=8, text_vocab_size=20, num_classes=0)
    ids = jnp.ones((2, 3), jnp.int32)
    plain, scanned = _tiny(**kw), _tiny(**kw, scan_layers=True)
    p = _params(plain, 0, context=ids)
    tx = optax.adamw(1e-3, weight_decay=0.1, mask=lambda t: jax.tree.map(lambda a: a.ndim > 1, t))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=jax.tree.map(jnp.asarray, p),
        ema_params=p,  # numpy leaves stay numpy
        opt_state=tx.init(p),
        rng=jax.random.key(0),
    )
    stacked = stack_block_params(state, 3)
    want = jax.tree.structure(nn.meta.unbox(_abstract(scanned, context=ids)))
    assert jax.tree.structure(stacked.params) == want
    assert jax.tree.structure(stacked.ema_params) == want
    assert isinstance(stacked.ema_params["blocks"]["mlp"]["Dense_0"]["kernel"], np.ndarray)
    assert (
        "block0" in stacked.params["text_encoder"]
        and "blocks" not in stacked.params["text_encoder"]
    )
    mu = stacked.opt_state[0].mu
    assert jax.tree.structure(mu) == want
    back = unstack_block_params(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, back.params, state.params)
    with pytest.raises(ValueError, match="missing"):
        stack_block_params(p, 4)
    with pytest.raises(ValueError, match="unexpected"):
        stack_block_params(p, 2)
    with pytest.raises(ValueError, match="no scanned DiT params"):
        unstack_block_params(p)
    with pytest.raises(ValueError, match="no DiT params"):
        stack_block_params({"a": jnp.zeros(2)}, 3)


# ----------------------------------------------------------------------------- sharding


def _constraint_specs(closed_jaxpr):
    """PartitionSpecs of every sharding_constraint, sub-jaxprs (scan, remat) included."""
    out = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                out.append(tuple(eqn.params["sharding"].spec))
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        visit(sub.jaxpr)  # ClosedJaxpr
                    elif hasattr(sub, "eqns"):
                        visit(sub)

    visit(closed_jaxpr.jaxpr)
    return out


def test_activation_constraints_are_no_ops_without_mesh_and_rules():
    m = _tiny(**SCAN)
    p = _params(m, 0)
    trace = jax.make_jaxpr(lambda p: m.apply({"params": p}, X, T))
    assert _constraint_specs(trace(p)) == []
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES):  # rules but no mesh
        assert _constraint_specs(trace(p)) == []


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_forward_on_a_data_fsdp_mesh(scan):
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated devices of conftest")
    mesh = parallel.make_mesh(4, 2)
    m = _tiny(**SCAN, scan_layers=scan)
    x = jax.random.normal(jax.random.key(7), (8, 8, 8, 4))
    t = jnp.linspace(1.0, 900.0, 8)
    y = jnp.arange(8) % 11
    with sharding_context(mesh):  # init traces fine inside it too
        boxed = jax.eval_shape(m.init, jax.random.key(0), x, t, y)["params"]
    shardings = param_shardings(boxed, mesh)
    p = jax.device_put(_params(m, 4), shardings)
    batch = parallel.batch_sharding(mesh)
    fwd = jax.jit(
        lambda p, x, t, y: m.apply({"params": p}, x, t, y),
        in_shardings=(shardings, batch, batch, batch),
        out_shardings=batch,
    )
    with sharding_context(mesh):
        specs = _constraint_specs(jax.make_jaxpr(fwd)(p, x, t, y))
        out = fwd(p, x, t, y)
    # Patch embedding + one per block (the scan traces its body once).
    assert len(specs) == (2 if scan else 1 + SCAN["depth"])
    assert set(specs) == {(("data", "fsdp"), None, None)}
    if scan:
        assert shardings["blocks"]["mlp"]["Dense_0"]["kernel"].spec == P(None, None, "fsdp")
    ref = _apply(m)({"params": jax.device_get(p)}, x, t, y)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
