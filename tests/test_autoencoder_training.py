"""Training an AutoencoderKL with the diffusion loop (task='autoencoder').

Tiny: the embedded 8x8 digits, `configs/digits_vae.py:quick` (block_out_channels (8, 16),
2 latent channels), batch 16. Checks the loss, exact resume, the reconstruction grid, the
diffusers-format export read back by `pipeline.load_vae`, and the refusals.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.digits_vae import get_config
from diffjax import experiment, parallel
from diffjax.export import ExportError, export_autoencoder
from diffjax.pretrained import pipeline
from diffjax.rundir import load_state, load_workdir_config
from diffjax.train import train_and_evaluate
from diffjax.train.autoencoder import kl_divergence, make_autoencoder_loss_fn

STEPS = 20


def _config(steps=STEPS):
    c = get_config("quick")
    c.train.num_steps = steps
    c.train.lr_schedule = "constant"  # so a run cut short trains like the full one
    c.train.learning_rate = 3e-3
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 10
    c.eval.every_steps = STEPS
    c.model.kwargs.mid_block_add_attention = False  # a smaller program to compile
    return c


def _state(workdir):
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, step, _ = load_state(_config(), workdir, mesh)
    return step, state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ae") / "run")
    train_and_evaluate(_config(), workdir)
    return workdir


def test_loss_falls_and_the_run_writes_grid_metrics_and_best_export(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [10, 20]
    assert {"loss", "recon", "kl", "psnr", "grad_norm"} <= set(rows[0])
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert rows[-1]["psnr"] > rows[0]["psnr"]
    # Reconstruction grid: 10 originals above their 10 reconstructions.
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(run, "samples", f"step_{STEPS:08d}.png")))
    assert grid.shape[0] == 2 * 32 + 3 and grid.shape[1] == 10 * 32 + 11
    # Periodic evaluation: reconstruction PSNR; the best params exported to best/.
    ev = json.load(open(os.path.join(run, "eval", f"step_{STEPS:08d}.json")))
    assert ev["num_images"] == 32 and np.isfinite(ev["psnr"])
    best = json.load(open(os.path.join(run, "eval", "best.json")))
    assert best["metric"] == "psnr"
    assert json.load(open(os.path.join(run, "best", "diffjax.json")))["step"] == best["step"]


def test_resume_from_a_mid_run_checkpoint_is_bitwise_identical(run, tmp_path):
    part = str(tmp_path / "part")
    shutil.copytree(run, part)
    for step in os.listdir(os.path.join(part, "checkpoints")):
        if step.isdigit() and int(step) > 10:
            shutil.rmtree(os.path.join(part, "checkpoints", step))
    train_and_evaluate(_config(), part)  # resumes at step 10
    (s1, a), (s2, b) = _state(run), _state(part)
    assert s1 == s2 == STEPS
    for x, y in zip(
        jax.tree.leaves((a.params, a.ema_params, a.opt_state)),
        jax.tree.leaves((b.params, b.ema_params, b.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [json.loads(line) for line in open(os.path.join(part, "metrics.jsonl"))]
    full = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full]


def test_export_loads_back_bit_exactly_and_encodes(run, tmp_path):
    # What `launch/export.py --workdir=RUN --out=OUT [--format=diffusers]` writes.
    out = str(tmp_path / "vae")
    _, state = _state(run)
    export_autoencoder(_config(), state.ema_params, out, step=STEPS)
    with pytest.raises(ExportError, match="already holds files"):
        export_autoencoder(_config(), state.ema_params, out, step=STEPS)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["latent_channels"] == 2
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    assert pipeline.vae_dir(out) == os.path.abspath(out)

    vae = pipeline.load_vae(out)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(state.ema_params),
        jax.tree.leaves(vae.params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    x = jnp.asarray(np.stack([get_digit(i) for i in range(4)]))
    mean, logvar = vae.module.apply({"params": vae.params}, x, method="encode")
    assert mean.shape == (4, 4, 4, 2)
    recon = vae.module.apply({"params": vae.params}, mean, method="decode")
    trained = experiment.build_model(_config()).apply({"params": state.ema_params}, x)
    np.testing.assert_array_equal(np.asarray(recon), np.asarray(trained))


def get_digit(i):
    from diffjax.data import digits_source

    return digits_source("train")[i]["image"]


def test_sampling_an_autoencoder_run_is_refused(run):
    # The check sample.py and evaluate.py make on --workdir before loading anything.
    config = load_workdir_config(run)
    assert config.task == "autoencoder"
    with pytest.raises(ValueError, match="autoencoder run.*needs a diffusion model.*export"):
        experiment.require_diffusion(config, run, "sample.py")


def test_bad_autoencoder_configs_are_refused():
    c = get_config("quick")
    c.autoencoder.recon_loss = "lpips"
    with pytest.raises(ValueError, match="autoencoder.recon_loss='lpips' is not one of"):
        experiment.check_config(c)
    c = get_config("quick")
    c.model.name = "unet"
    with pytest.raises(ValueError, match="model.name='autoencoder_kl'"):
        experiment.check_config(c)
    c = get_config("quick")
    c.diffusion.schedule = "edm"
    with pytest.raises(ValueError, match="diffusion.schedule do not apply"):
        experiment.check_config(c)
    c = get_config("quick")
    c.data.image_size = 9
    with pytest.raises(ValueError, match="not divisible"):
        experiment.check_config(c)
    with pytest.raises(ValueError, match="recon_loss='l3'"):
        make_autoencoder_loss_fn(
            lambda *a, **k: None, kl_weight=0, recon_loss="l3", sample_posterior=False
        )


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    z = jnp.zeros((2, 2, 2, 3))
    np.testing.assert_allclose(kl_divergence(z, z), 0.0)
    # KL(N(1, 1) || N(0, 1)) = 1/2 per dim, 12 dims.
    np.testing.assert_allclose(kl_divergence(z + 1.0, z), 6.0, rtol=1e-6)


# ----------------------------------------------------------------------------- LPIPS + GAN

GAN_STEPS = 4


def _gan_config(files):
    """16x16 digits (LPIPS needs >= 16x16) from an image folder, the tiny LPIPS fixture, a
    2-layer PatchGAN switched on at step 2, and rFID (random-weight Inception) at the end."""
    c = _config(GAN_STEPS)
    c.data.source = "folder"
    c.data.data_dir = files["images"]
    c.data.image_size = 16
    c.data.num_classes = 0
    # One level and no grid or adaptive weight (each tested elsewhere): less to compile.
    c.model.kwargs.block_out_channels = (4,)
    c.model.kwargs.norm_num_groups = 2
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 2
    c.sample.num_images = 0
    c.eval.every_steps = GAN_STEPS
    c.eval.num_samples = 8
    c.eval.batch_size = 8
    c.eval.reference_stats = files["stats"]
    c.eval.inception_weights = files["inception"]
    a = c.autoencoder
    a.perceptual_weight = 0.5
    a.perceptual_weights = files["lpips"]
    a.gan_weight = 0.5
    a.gan_start_step = 2
    a.disc_channels = 4
    a.disc_layers = 2
    a.gan_adaptive_weight = False
    return c


@pytest.fixture(scope="module")
def gan_files(tmp_path_factory):
    from PIL import Image

    from diffjax.eval import inception
    from diffjax.eval.stats import save_statistics
    from diffjax.models import lpips

    root = tmp_path_factory.mktemp("gan_files")
    images = root / "images"
    images.mkdir()
    for i in range(16):  # 8x8 digits, upscaled to 16x16 by the folder source
        Image.fromarray(((get_digit(i)[..., 0] + 1) * 127.5).astype(np.uint8)).save(
            images / f"{i:02d}.png"
        )
    ref = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "lpips", "reference.npz"))
    lpips.save_params(
        root / "lpips.safetensors",
        {k: ref[k] for k in ref.files if k.startswith(("features.", "lin"))},
    )
    inception.save_params(root / "inception.safetensors", inception.random_variables(0, False))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    save_statistics(root / "stats.npz", rng.normal(size=2048) * 0.1, a @ a.T / 64)
    return {
        "images": str(images),
        "lpips": str(root / "lpips.safetensors"),
        "inception": str(root / "inception.safetensors"),
        "stats": str(root / "stats.npz"),
    }


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory, gan_files):
    workdir = str(tmp_path_factory.mktemp("ae_gan") / "run")
    train_and_evaluate(_gan_config(gan_files), workdir)
    return workdir


def _gan_state(workdir, files):
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, step, _ = load_state(_gan_config(files), workdir, mesh)
    return step, state


def test_gan_run_logs_its_terms_and_switches_the_gan_on_at_the_start_step(gan_run, gan_files):
    rows = [json.loads(line) for line in open(os.path.join(gan_run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, GAN_STEPS]
    keys = {"recon", "kl", "psnr", "perceptual", "g_loss", "d_loss", "d_real", "d_fake"}
    assert keys <= set(rows[0])
    # Row 2 holds the step taken at optimizer step 1 (< gan_start_step: GAN off), row 4
    # the one at step 3 (on).
    assert rows[0]["d_loss"] == rows[0]["g_loss"] == 0.0
    assert rows[1]["d_loss"] > 0 and rows[1]["g_loss"] != 0.0
    assert rows[0]["perceptual"] > 0
    _, state = _gan_state(gan_run, gan_files)
    assert set(state.params) == {"autoencoder", "discriminator"}


def test_gan_run_resumes_bitwise(gan_run, gan_files, tmp_path):
    part = str(tmp_path / "part")
    shutil.copytree(gan_run, part)
    for step in os.listdir(os.path.join(part, "checkpoints")):
        if step.isdigit() and int(step) > 2:
            shutil.rmtree(os.path.join(part, "checkpoints", step))
    train_and_evaluate(_gan_config(gan_files), part)  # resumes at step 2, GAN off -> on
    (s1, a), (s2, b) = _gan_state(gan_run, gan_files), _gan_state(part, gan_files)
    assert s1 == s2 == GAN_STEPS
    for x, y in zip(
        jax.tree.leaves((a.params, a.ema_params, a.opt_state)),
        jax.tree.leaves((b.params, b.ema_params, b.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_gan_run_exports_the_autoencoder_and_logs_rfid(gan_run, gan_files, tmp_path):
    from diffjax import images
    from diffjax.eval import fid, inception
    from diffjax.train.hooks import fixed_images

    config = _gan_config(gan_files)
    _, state = _gan_state(gan_run, gan_files)
    out = str(tmp_path / "vae")
    export_autoencoder(config, state.ema_params, out, step=GAN_STEPS)
    vae = pipeline.load_vae(out)
    for x, y in zip(
        jax.tree.leaves(state.ema_params["autoencoder"]), jax.tree.leaves(vae.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # rFID in the eval JSON: the FID of the reconstructions of the eval images.
    ev = json.load(open(os.path.join(gan_run, "eval", f"step_{GAN_STEPS:08d}.json")))
    x = fixed_images(config, config.eval.num_samples)
    recon = vae.module.apply({"params": vae.params}, jnp.asarray(x))
    want = fid.compute_fid(
        images.to_uint8(np.asarray(recon)),
        inception.load_params(gan_files["inception"]),
        gan_files["stats"],
        batch_size=8,
        method="eigh",
    )
    assert np.isfinite(ev["rfid"]) and ev["rfid"] > 0
    np.testing.assert_allclose(ev["rfid"], want, rtol=1e-4)


def test_lpips_and_gan_configs_are_refused_when_they_cannot_work():
    c = get_config("quick")
    c.autoencoder.perceptual_weight = 1.0
    with pytest.raises(ValueError, match="needs the LPIPS weights.*convert_lpips"):
        experiment.check_config(c)
    c.autoencoder.perceptual_weights = "lpips.safetensors"
    with pytest.raises(ValueError, match="data.image_size >= 16"):
        experiment.check_config(c)
    c = get_config("quick")
    c.autoencoder.gan_start_step = 100
    with pytest.raises(ValueError, match="gan_start_step apply only with autoencoder.gan_weight"):
        experiment.check_config(c)
    c.autoencoder.gan_weight = 0.1
    c.autoencoder.gan_loss = "wgan"
    with pytest.raises(ValueError, match="gan_loss='wgan' is not one of"):
        experiment.check_config(c)
    c.autoencoder.gan_loss = "vanilla"
    c.autoencoder.disc_layers = 3  # 8x8 digits: 8 // 8 - 2 < 1
    with pytest.raises(ValueError, match="disc_layers=3 is too many for 8x8"):
        experiment.check_config(c)
    c.autoencoder.disc_layers = 1
    experiment.check_config(c)
    # Without a discriminator the params keep the autoencoder's tree (old runs resume).
    assert experiment.autoencoder_params(get_config("quick"), {"encoder": 1}) == {"encoder": 1}
    with pytest.raises(ValueError, match="should hold 'autoencoder' and 'discriminator'"):
        experiment.autoencoder_params(c, {"encoder": 1})
