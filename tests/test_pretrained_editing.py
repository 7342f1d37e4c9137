"""Editing with `--pretrained` pipelines: img2img, inpainting and inversion vs diffusers.

The fixtures (tests/fixtures/pipeline_editing, made by
tests/fixtures/make_pipeline_editing.py) hold diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline outputs on tiny-sd (tests/fixtures/pipelines) and on tiny-sd
with a 9-channel inpainting U-Net, from the noise diffusers drew and the VAE posterior
mean (see the script). diffjax must give the same decoded images (float, before uint8).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import images as images_lib
from diffjax import parallel
from diffjax.diffusion import editing
from diffjax.pretrained import pipeline
from diffjax.sample_fn import Edit

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.join(FIXTURES, "pipeline_editing")
SD = os.path.join(FIXTURES, "pipelines", "tiny-sd")
DIGITS = os.path.join(FIXTURES, "digits_diffusers")
TOL = 2e-5  # measured: 0.9e-6 to 3.5e-6 (float32 CPU vs torch)
B = 8  # the batch every run here compiles for (conftest's 8 CPU devices)


@pytest.fixture(scope="module")
def refs():
    with open(os.path.join(ROOT, "reference.json")) as f:
        cases = json.load(f)
    return cases, dict(np.load(os.path.join(ROOT, "reference.npz")))


@pytest.fixture(scope="module")
def sd_pipe():
    return pipeline.load_pipeline(SD)


@pytest.fixture(scope="module")
def inpaint_pipe(tmp_path_factory):
    """tiny-sd with the 9-channel U-Net, as make_pipeline_editing.inpaint_pipeline builds it."""
    d = str(tmp_path_factory.mktemp("inpaint") / "tiny-sd-inpaint")
    shutil.copytree(SD, d, ignore=shutil.ignore_patterns("unet"))
    shutil.copytree(os.path.join(ROOT, "inpaint_unet"), os.path.join(d, "unet"))
    with open(os.path.join(d, "model_index.json")) as f:
        index = json.load(f)
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    with open(os.path.join(d, "model_index.json"), "w") as f:
        json.dump(index, f)
    return pipeline.load_pipeline(d)


_GENS: dict = {}


def _gen(pipe, guidance, steps=10):
    """One generator (and its compiled runs) per pipeline, guidance and steps."""
    key = (pipe.path, guidance, steps)
    if key not in _GENS:
        _GENS[key] = pipeline.PretrainedGenerator(
            pipe, num_steps=steps, guidance=guidance, height=16, width=16
        )
    return _GENS[key]


def _decoded(gen, edit, noise, prompts):
    """`batches`' float output before uint8 (decoded, the known pixels pasted), [0, 1],
    run as `batches(batch_size=B)` runs it (B = 8 devices: the same compiled program)."""
    n = len(noise)
    idx = np.arange(B)
    z = np.concatenate([noise, np.zeros((B - n, *noise.shape[1:]), noise.dtype)])
    cond, null, _ = gen._conditions(idx, None, prompts, "")
    pixels, masks = edit.pixels(idx)
    args = jax.device_put((z, cond, null, pixels, masks), parallel.batch_sharding(gen.mesh))
    x = gen._runner(edit)(gen.params, *args[:3], jax.random.key(0), *args[3:])
    return np.clip((np.asarray(x, np.float64)[:n] + 1.0) / 2.0, 0.0, 1.0)


@pytest.mark.parametrize("case", ["img2img_g1", "img2img_g5"])
def test_img2img_matches_diffusers(refs, sd_pipe, case):
    cases, arrays = refs
    c = cases[case]
    gen = _gen(sd_pipe, c["guidance"])
    edit = Edit(arrays["images"], strength=c["strength"])
    got = _decoded(gen, edit, arrays[f"{case}_noise"], c["prompts"])
    want = arrays[f"{case}_images"]
    assert np.abs(got - want).max() < TOL
    # The uint8 images of batches are these.
    images, _ = gen.generate(
        2, prompts=c["prompts"], noise=arrays[f"{case}_noise"], edit=edit, batch_size=B
    )
    np.testing.assert_array_equal(images, images_lib.to_uint8(got * 2.0 - 1.0))


@pytest.mark.parametrize(
    "case, pipe_name",
    [("inpaint9_g5", "inpaint_pipe"), ("inpaint4_g5_s06", "sd_pipe")],
)
def test_inpainting_matches_diffusers_and_keeps_pixels(refs, request, case, pipe_name):
    """A 9-channel U-Net (concat condition, no blending) and blending with a 4-channel one
    (initial noise, mask on whole latent cells): diffusers' StableDiffusionInpaintPipeline
    where the mask regenerates; the kept pixels are the original's, exactly."""
    cases, arrays = refs
    c = cases[case]
    pipe = request.getfixturevalue(pipe_name)
    assert pipe.inpainting == (pipe_name == "inpaint_pipe")
    assert pipe.latent_channels == 4
    gen = _gen(pipe, c["guidance"])
    masks = arrays[c["mask"]]
    edit = Edit(arrays["images"], masks=masks, strength=c["strength"])
    noise = arrays[f"{case}_noise"]
    got = _decoded(gen, edit, noise, c["prompts"])
    regen = np.broadcast_to((masks >= 128)[..., None], got.shape)
    assert np.abs(got - arrays[f"{case}_images"])[regen].max() < TOL
    images, _ = gen.generate(2, prompts=c["prompts"], noise=noise, edit=edit, batch_size=B)
    np.testing.assert_array_equal(images[~regen], arrays["images"][~regen])


