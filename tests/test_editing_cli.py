"""Editing a trained run: img2img, inpainting and inversion through `Generator` and the
command line (`sample.py --init_images --mask --strength`, `invert.py`, `sample.py --noise`).

The closed-form checks of the editing math are in tests/test_editing.py; here a tiny
digits run (and a latent one on the test VAE) checks the plumbing: kept pixels come back
exactly, strength 1 is plain sampling bit for bit, inversion regenerates its images, and
bad inputs fail clearly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.digits import get_config
from diffjax import experiment, parallel
from diffjax.data import digits_source
from diffjax.generate import Generator, full_mask_concat, latent_decoder
from diffjax.images import to_uint8
from diffjax.sample_fn import Edit, make_sample_fn
from diffjax.train import train_and_evaluate
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE = os.path.join(ROOT, "tests", "fixtures", "vae", "vae")


def _tiny(c):
    c.sample.num_images = 0
    c.sample.num_steps = 6
    c.model.kwargs.update(channel_mult=(1,), attention_resolutions=(), mid_attention=False)
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("edit") / "run")
    train_and_evaluate(_tiny(get_config("quick")), workdir)
    return workdir


@pytest.fixture(scope="module")
def gen(run):
    return Generator.from_workdir(run, method="ddim")


@pytest.fixture(scope="module")
def digits():
    src = digits_source("half1")
    imgs = np.stack([to_uint8(src[i]["image"]) for i in range(8)])
    labels = np.asarray([int(src[i]["labels"]) for i in range(8)])
    return imgs, labels


def _bottom_half(n, h=8, w=8):
    m = np.zeros((n, h, w), np.uint8)
    m[:, h // 2 :] = 255
    return m


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def test_strength_one_is_plain_sampling_bit_for_bit(gen, digits):
    imgs, labels = digits
    plain, _ = gen.generate(8, seed=3, labels=labels, batch_size=8)
    edited, _ = gen.generate(8, seed=3, labels=labels, batch_size=8, edit=Edit(imgs))
    np.testing.assert_array_equal(edited, plain)
    # Low strength stays near the image; it changes it (the run is not the identity).
    near, _ = gen.generate(8, seed=3, labels=labels, batch_size=8, edit=Edit(imgs, strength=0.2))
    assert _psnr(near, imgs) > _psnr(plain, imgs) + 6
    assert not np.array_equal(near, imgs)


@pytest.mark.parametrize("mode", ["blend", "repaint"])
def test_inpainting_keeps_every_known_pixel(gen, digits, mode):
    imgs, labels = digits
    masks = _bottom_half(8)
    edit = Edit(imgs, masks, inpaint=mode, jump_length=2, jump_n_sample=2)
    out, _ = gen.generate(8, seed=1, labels=labels, batch_size=8, edit=edit)
    np.testing.assert_array_equal(out[:, :4], imgs[:, :4])
    assert not np.array_equal(out[:, 4:], imgs[:, 4:])
    # One mask for all images, cycled images.
    out2, _ = gen.generate(16, seed=1, labels=labels, batch_size=8, edit=Edit(imgs, masks[:1]))
    np.testing.assert_array_equal(out2[8:, :4], imgs[:, :4])


def test_inversion_regenerates_its_images(gen, digits):
    imgs, labels = digits
    noise = gen.invert(imgs, labels=labels, batch_size=8)
    assert noise.shape == (8, 8, 8, 1) and noise.dtype == np.float32
    back, _ = gen.generate(8, labels=labels, batch_size=8, noise=noise)
    other, _ = gen.generate(8, seed=5, labels=labels, batch_size=8)
    assert _psnr(back, imgs) > 20.0, _psnr(back, imgs)  # 6 DDIM steps (about 24.7 dB)
    assert _psnr(back, imgs) > _psnr(other, imgs) + 10
    second = gen.invert(imgs, labels=labels, batch_size=8, method="dpmpp_2m")
    assert second.shape == noise.shape and not np.array_equal(second, noise)


def test_bad_edit_inputs_fail_clearly(gen, digits):
    imgs, labels = digits
    with pytest.raises(ValueError, match=r"uint8 images \[N, 8, 8, 1\]"):
        gen.generate(2, edit=Edit(np.zeros((2, 16, 16, 1), np.uint8)))
    with pytest.raises(ValueError, match=r"uint8 masks \[N, 8, 8\]"):
        gen.generate(2, edit=Edit(imgs, np.zeros((2, 4, 4), np.uint8)))
    with pytest.raises(ValueError, match="strength"):
        gen.generate(2, edit=Edit(imgs, strength=0.0))
    with pytest.raises(ValueError, match="repaint needs --mask"):
        gen.generate(2, edit=Edit(imgs, inpaint="repaint"))
    with pytest.raises(ValueError, match="--images must hold uint8 images"):
        gen.invert(imgs.astype(np.float32))


def _cli(script, *args):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_command_line_inpaint_invert_and_sample_back(run, digits, tmp_path):
    imgs, labels = digits
    np.savez(tmp_path / "imgs.npz", images=imgs)
    np.savez(tmp_path / "masks.npz", masks=_bottom_half(8))
    lab = "--labels=" + ",".join(map(str, labels))
    rc, log = _cli(
        "sample.py",
        f"--workdir={run}",
        f"--init_images={tmp_path / 'imgs.npz'}",
        f"--mask={tmp_path / 'masks.npz'}",
        "--inpaint=repaint",
        "--jump_length=2",
        "--jump_n_sample=2",
        lab,
        f"--out={tmp_path / 'inpaint.npz'}",
    )
    assert rc == 0, log
    with np.load(tmp_path / "inpaint.npz") as f:
        out = f["images"]
    assert out.shape == imgs.shape  # --num_samples defaults to the images given
    np.testing.assert_array_equal(out[:, :4], imgs[:, :4])

    rc, log = _cli(
        "invert.py",
        f"--workdir={run}",
        f"--images={tmp_path / 'imgs.npz'}",
        lab,
        "--steps=20",
        f"--out={tmp_path / 'noise.npy'}",
    )
    assert rc == 0, log
    assert "--noise=" in log  # it says how to regenerate
    noise = np.load(tmp_path / "noise.npy")
    assert noise.shape == (8, 8, 8, 1)

    # A mask without images: one clear line, before anything loads (wrong sizes:
    # test_bad_edit_inputs_fail_clearly).
    rc, log = _cli(
        "sample.py", f"--workdir={run}", f"--mask={tmp_path / 'masks.npz'}", "--out=x.npz"
    )
    assert rc == 1 and "pass --init_images too" in log


def _latent_generator():
    """A latent model on the test VAE (2x: 4x4x4 latents, 8x8x3 images) at its random
    init: the plumbing does not need a trained model."""
    c = _tiny(get_config("quick"))
    c.data.update(source="latents", image_size=4, channels=4)
    c.latent.vae = VAE
    c.diffusion.clip_x0 = False
    model, schedule = experiment.build_model(c), experiment.build_schedule(c)
    params = nn.meta.unbox(experiment.make_init_fn(model, c)(jax.random.key(0)))
    mesh = parallel.make_mesh(-1, 1)
    return Generator(
        config=c,
        params=params,
        sample_fn=make_sample_fn(model.apply, schedule, **experiment.sampler_kwargs(c)),
        mesh=mesh,
        step=0,
        decoder=latent_decoder(c, mesh),
        apply_fn=model.apply,
        schedule=schedule,
    )


def test_latent_model_edits_latents_and_pastes_kept_pixels():
    gen = _latent_generator()
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mask = np.zeros((4, 8, 8), np.uint8)
    mask[:, 5:] = 255  # rows 5-7: latent rows 2-3 regenerate (any pixel of the 2x2 block)
    out, _ = gen.generate(4, seed=0, batch_size=4, edit=Edit(imgs, mask))
    np.testing.assert_array_equal(out[:, :5], imgs[:, :5])  # pasted in pixels, exactly
    assert not np.array_equal(out[:, 5:], imgs[:, 5:])
    # The latents edited are the VAE's (posterior mean) and the mask their 'any' pooling.
    arrays, _ = gen._edit_arrays(Edit(imgs, mask), np.arange(4))
    np.testing.assert_array_equal(
        np.asarray(arrays["inpaint_mask"])[0, :, :, 0].max(1), [0, 0, 1, 1]
    )
    latents = gen.decoder.encode(jnp.asarray(imgs, jnp.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(np.asarray(arrays["inpaint_known"]), np.asarray(latents), atol=1e-5)
    # A latent inpainting model generating whole images (its grid, plain samples) sees a
    # mask of ones beside the VAE latents of a zero image.
    c = gen.config.copy_and_resolve_references()
    c.inpainting.enabled = True
    full = np.asarray(full_mask_concat(c, gen.decoder, 2))
    assert full.shape == (2, 4, 4, 5)
    np.testing.assert_array_equal(full[..., 0], 1.0)
    zero = gen.decoder.encode(jnp.zeros((2, 8, 8, 3)))
    np.testing.assert_allclose(full[..., 1:], np.asarray(zero), atol=1e-6)
