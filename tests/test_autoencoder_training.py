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