def test_strength_one_kept_pixels_and_the_run_cache(refs, sd_pipe):
    cases, arrays = refs
    gen = _gen(sd_pipe, 5.0)
    prompts = cases["img2img_g5"]["prompts"]
    noise = arrays["img2img_g5_noise"]
    plain, _ = gen.generate(2, prompts=prompts, noise=noise, batch_size=B)
    same, _ = gen.generate(
        2, prompts=prompts, noise=noise, edit=Edit(arrays["images"]), batch_size=B
    )
    np.testing.assert_array_equal(same, plain)  # strength 1 = plain sampling, bit for bit
    # A mask that is not aligned to the latent cells ('any' downsampling regenerates every
    # latent a masked pixel touches), one mask for both images: the kept pixels are exact.
    masks = arrays["masks_free"][:1]
    keep = np.broadcast_to((masks < 128)[..., None], plain.shape)
    edit = Edit(arrays["images"], masks=masks, strength=0.6)
    out, _ = gen.generate(2, prompts=prompts, seed=3, edit=edit, batch_size=B)
    np.testing.assert_array_equal(out[keep], arrays["images"][keep])
    assert np.abs(out[~keep].astype(int) - arrays["images"][~keep]).mean() > 5
    # One compiled run per set of static options (and mask or not), whatever the arrays.
    run = gen._runner(edit)
    assert gen._runner(Edit(arrays["images"][::-1], masks=masks[:, ::-1], strength=0.6)) is run
    assert gen._runner(Edit(arrays["images"], strength=0.6)) is not run
    repaint = Edit(arrays["images"], masks=masks, inpaint="repaint", jump_length=3)
    assert gen._runner(repaint) is not run
    assert gen._runner(Edit(arrays["images"], strength=1.0)) is gen._runner(None)


