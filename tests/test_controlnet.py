"""ControlNet composition (diffjax/models/controlnet.py) and its sampling options.

The U-Net ControlNet copies the base's encoder half and leaves the base's output bit for
bit unchanged at initialisation; residuals are scaled per sample (guess mode's
logspace), summed over several ControlNets; `samplers.step_window` is diffusers'
control_guidance_start/end rule, and the sample fn applies it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import sample_fn as sample_fn_lib
from diffjax.diffusion import samplers, schedules
from diffjax.models import build_controlnet
from diffjax.models import controlnet as C
from diffjax.models.unet import UNet

KW = dict(
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_classes=3,
    dropout=0.0,
    num_groups=4,
)


def _perturb(tree, seed, std=0.05):
    # NumPy draws: jax.random on every 4-D kernel shape would compile one program each.
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(a + std * rng.standard_normal(a.shape).astype(np.float32)), tree
    )


@pytest.fixture(scope="module")
def setup():
    base = UNet(**KW)
    net = C.UNetControlNet(**KW, conditioning_channels=1, control_downsample=2)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([10.0, 500.0])
    labels = jnp.array([0, 3])
    ctrl = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1))
    # A trained-looking base: its zero-initialised output conv would hide everything.
    # rbg keys: the same inits, but XLA:CPU compiles threefry draws of 4-D kernel shapes
    # slowly (~30 s for these two inits).
    bp = jax.jit(base.init)(jax.random.key(2, impl="rbg"), x, t, labels)["params"]
    bp = _perturb(nn.meta.unbox(bp), 3)
    init = jax.jit(functools.partial(net.init, control=ctrl))
    cp = nn.meta.unbox(init(jax.random.key(4, impl="rbg"), x, t, labels)["params"])
    cp = C.init_from_base(bp, cp)
    return base, net, bp, cp, (x, t, labels, ctrl)


def test_init_leaves_the_base_bit_for_bit_unchanged(setup):
    base, net, bp, cp, (x, t, labels, ctrl) = setup
    down, mid = jax.jit(lambda p: net.apply({"params": p}, x, t, labels, control=ctrl))(cp)
    assert all(not np.any(np.asarray(r)) for r in (*down, mid))
    model = C.Controlled(base, (net,))
    plain = jax.jit(lambda p: base.apply({"params": p}, x, t, labels))(bp)
    both = jax.jit(lambda p: model.apply({"params": p}, x, t, labels, control=ctrl))(
        {"base": bp, "controlnets_0": cp}
    )
    assert np.abs(np.asarray(plain)).max() > 0.1
    np.testing.assert_array_equal(np.asarray(both), np.asarray(plain))
    # The copied encoder half is the base's own; the new parts are not in the base.
    for name in ("time_embed", "label_emb", "conv_in", "down0_res0", "down1_attn0", "mid_res1"):
        jax.tree.map(np.testing.assert_array_equal, cp[name], bp[name])
    assert {"controlnet_cond_embedding", "controlnet_mid"} <= set(cp) - set(bp)
    assert len(down) == 4  # conv_in, down0_res0, down0_resample, down1_res0


def test_training_signal_reaches_only_the_controlnet(setup):
    base, net, bp, cp, (x, t, labels, ctrl) = setup
    model = C.Controlled(base, (net,))

    def loss(cn, b):
        out = model.apply({"params": {"base": b, "controlnets_0": cn}}, x, t, labels, control=ctrl)
        return jnp.mean(out**2)

    grad = jax.jit(jax.value_and_grad(loss))
    loss0, g_cn = grad(cp, bp)

    # At init only the zero convs get a gradient (everything behind them is multiplied
    # by zero weights); after one step the layers behind them do too.
    def biggest(tree):
        return max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(tree))

    assert biggest(g_cn["controlnet_mid"]) > 0 and biggest(g_cn["down0_res0"]) == 0
    moved = jax.tree.map(lambda a, g: a - 0.1 * g, cp, g_cn)
    loss1, g2 = grad(moved, bp)
    assert biggest(g2["down0_res0"]) > 0
    assert biggest(g2["controlnet_cond_embedding"]["conv_out"]) > 0
    assert abs(float(loss1) - float(loss0)) > 1e-6  # the moved ControlNet changes the output


def test_scales_guess_mode_and_several_controlnets(setup):
    base, net, bp, cp, (x, t, labels, ctrl) = setup
    cp1 = _perturb(cp, 5)
    cp2 = _perturb(cp, 6)
    r1 = net.apply({"params": cp1}, x, t, labels, control=ctrl)
    r2 = net.apply({"params": cp2}, x, t, labels, control=1 - ctrl)
    scale = jnp.array([[0.5, 2.0], [1.0, 0.0]])
    model = C.Controlled(base, (net, net), guess_mode=True)
    got = model.apply(
        {"params": {"base": bp, "controlnets_0": cp1, "controlnets_1": cp2}},
        x,
        t,
        labels,
        control=(ctrl, 1 - ctrl),
        control_scale=scale,
    )
    # By hand: guess mode multiplies residual j (down..., mid) by 10 ** (j / (n-1) - 1).
    n = 5
    factors = 10.0 ** (np.arange(n) / (n - 1) - 1.0)
    np.testing.assert_allclose(C.guess_scales(n), factors, rtol=1e-6)
    leaves1, tree = jax.tree.flatten(r1)
    leaves2 = jax.tree.leaves(r2)
    total = [
        f * (a * scale[:, 0, None, None, None] + b * scale[:, 1, None, None, None])
        for f, a, b in zip(factors, leaves1, leaves2, strict=True)
    ]
    want = base.apply(
        {"params": bp}, x, t, labels, control_residuals=jax.tree.unflatten(tree, total)
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="2 ControlNet"):
        model.apply(
            {"params": {"base": bp, "controlnets_0": cp1, "controlnets_1": cp2}},
            x,
            t,
            labels,
            control=ctrl,
        )


def test_registry_builds_the_controlnet_of_the_base_fields(setup):
    *_, (x, t, labels, ctrl) = setup
    net = build_controlnet("unet", KW, conditioning_channels=1, control_downsample=2)
    assert isinstance(net, C.UNetControlNet) and net.embedding_channels == (16, 32)
    with pytest.raises(ValueError, match=r"control must be \[B, H, W, C\] = \[2, 16, 16, 1\]"):
        net.init(jax.random.key(0), x, t, labels, control=ctrl[:, :8, :8])
    dit = build_controlnet(
        "dit",
        dict(patch_size=2, hidden_size=32, depth=4, num_heads=4, num_classes=10),
        conditioning_channels=3,
        control_downsample=8,
        depth=3,
    )
    assert (dit.control_depth, dit.num_control_blocks, dit.embedding_channels) == (
        3,
        3,
        (16, 32, 96, 256),
    )
    res = jax.eval_shape(
        lambda: dit.init_with_output(
            jax.random.key(0),
            jnp.zeros((2, 4, 4, 4)),
            jnp.zeros((2,)),
            jnp.zeros((2,), jnp.int32),
            control=jnp.zeros((2, 32, 32, 3)),
        )[0]
    )
    assert [r.shape for r in res] == [(2, 4, 32)] * 3
    with pytest.raises(ValueError, match="power of two"):
        C.embedding_widths((), 3)
    with pytest.raises(ValueError, match="has no ControlNet"):
        build_controlnet("autoencoder_kl", {}, conditioning_channels=1)


@pytest.mark.parametrize("n", [10, 7])
@pytest.mark.parametrize("window", [(0.0, 1.0), (0.2, 0.7), (0.35, 0.5), (0.0, 0.05)])
def test_step_window_is_diffusers_keep_rule(n, window):
    sched = schedules.make_schedule("discrete_vp", beta_schedule="scaled_linear")
    start, end = window
    ts = samplers.step_times(sched, n, "leading")
    lo, hi = samplers.step_window(sched, "ddim", n, start, end, placement="leading")
    # diffusers: keep_i = 1 - float(i / N < start or (i + 1) / N > end)
    keep = [not (i / n < start or (i + 1) / n > end) for i in range(n)]
    assert [bool(lo <= t <= hi) for t in ts] == keep


def test_sample_fn_window_and_guess_mode(setup):
    base, net, bp, cp, (x, t, labels, ctrl) = setup
    cp = _perturb(cp, 7, std=0.2)
    model = C.Controlled(base, (net,))
    params = {"base": bp, "controlnets_0": cp}
    sched = schedules.make_schedule("discrete_vp")
    kw = dict(method="ddim", num_steps=4, num_classes=3)
    cond = {"labels": labels, "control": ctrl, "control_scale": jnp.ones((2, 1))}
    key = jax.random.key(0)

    plain = sample_fn_lib.make_sample_fn(model.apply, sched, **kw)
    empty = samplers.step_window(sched, "ddim", 4, 0.0, 0.2)  # no step qualifies
    assert empty[0] > empty[1]
    windowed = sample_fn_lib.make_sample_fn(model.apply, sched, **kw, control_window=empty)
    off = np.asarray(plain(params, x, {**cond, "control_scale": jnp.zeros((2, 1))}, key))
    np.testing.assert_allclose(np.asarray(windowed(params, x, cond, key)), off, atol=1e-6)
    assert np.abs(np.asarray(plain(params, x, cond, key)) - off).max() > 1e-3
    # Guess mode: the derived null condition runs without control.
    null = sample_fn_lib.null_condition(cond, 3, guess_mode=True)
    assert not np.any(np.asarray(null["control_scale"])) and np.all(np.asarray(null["labels"]) == 3)
    assert np.all(np.asarray(sample_fn_lib.null_condition(cond, 3)["control_scale"]) == 1)
