"""Training on latents with a frozen VAE: decoded samples, exact resume, recorded VAE.

The VAE is the tiny diffusers-saved AutoencoderKL of tests/fixtures/vae (4 latent
channels, 2x downsampling); the latents are random, so this checks the plumbing (shapes,
decoding, resume, records), not sample quality.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs.digits import get_config
from diffjax import parallel
from diffjax.export import ExportError, export_params
from diffjax.generate import Generator
from diffjax.pretrained.frozen import FrozenComponentError
from diffjax.rundir import load_state
from diffjax.train import train_and_evaluate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "vae")
VAE = os.path.join(FIXTURES, "vae")
OTHER_VAE = os.path.join(FIXTURES, "vae_fp16")  # same architecture, other weights


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    np.save(d / "latents.npy", rng.standard_normal((64, 4, 4, 4)).astype(np.float32))
    np.save(d / "labels.npy", (np.arange(64) % 10).astype(np.int32))
    return str(d)


def _config(latents_dir, steps=4, vae=VAE, **overrides):
    c = get_config("quick")
    c.data.source = "latents"
    c.data.data_dir = latents_dir
    c.data.image_size = 4
    c.data.channels = 4
    c.latent.vae = vae
    c.diffusion.clip_x0 = False
    c.model.kwargs.channel_mult = (1,)
    c.model.kwargs.attention_resolutions = ()
    c.model.kwargs.mid_attention = False
    c.train.batch_size = 16
    # A schedule that does not depend on num_steps: the 2-step first half of the
    # interrupted run then compiles the very train step of the 4-step runs (one compile).
    c.train.lr_schedule = "constant"
    c.train.num_steps = steps
    c.train.checkpoint_every_steps = 2
    c.sample.num_images = 4
    c.sample.num_steps = 3
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        c[section][field] = value
    return c


def _params(config, workdir):
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, step, _ = load_state(config, workdir, mesh)
    return step, [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_latent_run_decodes_resumes_exactly_and_records_its_vae(latents_dir, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_and_evaluate(_config(latents_dir, 4), full)
    # The grid was decoded to images by the VAE: 4x4x4 latents -> 8x8x3 pixels.
    grid = os.path.join(full, "samples", "step_00000004.png")
    assert os.path.isfile(grid)
    record = json.load(open(os.path.join(full, "frozen.json")))
    assert record["vae"]["path"] == os.path.abspath(VAE) and len(record["vae"]["sha256"]) == 64

    # Interrupted at step 2, resumed to 4: bitwise the uninterrupted run.
    quiet = {"sample.num_images": 0}  # no grid: the interrupted run needs none
    train_and_evaluate(_config(latents_dir, 2, **quiet), part)
    train_and_evaluate(_config(latents_dir, 4, **quiet), part)
    (s1, a), (s2, b) = _params(_config(latents_dir), full), _params(_config(latents_dir), part)
    assert s1 == s2 == 4
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)

    # Resuming with another VAE mixes latent spaces: refused, naming both.
    with pytest.raises(FrozenComponentError, match="trained with vae .*SHA-256"):
        train_and_evaluate(_config(latents_dir, 6, vae=OTHER_VAE), part)
    # So are latents that encode_latents made with another VAE (meta.json), before any work.
    other = tmp_path / "other_latents"
    shutil.copytree(latents_dir, other)
    (other / "meta.json").write_text(json.dumps({"vae": {"path": "/x", "sha256": "0" * 64}}))
    with pytest.raises(FrozenComponentError, match="was encoded with the VAE /x"):
        train_and_evaluate(_config(str(other), 4), str(tmp_path / "fresh"))
    assert not os.path.exists(tmp_path / "fresh" / "checkpoints")

    gen = Generator.from_workdir(full, num_steps=2)
    assert gen.image_shape == (8, 8, 3)
    images, labels = gen.generate(3, batch_size=8)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2]

    # An export records the VAE by hash; sampling from it decodes the same way.
    config = _config(latents_dir)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, step, parts = load_state(config, full, mesh)
    out = str(tmp_path / "export")
    meta = export_params(
        config, parts.model, parts.schedule, state.ema_params, out, step=step, platforms=()
    )
    assert meta["latent"]["vae_sha256"] == record["vae"]["sha256"]
    exported, _ = Generator.from_export(out, num_steps=2).generate(3, batch_size=8)
    np.testing.assert_array_equal(exported, images)
    meta["latent"]["vae_sha256"] = "0" * 64
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ExportError, match="not the one this model was trained with"):
        Generator.from_export(out)


def test_sd_unet_trains_on_text_context():
    """The SD U-Net always attends to text (cross_attention_dim): its batches carry context."""
    import ml_collections

    from diffjax import experiment

    c = get_config("quick")
    c.model.name = "sd_unet"
    c.model.kwargs = ml_collections.ConfigDict(dict(cross_attention_dim=32))
    assert experiment.conditioning_kind(c) == "text" and experiment.context_dim(c) == 32
    assert experiment.condition_keys(c) == ("context", "context_mask")
    assert experiment.dummy_condition(c, 2)["context"].shape == (2, c.data.max_text_len, 32)
    c.model.kwargs = ml_collections.ConfigDict()
    assert experiment.context_dim(c) == 768  # SD 1.x's CLIP width, the SDUNet default


def test_frozen_record_holds_the_text_encoder_of_caption_embeddings(latents_dir, tmp_path):
    """encode_latents' meta.json names the text encoder of the captions: recorded, checked."""
    from diffjax.pretrained import frozen, safetensors_io

    d = tmp_path / "captioned"
    shutil.copytree(latents_dir, d)
    vae = {"path": os.path.abspath(VAE), "sha256": safetensors_io.weights_sha256(VAE)}
    te = {"path": "/models/sd15/text_encoder", "tokenizer": "/models/sd15/tokenizer"}
    (d / "meta.json").write_text(
        json.dumps({"vae": vae, "text_encoder": {**te, "sha256": "a" * 64}})
    )
    config = _config(str(d))
    record = frozen.check_frozen(config, str(tmp_path), resuming=False)
    assert record["text_encoder"] == {"path": te["path"], "sha256": "a" * 64}
    frozen.write_frozen(str(tmp_path), record)
    (d / "meta.json").write_text(
        json.dumps({"vae": vae, "text_encoder": {**te, "sha256": "b" * 64}})
    )
    with pytest.raises(FrozenComponentError, match="trained with text_encoder"):
        frozen.check_frozen(config, str(tmp_path), resuming=True)