def test_inversion_round_trip(sd_pipe):
    """DDIM inversion then sampling from the inverted noise gives the image back.

    * The digits pipeline (a trained pixel model), 50 steps: PSNR >= 30 dB (measured 38.0;
      24.7 at 10 steps).
    * tiny-sd (latents, SD 1.5's DDIM with alpha_bar[0] at the end, guidance 5 with a
      negative prompt) with its U-Net's output layer zeroed, so the denoiser's epsilon is a
      constant and DDIM inversion is exact: the latents come back to float round-off, the
      image is the VAE's reconstruction of the input (within 1/255). (The random tiny VAE
      reconstructs at 8 dB only, so the random U-Net's round trip says nothing at the
      image level; on the latents its DDIM error falls with the steps: rms 1.56, 0.79,
      0.24 at 10, 100, 500 steps.)
    """
    ref = np.load(os.path.join(DIGITS, "reference.npz"))
    digits = pipeline.load_pipeline(os.path.join(DIGITS, "pipeline"))
    gen = pipeline.PretrainedGenerator(digits, num_steps=50, guidance=1.0)
    imgs = images_lib.to_uint8(ref["images_guidance_1"] * 2.0 - 1.0)
    labels = ref["labels"].tolist()
    noise = gen.invert(imgs, labels=labels, batch_size=B)
    assert noise.shape == (5, 8, 8, 1) and noise.dtype == np.float32
    back, _ = gen.generate(5, labels=labels, noise=noise, batch_size=B)
    psnr = 10 * np.log10(255.0**2 / np.mean((back.astype(np.float64) - imgs) ** 2))
    assert psnr >= 30.0, psnr

    # The compiled runs of the guidance-5 generator, on params with a constant epsilon.
    flat = copy.copy(_gen(sd_pipe, 5.0))
    den, vae = flat.params
    den = {
        **den,
        "conv_out": {**den["conv_out"], "kernel": jnp.zeros_like(den["conv_out"]["kernel"])},
    }
    flat.params = (den, vae)
    imgs = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    prompts = ["a photo of a cat", "a red car on the street"]
    noise = flat.invert(imgs, prompts=prompts, negative_prompt="blurry", batch_size=B)
    assert noise.shape == (2, 8, 8, 4) and np.abs(noise).max() > 0.1
    back, _ = flat.generate(2, prompts=prompts, negative_prompt="blurry", noise=noise, batch_size=B)
    reconstruct = jax.jit(
        lambda v, x: pipeline.decode_latents(sd_pipe, v, pipeline.encode_with(sd_pipe.vae, v, x))
    )
    recon = images_lib.to_uint8(reconstruct(vae, images_lib.uint8_to_float(imgs)))
    assert np.abs(back.astype(int) - recon).max() <= 1


def test_clear_errors(refs, sd_pipe, inpaint_pipe):
    _, arrays = refs
    imgs = arrays["images"]
    gen = _gen(sd_pipe, 5.0)
    with pytest.raises(ValueError, match=r"--mask must hold uint8 masks \[N, 16, 16\]"):
        next(gen.batches(1, prompts=["x"], edit=Edit(imgs, masks=np.zeros((1, 8, 8), np.uint8))))
    with pytest.raises(ValueError, match=r"--init_images must hold uint8 images \[N, 16, 16, 3\]"):
        next(gen.batches(1, prompts=["x"], edit=Edit(np.zeros((1, 32, 32, 3), np.uint8))))
    with pytest.raises(ValueError, match=r"--images must hold uint8 images \[N, 16, 16, 3\]"):
        gen.invert(np.zeros((1, 32, 32, 3), np.uint8), prompts=["x"])
    with pytest.raises(ValueError, match="inversion supports .*'ddim'.* not 'euler'"):
        gen.invert(imgs, prompts=["x"], method="euler")
    inp = pipeline.PretrainedGenerator(inpaint_pipe, num_steps=2, height=16, width=16)
    assert inp.latent_shape == (8, 8, 4)
    with pytest.raises(ValueError, match="SD-inpainting U-Net .* needs --mask"):
        next(inp.batches(1, prompts=["x"], edit=Edit(imgs, strength=0.5)))
    with pytest.raises(ValueError, match="SD-inpainting U-Net .*--init_images and --mask"):
        next(inp.batches(1, prompts=["x"]))
    masks = arrays["masks_free"]
    with pytest.raises(ValueError, match="--inpaint=repaint: an SD-inpainting U-Net"):
        next(inp.batches(1, prompts=["x"], edit=Edit(imgs, masks=masks, inpaint="repaint")))
    with pytest.raises(ValueError, match="SD-inpainting U-Net: it needs a mask"):
        inp.invert(imgs, prompts=["x"])


def test_mask_downsampling_modes():
    """What the two kinds of U-Net see of a mask with odd edges (factor 2)."""
    mask = np.zeros((1, 4, 4, 1), np.float32)
    mask[0, 1, 1] = 1.0  # one pixel of the top-left cell, not its top-left one
    assert float(editing.downsample_mask(mask, 2, mode="any")[0, 0, 0, 0]) == 1.0
    assert float(editing.downsample_mask(mask, 2, mode="nearest")[0, 0, 0, 0]) == 0.0
