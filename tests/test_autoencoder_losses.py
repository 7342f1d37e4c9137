"""The autoencoder's extra losses: LPIPS (parity with a torch fixture), the converter,
the PatchGAN, the GAN formulas, the stop-gradient split of the one summed loss, taming's
adaptive weight, and the step before `gan_start_step`.

The LPIPS fixture (`tests/fixtures/lpips/`, made by `tests/fixtures/make_lpips.py`) is a
tiny random-weight VGG16 (block widths 4, 6, 8, 8, 8) with non-negative lin layers and
the distances torch computes for a few image pairs.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.cli import convert_lpips
from diffjax.models import lpips
from diffjax.models.autoencoder_kl import AutoencoderKL
from diffjax.models.discriminator import PatchDiscriminator, output_size
from diffjax.train import autoencoder as ae_loss
from diffjax.train.state import make_optimizer
from diffjax.train.step import init_train_state, make_train_step

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "lpips")


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURE, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


def _torch_tensors(ref):
    return {k: v for k, v in ref.items() if k.startswith(("features.", "lin"))}


@pytest.fixture(scope="module")
def lpips_params(ref):
    return lpips.torch_to_flax(_torch_tensors(ref))


# ----------------------------------------------------------------------------- LPIPS


def test_lpips_matches_the_torch_reference_and_is_a_distance(ref, lpips_params):
    module = lpips.module_for(lpips_params)
    assert module.widths == (4, 6, 8, 8, 8)
    dist = jax.jit(lambda x, y: module.apply({"params": lpips_params}, x, y))
    np.testing.assert_allclose(dist(ref["x"], ref["y"]), ref["distance"], rtol=1e-5)
    # One channel is repeated to three (the fixture's gray pairs were repeated in torch).
    np.testing.assert_allclose(dist(ref["gray_x"], ref["gray_y"]), ref["gray_distance"], rtol=1e-5)
    np.testing.assert_allclose(dist(ref["x"], ref["x"]), 0.0, atol=1e-12)
    np.testing.assert_allclose(dist(ref["y"], ref["x"]), dist(ref["x"], ref["y"]), rtol=1e-6)
    with pytest.raises(ValueError, match="at least 16x16"):
        module.apply({"params": lpips_params}, ref["x"][:, :8, :8], ref["y"][:, :8, :8])


def test_converter_round_trip_and_refusals(ref, lpips_params, tmp_path):
    vgg = {k: v for k, v in ref.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = np.zeros((5, 8), np.float32)  # dropped, as torchvision's
    lin = {k: v for k, v in ref.items() if k.startswith("lin")}
    tensors = convert_lpips.lpips_tensors(vgg, lin)
    assert "classifier.0.weight" not in tensors
    path = str(tmp_path / "lpips.safetensors")
    lpips.save_params(path, tensors)
    loaded = lpips.load_params(path)
    for (p, a), b in zip(
        jax.tree_util.tree_leaves_with_path(lpips_params), jax.tree.leaves(loaded), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=str(p))
    back = lpips.flax_to_torch(loaded)
    assert set(back) == set(tensors)
    for k, v in back.items():
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)
    # The frozen tree the loss reads.
    assert set(ae_loss.frozen_params(path)) == {"lpips"}

    with pytest.raises(ValueError, match=r"missing lin4\.model\.1\.weight"):
        convert_lpips.lpips_tensors(vgg, {k: v for k, v in lin.items() if "lin4" not in k})
    with pytest.raises(ValueError, match=r"unexpected features\.1\.running_mean"):  # vgg16_bn
        convert_lpips.lpips_tensors({**vgg, "features.1.running_mean": np.zeros(4)}, lin)
    with pytest.raises(ValueError, match="negative"):
        convert_lpips.lpips_tensors(
            vgg, {**lin, "lin0.model.1.weight": -lin["lin0.model.1.weight"]}
        )
    with pytest.raises(FileNotFoundError, match="convert_lpips"):
        lpips.load_params(str(tmp_path / "missing.safetensors"))


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_converter_names_the_torch_install_when_torch_is_missing():
    with pytest.raises(ValueError, match="pip install torch"):
        convert_lpips.read_torch_state_dict(os.path.join(FIXTURE, "tiny_lin.pth"))


# ----------------------------------------------------------------------------- PatchGAN


def test_patch_discriminator_shapes():
    # Shapes only (jax.eval_shape): nothing is computed or compiled.
    for size, layers in ((16, 2), (32, 3), (20, 2)):
        d = PatchDiscriminator(channels=4, num_layers=layers)
        x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        params = jax.eval_shape(d.init, jax.random.key(0), x)
        out = jax.eval_shape(d.apply, params, x)
        s = output_size(size, layers)
        assert out.shape == (2, s, s, 1) and out.dtype == jnp.float32
    # Widths double and cap at 8x; the first conv has a bias and no norm, normed ones none.
    x = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
    params = nn.meta.unbox(
        jax.eval_shape(PatchDiscriminator(channels=4, num_layers=4).init, jax.random.key(0), x)
    )["params"]
    kernels = [params[f"conv_{i}"]["kernel"].shape for i in range(6)]
    assert [k[-1] for k in kernels] == [4, 8, 16, 32, 32, 1]
    assert kernels[0] == (4, 4, 1, 4)
    assert "bias" in params["conv_0"] and "bias" not in params["conv_1"]
    assert "conv_1_norm" in params and "conv_0_norm" not in params
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(
            PatchDiscriminator(num_layers=3).init,
            jax.random.key(0),
            jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32),
        )


def test_gan_loss_formulas_on_known_logits():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 2.5]
    np.testing.assert_allclose(
        ae_loss.discriminator_loss("hinge", real, fake), 0.5 * (2.5 / 3 + 3.5 / 3), rtol=1e-6
    )
    np.testing.assert_allclose(ae_loss.generator_loss("hinge", fake), 0.5 / 3, rtol=1e-6)
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    expected_d = 0.5 * (softplus(-np.asarray(real)).mean() + softplus(np.asarray(fake)).mean())
    np.testing.assert_allclose(
        ae_loss.discriminator_loss("vanilla", real, fake), expected_d, rtol=1e-6
    )
    np.testing.assert_allclose(
        ae_loss.generator_loss("vanilla", fake), softplus(-np.asarray(fake)).mean(), rtol=1e-6
    )
    with pytest.raises(ValueError, match="gan_loss='wgan'"):
        ae_loss.generator_loss("wgan", fake)


# ----------------------------------------------------------------------------- the summed loss

AE = AutoencoderKL(
    in_channels=1,
    out_channels=1,
    block_out_channels=(4,),  # one level: the smallest program to compile
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=2,
    mid_block_add_attention=False,
)
DISC = PatchDiscriminator(channels=4, num_layers=1)


@functools.cache
def _setup():
    """Random params drawn in numpy on the init's abstract tree (no init to compile)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    abstract = nn.meta.unbox(
        jax.eval_shape(
            lambda x: {
                "autoencoder": AE.init(jax.random.key(0), x)["params"],
                "discriminator": DISC.init(jax.random.key(1), x)["params"],
            },
            x,
        )
    )

    def draw(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if path[-1].key == "scale":
            return jnp.asarray(1.0 + 0.1 * noise)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 25
        return jnp.asarray(noise / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(draw, abstract), {"image": x}


def _loss(**kw):
    base = dict(kl_weight=1e-3, recon_loss="l1", sample_posterior=False)
    return ae_loss.make_autoencoder_loss_fn(AE.apply, **base, **kw)


def test_stop_gradients_split_the_summed_loss():
    params, batch = _setup()
    x, w_g = batch["image"], 0.7
    loss_fn = _loss(disc_apply=DISC.apply, gan_weight=w_g, gan_adaptive_weight=False)
    plain = _loss()

    def generator(ae):  # the autoencoder's loss alone: rec + KL + w_g * L_G(D(x_hat))
        recon = AE.apply({"params": ae}, x)
        fake = DISC.apply({"params": params["discriminator"]}, recon)
        nll = plain(ae, batch, jax.random.key(0))[0]
        return nll + w_g * ae_loss.generator_loss("hinge", fake)

    def discriminator(d):  # L_D alone, on fixed reconstructions
        recon = AE.apply({"params": params["autoencoder"]}, x)
        return ae_loss.discriminator_loss(
            "hinge", DISC.apply({"params": d}, x), DISC.apply({"params": d}, recon)
        )

    @jax.jit  # one program for both sides
    def both(p):
        summed = jax.grad(lambda q: loss_fn(q, batch, jax.random.key(0), None, jnp.int32(0))[0])
        alone = {
            "autoencoder": jax.grad(generator)(p["autoencoder"]),
            "discriminator": jax.grad(discriminator)(p["discriminator"]),
        }
        return summed(p), alone

    grads, want = both(params)
    for (p, a), b in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want), strict=True
    ):
        # Not bitwise: the loss runs D once on [x, x_hat] concatenated.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(p))


