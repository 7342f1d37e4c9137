"""LoRA as a parameter-tree delta (diffjax.finetune.lora): targets, init, merge, layouts."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import models
from diffjax.finetune import lora


def _dit_params():
    m = models.build_preset("DiT-S/2", num_classes=10, depth=2, hidden_size=48, num_heads=4)
    x, t, y = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    return m, nn.meta.unbox(m.init(jax.random.key(0), x, t, labels=y)["params"])


def test_fresh_lora_leaves_the_model_bit_for_bit_unchanged():
    m, params = _dit_params()
    targets = lora.select_targets(params, lora.DEFAULT_TARGETS["dit"])
    assert targets == [
        f"block{i}.attn.{p}" for i in (0, 1) for p in ("key", "out", "query", "value")
    ]
    tree = lora.init_lora(jax.random.key(1), params, targets, rank=4)
    assert tree["block0.attn.query"]["A"].shape == (48, 4)
    assert tree["block0.attn.query"]["B"].shape == (4, 4, 12)  # [r, heads, head_dim]
    assert tree["block0.attn.out"]["A"].shape == (4, 12, 4)  # [heads, head_dim, r]
    merged = lora.merge(params, tree, 2.0)
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), merged, params)
    assert all(jax.tree.leaves(same))


def test_merge_adds_scale_times_a_at_b_and_touches_nothing_else():
    _, params = _dit_params()
    tree = lora.init_lora(jax.random.key(1), params, ["block1.attn.out"], rank=3)
    tree["block1.attn.out"]["B"] = jax.random.normal(jax.random.key(2), (3, 48))
    merged = lora.merge(params, tree, 0.5)
    a, b = tree["block1.attn.out"]["A"], tree["block1.attn.out"]["B"]
    want = params["block1"]["attn"]["out"]["kernel"] + 0.5 * jnp.einsum("hdr,ro->hdo", a, b)
    np.testing.assert_allclose(merged["block1"]["attn"]["out"]["kernel"], want, rtol=1e-6)
    merged["block1"]["attn"]["out"]["kernel"] = params["block1"]["attn"]["out"]["kernel"]
    same = jax.tree.map(lambda x, y: bool(jnp.all(x == y)), merged, params)
    assert all(jax.tree.leaves(same))


def test_conv_lora_merged_equals_conv_a_then_1x1_conv_b():
    # peft's conv LoRA: a conv with A (same kernel size, stride, padding), then a 1x1 conv B.
    k = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(k[0], (3, 3, 5, 7))
    a, b = jax.random.normal(k[1], (3, 3, 5, 2)), jax.random.normal(k[2], (2, 7))
    x = jax.random.normal(k[3], (2, 9, 9, 5))

    def conv(x, w, stride=2, pad=1):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), ((pad, pad),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    params = {"c": {"kernel": w}}
    merged = lora.merge(params, {"c": {"A": a, "B": b}}, 0.7)["c"]["kernel"]
    runtime = conv(x, w) + 0.7 * conv(conv(x, a), b[None, None], stride=1, pad=0)
    np.testing.assert_allclose(conv(x, merged), runtime, rtol=1e-4, atol=1e-4)


def test_torch_layout_round_trip_folds_the_scale_into_b():
    params = {"lin": {"kernel": np.zeros((6, 5))}, "conv": {"kernel": np.zeros((3, 3, 4, 8))}}
    rng = np.random.default_rng(0)
    tree = {
        "lin": {"A": rng.standard_normal((6, 2)), "B": rng.standard_normal((2, 5))},
        "conv": {"A": rng.standard_normal((3, 3, 4, 2)), "B": rng.standard_normal((2, 8))},
    }
    torch = lora.to_torch(tree, scale=0.25)
    assert torch["lin"][0].shape == (2, 6) and torch["lin"][1].shape == (5, 2)
    assert torch["conv"][0].shape == (2, 4, 3, 3) and torch["conv"][1].shape == (8, 2, 1, 1)
    back = lora.from_torch(
        {k: (d, u, 1.0) for k, (d, u) in torch.items()}, lora.kernel_modules(params)
    )
    for name in tree:
        np.testing.assert_allclose(
            lora.delta(back[name]), 0.25 * lora.delta(tree[name]), rtol=1e-5, atol=1e-6
        )


def test_targets_and_shapes_are_checked_by_name():
    _, params = _dit_params()
    with pytest.raises(lora.LoRAError, match="matches no Dense/Conv module.*block0"):
        lora.select_targets(params, r"to_q$")
    with pytest.raises(lora.LoRAError, match="not a valid regular expression"):
        lora.select_targets(params, "attn(")
    with pytest.raises(lora.LoRAError, match="not in the model"):
        lora.merge(params, {"nope.q": {"A": jnp.zeros((2, 1)), "B": jnp.zeros((1, 2))}})
    with pytest.raises(lora.LoRAError, match="does not fit"):
        lora.merge(params, {"patch_embed": {"A": jnp.zeros((5, 1)), "B": jnp.zeros((1, 2))}})
    with pytest.raises(lora.LoRAError, match="rank must be >= 1"):
        lora.init_lora(jax.random.key(0), params, ["block0.attn.key"], rank=0)


def _random_lora(params, pattern, rank=2, seed=3):
    targets = lora.select_targets(params, pattern)
    tree = lora.init_lora(jax.random.key(seed), params, targets, rank)
    for i, name in enumerate(sorted(tree)):  # non-zero B: the delta shows
        b = tree[name]["B"]
        tree[name]["B"] = 0.1 * jax.random.normal(jax.random.key(100 + i), b.shape)
    return tree


def test_runtime_lora_without_dropout_equals_the_merged_model():
    # diffjax's U-Net: convs (SAME, stride 2 downsampling), multi-head DenseGeneral, Dense;
    # its blocks rematerialised (the interceptor sees through nn.remat).
    m = models.build_model(
        "unet", base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,),
        num_res_blocks=1, num_groups=8, num_classes=10, remat_policy="full",
        mid_attention=False,
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t, y = jnp.array([0.3, 0.7]), jnp.array([1, 2])
    params = nn.meta.unbox(m.init(jax.random.key(1), x, t, labels=y)["params"])
    # conv_out starts at zero: its LoRA makes the output (and every other delta) show.
    pattern = r"(\.attn\.(query|key|value|out)|conv1|conv2|resample\.Conv_0|^conv_out)$"
    tree = _random_lora(params, pattern)
    assert any("resample" in n for n in tree)
    apply = jax.jit(lambda p: m.apply({"params": p}, x, t, labels=y))

    @jax.jit
    def with_runtime(p, tree):
        with nn.intercept_methods(lora.runtime(tree, 0.5)):
            return m.apply({"params": p}, x, t, labels=y)

    merged = apply(lora.merge(params, tree, 0.5))
    np.testing.assert_allclose(with_runtime(params, tree), merged, rtol=2e-4, atol=2e-5)
    base = apply(params)
    assert float(jnp.abs(merged - base).max()) > 1e-3


def test_runtime_lora_on_the_sd_unet_and_dropout():
    from diffjax.pretrained import pipeline

    u = pipeline.load_sd_unet("tests/fixtures/pipelines/tiny-sd/unet")
    tree = _random_lora(u.params, r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|conv1|proj_in)$")
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, ctx = jnp.array([10.0, 500.0]), jax.random.normal(jax.random.key(1), (2, 5, 32))

    apply = jax.jit(lambda p: u.module.apply({"params": p}, x, t, context=ctx))

    @functools.partial(jax.jit, static_argnames="rate")
    def run(params, key, rate):
        with nn.intercept_methods(lora.runtime(tree, 1.0, rate, key)):
            return u.module.apply({"params": params}, x, t, context=ctx)

    merged = apply(lora.merge(u.params, tree, 1.0))
    np.testing.assert_allclose(run(u.params, None, 0.0), merged, rtol=2e-4, atol=2e-5)
    a = run(u.params, jax.random.key(7), 0.5)
    b = run(u.params, jax.random.key(8), 0.5)
    assert float(jnp.abs(a - b).max()) > 1e-4  # the dropout masks differ by key
    np.testing.assert_array_equal(a, run(u.params, jax.random.key(7), 0.5))
    with pytest.raises(lora.LoRAError, match="dropout must lie in"):
        lora.runtime(tree, 1.0, rate=1.0)
