"""Shared layers: time embeddings, attention, norms, remat policies, logical axis rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffjax import parallel
from diffjax.models import LOGICAL_AXIS_RULES, build_model, build_preset, param_shardings
from diffjax.models import layers as L
from diffjax.models.partitioning import partition_spec, sharding_context


def test_sinusoidal_embedding_closed_form():
    t = jnp.array([0.0, 1.0, 250.0])
    e = L.sinusoidal_embedding(t, 8)
    freqs = 10000.0 ** (-np.arange(4) / 4)
    want = np.concatenate([np.cos(np.outer(t, freqs)), np.sin(np.outer(t, freqs))], axis=1)
    np.testing.assert_allclose(e, want, rtol=1e-5, atol=1e-5)
    assert e.shape == (3, 8) and e.dtype == jnp.float32
    with pytest.raises(ValueError, match="even"):
        L.sinusoidal_embedding(t, 7)


def test_fourier_embedding_is_fixed_and_bounded():
    t = jnp.linspace(-3, 3, 5)
    a, b = L.fourier_embedding(t, 16), L.fourier_embedding(t, 16)
    np.testing.assert_array_equal(a, b)  # deterministic frequencies, not params
    np.testing.assert_allclose(a[:, :8] ** 2 + a[:, 8:] ** 2, 1.0, rtol=1e-5)  # sin^2 + cos^2
    np.testing.assert_allclose(L.fourier_embedding(jnp.zeros(1), 16)[0, 8:], 1.0)  # cos(0)


def test_timestep_embedding_applies_time_scale():
    emb = L.TimestepEmbedding(8, 16, time_scale=1000.0)
    plain = L.TimestepEmbedding(8, 16)
    p = emb.init(jax.random.key(0), jnp.zeros(2))
    np.testing.assert_allclose(
        emb.apply(p, jnp.array([0.25, 0.5])),
        plain.apply(p, jnp.array([250.0, 500.0])),
        rtol=1e-5,
    )


# Eager dispatch compiles every small op separately; one jit per shape is cheaper.
_attention = jax.jit(L.attention, static_argnames=("implementation",))


def _reference_attention(q, k, v, mask=None):
    # Textbook softmax(q k^T / sqrt(d)) v in (batch, seq, heads, head_dim) layout.
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", w, v)


def test_attention_matches_reference_and_respects_mask():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 3, 8))
    k = jax.random.normal(kk, (2, 7, 3, 8))
    v = jax.random.normal(kv, (2, 7, 3, 8))
    np.testing.assert_allclose(_attention(q, k, v), _reference_attention(q, k, v), atol=1e-5)
    mask = np.array([[1, 1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], bool)
    out = _attention(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(out, _reference_attention(q, k, v, mask), atol=1e-5)
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        L.attention(q[0], k[0], v[0])


def test_attention_with_no_real_keys_is_zero_with_finite_grads():
    q = jnp.ones((2, 4, 2, 8))
    kv = jax.random.normal(jax.random.key(1), (2, 3, 2, 8))
    mask = jnp.array([[True, False, False], [False, False, False]])
    out = _attention(q, kv, kv, mask)
    assert float(jnp.abs(out[1]).max()) == 0.0 and float(jnp.abs(out[0]).max()) > 0
    g = jax.jit(jax.grad(lambda kv: jnp.sum(L.attention(q, kv, kv, mask) ** 2)))(kv)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g[1]).max()) == 0.0


def test_attention_impl_validation():
    x = jnp.ones((1, 2, 1, 8))
    with pytest.raises(ValueError, match="attention_impl"):
        L.attention(x, x, x, implementation="flash")
    with pytest.raises(ValueError, match="bfloat16"):
        L.attention(x, x, x, implementation="cudnn")


def test_cudnn_gets_a_full_length_mask(monkeypatch):
    # cuDNN (absent on CPU) converts the mask into a bias whose query length must
    # equal T; check what we hand it.
    seen = {}

    def fake(q, k, v, mask=None, implementation=None, **kw):
        seen.update(mask=mask.shape, implementation=implementation)
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q = jnp.ones((2, 5, 3, 8), jnp.bfloat16)
    kv = jnp.ones((2, 7, 3, 8), jnp.bfloat16)
    L.attention(q, kv, kv, jnp.ones((2, 7), bool), implementation="cudnn")
    assert seen == {"mask": (2, 1, 5, 7), "implementation": "cudnn"}


def test_norms_closed_form():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) * 3 + 1
    gn = L.group_norm(2, 8, dtype=jnp.float32)
    y = jax.jit(gn.apply)(gn.init(jax.random.key(0), x), x)
    groups = np.asarray(x).reshape(2, 16, 2, 4)
    want = (groups - groups.mean((1, 3), keepdims=True)) / np.sqrt(
        groups.var((1, 3), keepdims=True) + 1e-5
    )
    np.testing.assert_allclose(y, want.reshape(x.shape), atol=1e-4)
    ln = L.layer_norm(dtype=jnp.float32, affine=False)
    assert ln.init(jax.random.key(0), x) == {}  # adaLN's norm has no params
    np.testing.assert_allclose(jax.jit(ln.apply)({}, x).mean(-1), 0.0, atol=1e-5)
    rms = L.rms_norm(dtype=jnp.float32)
    y = jax.jit(rms.apply)(rms.init(jax.random.key(0), x), x)
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(y) ** 2, -1)), 1.0, rtol=1e-3)
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        L.group_norm(32, 48, dtype=jnp.float32)
    with pytest.raises(ValueError, match="Unknown norm"):
        L.make_norm("batch", 8, dtype=jnp.float32)


def test_remat_policy_names():
    for name in L.REMAT_POLICIES:
        L.check_remat_policy(name)
    with pytest.raises(ValueError, match="dots_saveable"):
        L.check_remat_policy("dots")
    assert L.maybe_remat(nn.Dense, "none") is nn.Dense
    with pytest.raises(ValueError, match="compute dtype"):
        L.get_dtype("float8")


def test_logical_axis_rules_shard_at_most_one_dim_on_fsdp():
    # Params: 'fsdp' or nothing. Activations: the batch over every mesh axis.
    assert {mesh for _, mesh in LOGICAL_AXIS_RULES} == {"fsdp", None, ("data", "fsdp")}
    assert dict(LOGICAL_AXIS_RULES)["batch"] == parallel.BATCH_AXES
    assert dict(LOGICAL_AXIS_RULES)["layers"] is None
    model = build_model(
        "dit", patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=3, context_dim=8
    )
    boxed = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.zeros(1), None, jnp.zeros((1, 2, 8))
        )
    )["params"]
    specs = nn.get_partition_spec(boxed)
    all_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    names = {n for spec in all_specs for n in spec if n}
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    assert names <= known, names - known
    for spec in all_specs:
        mesh = nn_partitioning.logical_to_mesh_axes(tuple(spec), LOGICAL_AXIS_RULES)
        assert tuple(mesh).count("fsdp") <= 1
    qkv = nn_partitioning.logical_to_mesh_axes(
        tuple(specs["block0"]["attn"]["query"]["kernel"]), LOGICAL_AXIS_RULES
    )
    assert tuple(qkv) == ("fsdp", None, None)
    mlp = nn_partitioning.logical_to_mesh_axes(
        tuple(specs["block0"]["mlp"]["Dense_0"]["kernel"]), LOGICAL_AXIS_RULES
    )
    assert tuple(mlp) == (None, "fsdp")


def test_param_shardings_split_only_divisible_dims():
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs the 8 simulated devices of conftest")
    mesh = Mesh(devices.reshape(1, 8), ("data", "fsdp"))
    model = build_preset("unet_digits")
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1))
    )["params"]
    shardings = param_shardings(boxed, mesh)
    abstract = nn.meta.unbox(boxed)
    # The 1-channel input/output convs fall back to their 32-channel side.
    assert shardings["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")
    assert shardings["conv_out"]["kernel"].spec == P(None, None, "fsdp", None)
    assert shardings["conv_out"]["bias"].spec == P(None)  # [1]: replicated
    assert shardings["label_emb"]["embedding"].spec == P(None, "fsdp")  # 11 rows x 128
    # JAX accepts every sharding (it refuses uneven splits).
    zeros = jax.jit(
        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
        out_shardings=shardings,
    )()
    sharded = [a for a in jax.tree.leaves(zeros) if not a.sharding.is_fully_replicated]
    assert sum(a.size for a in sharded) > 0.95 * sum(a.size for a in jax.tree.leaves(zeros))


def test_partition_spec_takes_tuples_of_mesh_axes():
    sizes = {"data": 4, "fsdp": 2}
    assert partition_spec(("batch", "length", "embed"), (8, 3, 6), sizes) == P(
        ("data", "fsdp"), None, None
    )
    # A batch of 4 cannot take 8 devices; 'embed' then gets 'fsdp'.
    assert partition_spec(("batch", "length", "embed"), (4, 3, 6), sizes) == P(None, None, "fsdp")
    assert partition_spec(("layers", "embed", "mlp"), (3, 8, 8), sizes) == P(None, None, "fsdp")


def test_activation_constraints_bind_only_in_sharding_context():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated devices of conftest")
    mesh = parallel.make_mesh(4, 2)
    x = jnp.ones((8, 4, 4, 2))

    def f(x):
        return L.constrain(x * 2, L.FEATURE_MAP_AXES) + 1

    def specs():
        # A fresh function each time: JAX's trace cache does not see the context.
        eqns = jax.make_jaxpr(lambda x: f(x))(x).jaxpr.eqns
        return [tuple(e.params["sharding"].spec) for e in eqns if "sharding" in e.params]

    assert specs() == []
    with sharding_context(mesh):
        assert specs() == [(("data", "fsdp"), None, None, None)]
        np.testing.assert_array_equal(jax.jit(lambda x: f(x))(x), 3.0)
    assert L.ACTIVATION_MESH.get() is None and specs() == []


def test_unet_constrains_its_stream_under_a_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated devices of conftest")
    mesh = parallel.make_mesh(4, 2)
    model = build_model(
        "unet", base_channels=8, channel_mult=(1,), num_res_blocks=1, num_groups=4,
        attention_resolutions=(), num_classes=0,
    )  # fmt: skip
    x, t = jnp.ones((8, 4, 4, 1)), jnp.ones(8)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(np.float32),
        nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t)),
    )
    with sharding_context(mesh):
        lowered = jax.jit(model.apply).lower(variables, x, t)
    text = lowered.as_text()
    # One per ResBlock: 1 down, 2 in the middle, 2 up.
    assert text.count("sharding_constraint") + text.count("@Sharding") == 5
    out = lowered.compile()(variables, x, t)
    assert out.shape == (8, 4, 4, 1) and np.all(np.isfinite(out))