def test_adaptive_weight_is_tamings_gradient_ratio_at_the_last_layer():
    params, batch = _setup()
    x = batch["image"]
    loss_fn = _loss(disc_apply=DISC.apply, gan_weight=1.0, gan_adaptive_weight=True)
    _, aux = jax.jit(loss_fn)(params, batch, jax.random.key(0), None, jnp.int32(0))

    def with_last(w):
        ae = dict(params["autoencoder"])
        ae["decoder"] = {**ae["decoder"], "conv_out": {**ae["decoder"]["conv_out"], "kernel": w}}
        return AE.apply({"params": ae}, x)

    w0 = params["autoencoder"]["decoder"]["conv_out"]["kernel"]
    rec_grad = jax.grad(lambda w: jnp.mean(jnp.abs(with_last(w) - x)))(w0)
    g_grad = jax.grad(
        lambda w: -jnp.mean(DISC.apply({"params": params["discriminator"]}, with_last(w)))
    )(w0)
    want = np.linalg.norm(rec_grad) / (np.linalg.norm(g_grad) + 1e-4)
    assert 1e-3 < want < 1e4  # not clipped, so the ratio itself is checked
    np.testing.assert_allclose(aux["g_scale"], want, rtol=1e-4)
    np.testing.assert_allclose(ae_loss.adaptive_weight(jnp.ones(3), jnp.zeros(3)), 1e4)


