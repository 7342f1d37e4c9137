"""Fine-tuning a Stable Diffusion pipeline: frozen VAE + CLIP in the train step.

On the tiny random SD pipeline of tests/fixtures/pipelines/tiny-sd (whose sampling
matches diffusers' StableDiffusionPipeline, tests/test_pretrained_pipeline.py):
`--config.pretrained` resolves the config from the directory, the frozen stage encodes
images and captions exactly as the pipeline's own components do, a run starts from the
pipeline's U-Net, keeps the frozen weights out of its checkpoints, samples prompts, and
exports a StableDiffusionPipeline that samples the same images as the run.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.sd_finetune import get_config
from diffjax import experiment, parallel
from diffjax.data.tokens import tokenize
from diffjax.export import export_diffusers
from diffjax.generate import Generator
from diffjax.models import autoencoder_kl
from diffjax.pretrained import pipeline, stage
from diffjax.rundir import load_state, load_workdir_config
from diffjax.train import train_and_evaluate

SD = os.path.join(os.path.dirname(__file__), "fixtures", "pipelines", "tiny-sd")
DIT = os.path.join(os.path.dirname(__file__), "fixtures", "pipelines", "tiny-dit")
CAPTIONS = ["a red square", "a blue circle", "two green cats"]


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(CAPTIONS[i % 3])
    return str(d)


def _config(images_dir, **train):
    c = get_config("quick")
    c.pretrained = SD
    c.data.data_dir = images_dir
    c.model.remat_policy = "none"
    c.sample.num_images = 0
    c.train.update(train)
    return c


def test_pretrained_fills_the_config_from_the_pipeline(images_dir):
    c = stage.apply_pretrained(_config(images_dir))
    unet = json.load(open(os.path.join(SD, "unet", "config.json")))
    assert c.model.name == "sd_unet"
    assert c.model.kwargs.block_out_channels == unet["block_out_channels"]
    assert c.model.kwargs.cross_attention_dim == 32 == experiment.context_dim(c)
    assert (c.data.image_size, c.data.channels) == (unet["sample_size"], unet["in_channels"])
    assert (c.diffusion.beta_schedule, c.diffusion.prediction) == ("scaled_linear", "epsilon")
    assert (c.diffusion.beta_start, c.diffusion.beta_end) == (0.00085, 0.012)
    assert c.data.max_text_len == 77 and not c.diffusion.clip_x0
    assert c.latent.vae == c.text.encoder == c.data.tokenizer == os.path.abspath(SD)
    assert stage.apply_pretrained(c).to_dict() == c.to_dict()  # a resume resolves the same
    experiment.check_config(c)


def test_pretrained_is_required_and_must_be_stable_diffusion(images_dir):
    c = _config(images_dir)
    c.pretrained = None
    with pytest.raises(ValueError, match="set --config.pretrained=SD_DIR"):
        experiment.check_config(stage.apply_pretrained(c))
    c.pretrained = DIT
    with pytest.raises(ValueError, match="reads Stable Diffusion pipelines"):
        stage.apply_pretrained(c)


def test_stage_encodes_like_the_pipeline_components(images_dir):
    c = stage.apply_pretrained(_config(images_dir))
    c.latent.sample_posterior = False
    st = stage.build_stage(c)
    pipe = pipeline.load_pipeline(SD)
    assert st.image_shape == (16, 16, 3)  # 8x8 latents of a 2x VAE
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    ids, mask = tokenize(CAPTIONS[:2], 77, SD)
    out = st.prepare(st.params, {"image": x, "context": ids, "context_mask": mask}, None)

    vae = pipe.vae.module
    mean, _ = vae.apply({"params": pipe.vae.params}, x, method=vae.encode)
    want = autoencoder_kl.to_latents(mean, vae.scaling_factor, vae.shift_factor or 0.0)
    np.testing.assert_allclose(out["image"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out["context"], pipeline.encode_prompts(pipe, CAPTIONS[:2]), rtol=1e-5, atol=1e-5
    )
    assert out["context_mask"].all()  # SD's cross-attention sees all 77 states
    # The null caption is "" (BOS EOS), encoded like diffusers' negative_prompt="".
    null_ids, null_mask = st.null_context
    assert null_ids[:2].tolist() == [pipe.tokenizer.bos_id, pipe.tokenizer.eos_id]
    np.testing.assert_allclose(
        st.null_condition(1)["context"], pipeline.encode_prompts(pipe, [""]), atol=1e-5
    )


@pytest.fixture(scope="module")
def run(images_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sd_ft") / "run")
    train_and_evaluate(_config(images_dir, num_steps=2, checkpoint_every_steps=2), workdir)
    return workdir


def test_run_starts_from_the_unet_and_keeps_frozen_weights_out(run):
    with open(os.path.join(run, "frozen.json")) as f:
        frozen = json.load(f)
    assert sorted(frozen) == ["pretrained_unet", "text_encoder", "vae"]
    config = load_workdir_config(run)
    assert config.model.name == "sd_unet" and config.pretrained == os.path.abspath(SD)
    state, step, _ = load_state(config, run, parallel.make_mesh(-1, 1))
    assert step == 2
    unet = pipeline.load_sd_unet(os.path.join(SD, "unet")).params
    # Only the U-Net is trained and saved: same tree, moved from the pipeline's weights.
    assert jax.tree.structure(state.params) == jax.tree.structure(unet)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, unet)
    assert 0 < max(jax.tree.leaves(moved)) < 1e-2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_run_samples_prompts_as_its_diffusers_export_does(run, tmp_path):
    gen = Generator.from_workdir(run, num_steps=2)
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours, labels = gen.generate(2, prompts=CAPTIONS[:2], noise=z, batch_size=2)
    assert ours.shape == (2, 16, 16, 3) and labels.tolist() == [0, 1]

    out = str(tmp_path / "export")
    export_diffusers(gen.config, gen.params, out, step=gen.step)
    assert sorted(os.listdir(out)) == [
        "diffjax.json",
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    pipe = pipeline.load_pipeline(out)
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), gen.params, pipe.denoiser.params)
    assert all(jax.tree.leaves(same))
    # diffusers starts from noise * init_noise_sigma, diffjax from sigma(t0) * noise.
    pg = pipeline.PretrainedGenerator(pipe, num_steps=2, guidance=gen.config.sample.guidance)
    theirs, _ = pg.generate(
        2, prompts=CAPTIONS[:2], noise=z / pipe.scheduler.noise_scale(2), batch_size=2
    )
    # Two compiled programs (8 devices here): equal up to float rounding at the uint8 step.
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