def test_before_gan_start_step_the_autoencoder_update_equals_a_run_without_gan():
    params, batch = _setup()
    tx, lr = make_optimizer(learning_rate=1e-2, grad_clip=1.0)
    gan = _loss(disc_apply=DISC.apply, gan_weight=0.5, gan_start_step=1)
    runs = {}
    for name, fn, init in (
        ("gan", gan, lambda k: params),
        ("plain", _loss(), lambda k: params["autoencoder"]),
    ):
        step = jax.jit(make_train_step(fn, tx, lr, ema_decay=0.9, has_aux=True))
        state = init_train_state(jax.random.key(0), init, tx, unbox=True)
        state, metrics = step(state, batch)  # step 0: the GAN is still off
        runs[name] = (state, metrics)
        if name == "gan":
            assert float(metrics["d_loss"]) == 0.0 and float(metrics["g_loss"]) == 0.0
            np.testing.assert_array_equal(  # the discriminator got no gradient
                jax.tree.leaves(state.params["discriminator"])[0],
                jax.tree.leaves(params["discriminator"])[0],
            )
            state, metrics = step(state, batch)  # step 1: on
            assert float(metrics["d_loss"]) > 0
    (g, gm), (p, pm) = runs["gan"], runs["plain"]
    assert float(gm["loss"]) == float(pm["loss"])
    for a, b in zip(
        jax.tree.leaves((g.params["autoencoder"], g.ema_params["autoencoder"])),
        jax.tree.leaves((p.params, p.ema_params)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
