"""Inpainting models (issue 16): random training masks, the [x_t, mask, masked image] input.

Masks (`diffjax.data.masks`) are functions of (seed, index), cover their kinds with the
configured fractions and sizes, and the pipeline draws new ones every epoch independently
of the process count. The train step feeds the network `concat([x_t, mask, masked
image])` with the region to regenerate zeroed, through label dropout; the quick digits
inpainting config trains and restores; a latent run's frozen stage encodes the masked
image (the tiny VAE of tests/fixtures/vae); a Stable Diffusion inpainting pipeline (a
9-channel U-Net made from tests/fixtures/pipelines/tiny-sd) fine-tunes as an inpainting
run; bad configs are refused by name.
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.digits_inpaint import get_config
from diffjax import data as data_lib
from diffjax import experiment, parallel, rundir
from diffjax.data.masks import MASK_KINDS, MaskGenerator, MaskSource, parse_masks
from diffjax.data.pipeline import make_dataset
from diffjax.diffusion import editing
from diffjax.images import to_uint8
from diffjax.models import autoencoder_kl
from diffjax.pretrained import safetensors_io, stage
from diffjax.sample_fn import Edit
from diffjax.train import train_and_evaluate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
VAE = os.path.join(FIXTURES, "vae", "vae")  # 3 channels -> 4 latent channels, 2x down
SD = os.path.join(FIXTURES, "pipelines", "tiny-sd")


# ----------------------------------------------------------------------------- masks


def _bbox(m: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def test_masks_are_seeded_cover_their_kinds_and_fractions():
    gen = MaskGenerator(masks="box:0.3,brush:0.4,outpaint:0.2,full:0.1", seed=3)
    n, h, w = 3000, 16, 12
    drawn = [gen.draw(i, h, w) for i in range(n)]
    # A function of (seed, index) only: the same again, another seed differs.
    for i in (0, 7, 2999):
        kind, m = gen.draw(i, h, w)
        assert kind == drawn[i][0] and np.array_equal(m, drawn[i][1])
    other = MaskGenerator(masks=gen.masks, seed=4)
    assert any(not np.array_equal(other(i, h, w), drawn[i][1]) for i in range(5))

    kinds = np.array([k for k, _ in drawn])
    for kind, p in parse_masks(gen.masks).items():
        share = np.mean(kinds == kind)
        assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n), (kind, share, p)
    for kind, m in drawn:
        assert m.shape == (h, w, 1) and m.dtype == np.float32
        m = m[..., 0]
        assert set(np.unique(m)) <= {0.0, 1.0} and m.any()
        if kind == "full":
            assert m.all()
        elif kind == "box":  # one rectangle, sides in [min, max] of the image's
            rows, cols = _bbox(m)
            assert m[rows, cols].all() and m.sum() == m[rows, cols].size
            bh, bw = rows.stop - rows.start, cols.stop - cols.start
            assert round(0.1 * h) <= bh <= round(0.5 * h) and round(0.1 * w) <= bw <= round(0.5 * w)
        elif kind == "outpaint":  # a kept central rectangle, the rest regenerated
            rows, cols = _bbox(m == 0)
            assert (m[rows, cols] == 0).all() and m.sum() == m.size - m[rows, cols].size
            assert rows.stop - rows.start >= h // 2 and cols.stop - cols.start >= w // 2
    assert {k for k, _ in drawn} == set(MASK_KINDS)
    # Brush strokes: irregular (not their bounding box) more often than not.
    brush = [m[..., 0] for k, m in drawn if k == "brush"]
    assert np.mean([m[_bbox(m)].all() for m in brush]) < 0.5

    with pytest.raises(ValueError, match="unknown mask kind 'circle'"):
        parse_masks("box,circle")
    with pytest.raises(ValueError, match="must be > 0"):
        parse_masks("box:0,full")
    with pytest.raises(ValueError, match="min_size=0.6 and max_size=0.5"):
        MaskGenerator(min_size=0.6)


def test_pipeline_draws_masks_by_stream_position():
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    gen = MaskGenerator(seed=1)
    src = MaskSource(data_lib.ArraySource(images), gen)
    assert np.array_equal(src[5]["mask"], gen(5, 8, 8)) and src.size == (8, 8)
    # Unshuffled, one epoch: example n gets mask n (= MaskSource[n]).
    batch = next(iter(make_dataset(src, batch_size=4, seed=0, shuffle=False)))
    np.testing.assert_array_equal(batch["mask"], np.stack([gen(i, 8, 8) for i in range(4)]))
    # Shuffled over epochs: example n of the stream gets mask n, so a record's masks change.
    stream = list(iter(make_dataset(src, batch_size=4, seed=0, num_epochs=2)))
    masks = np.concatenate([b["mask"] for b in stream])
    np.testing.assert_array_equal(masks, np.stack([gen(i, 8, 8) for i in range(24)]))
    # Two processes load the halves of the same global batches.
    halves = [
        next(iter(make_dataset(src, batch_size=2, seed=0, process_index=p, process_count=2)))
        for p in range(2)
    ]
    whole = next(iter(make_dataset(src, batch_size=4, seed=0)))
    for key in ("image", "mask"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    # A restored iterator (a resumed run) continues with the masks of its position.
    it = iter(make_dataset(src, batch_size=4, seed=0))
    for _ in range(4):  # into the second epoch
        next(it)
    saved, want = it.get_state(), next(it)
    again = iter(make_dataset(src, batch_size=4, seed=0))
    again.set_state(saved)
    got = next(again)
    for key in ("image", "mask"):
        np.testing.assert_array_equal(got[key], want[key])
    np.testing.assert_array_equal(want["mask"], np.stack([gen(i, 8, 8) for i in range(16, 20)]))


# ----------------------------------------------------------------------------- training


def test_the_network_sees_x_t_mask_and_masked_image_through_label_dropout():
    c = get_config("quick")
    c.diffusion.cond_dropout = 1.0  # every label dropped: the concat must stay
    experiment.check_config(c)
    assert experiment.condition_keys(c) == ("labels", "concat")
    assert experiment.inpaint_concat_channels(c) == 2 and experiment.model_input_channels(c) == 3
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    parts = rundir.build_components(c, mesh)
    # Zero params (the network is skipped below): no init program to compile.
    state = jax.tree.map(
        lambda a: (
            jax.random.key(0)
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
            else jnp.zeros(a.shape, a.dtype)
        ),
        parts.abstract_state,
    )
    source = data_lib.make_source(**stage.data_fields(c, None))
    batch = next(data_lib.make_iterator(source, batch_size=8, seed=0))
    assert batch["mask"].shape == (8, 8, 8, 1)

    seen = []

    def record(next_fun, args, kwargs, context):
        # The network's input, recorded; the network itself is skipped (nothing to compile).
        if context.method_name == "__call__" and context.module.name is None:
            x = args[0]
            jax.debug.callback(
                lambda *a: seen.append([np.asarray(v) for v in a]), x, kwargs["labels"]
            )
            return jnp.zeros((*x.shape[:-1], 1), jnp.float32) * x[..., :1]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _, metrics = jax.jit(parts.train_step)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    ((x, labels),) = seen
    assert x.shape == (8, 8, 8, 3)
    assert (labels == c.data.num_classes).all()  # dropped to the null class...
    mask, image = batch["mask"], batch["image"]
    np.testing.assert_array_equal(x[..., 1:2], mask)  # ...but the mask stays,
    np.testing.assert_array_equal(x[..., 2:], image * (1 - mask))  # and the masked image:
    assert (x[..., 2:][mask[..., 0] == 1] == 0).all()  # zero where it regenerates
    np.testing.assert_array_equal(x[..., 1:], editing.inpaint_condition(image, mask))


def test_digits_inpaint_trains_restores_and_samples(tmp_path):
    from diffjax.generate import Generator

    c = get_config("quick")
    c.train.update(num_steps=4, checkpoint_every_steps=4, batch_size=16)
    c.sample.update(num_images=0, num_steps=2)  # Generator below samples
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir)
    saved = rundir.load_workdir_config(workdir)
    assert experiment.is_inpainting(saved) and saved.inpainting.masks == c.inpainting.masks
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, step, _ = rundir.load_state(saved, workdir, mesh)
    assert step == 4 and state.params["conv_in"]["kernel"].shape[2] == 3
    # The plain digits model is another model: its config cannot restore these checkpoints.
    plain = get_config("quick")
    plain.inpainting.enabled = False
    plain.model.kwargs.out_channels = 0
    with pytest.raises(rundir.WorkdirMismatchError, match="inpainting"):
        rundir.load_state(plain, workdir, mesh)
    # Without a mask the model generates whole digits (the full mask).
    gen = Generator.from_workdir(workdir, num_steps=2)
    images, _ = gen.generate(3, batch_size=8)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    cond = experiment.sampling_condition(saved, np.arange(3))
    np.testing.assert_array_equal(cond["concat"][..., 0], 1.0)
    np.testing.assert_array_equal(cond["concat"][..., 1], 0.0)
    # Editing with a mask: the model sees it and the masked digit; kept pixels are exact.
    src = data_lib.digits_source("half1")
    digits = np.stack([to_uint8(src[i]["image"]) for i in range(8)])
    masks = np.zeros((8, 8, 8), np.uint8)
    masks[:, 4:] = 255
    out, _ = gen.generate(8, seed=1, batch_size=8, edit=Edit(digits, masks))
    np.testing.assert_array_equal(out[:, :4], digits[:, :4])
    concat = np.asarray(gen._inpaint_concat(Edit(digits, masks), np.arange(8)))
    np.testing.assert_array_equal(concat[..., 0], masks / 255)
    np.testing.assert_array_equal(concat[:, 4:, :, 1], 0.0)  # the region to regenerate


# ----------------------------------------------------------------------------- latent


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(["a red square", "a blue circle"][i % 2])
    return str(d)


def _latent_config(rgb_dir):
    c = get_config("quick")
    c.data.update(source="folder", data_dir=rgb_dir, image_size=4, channels=4, num_classes=0)
    c.latent.vae = VAE
    c.latent.sample_posterior = False
    c.diffusion.clip_x0 = False
    c.model.kwargs.update(
        num_classes=0, out_channels=0, channel_mult=(1,), attention_resolutions=()
    )
    c.model.kwargs.mid_attention = False
    c.train.batch_size = 4
    c.sample.num_images = 0
    return c


def test_latent_stage_encodes_the_masked_image(rgb_dir):
    c = _latent_config(rgb_dir)
    experiment.check_config(c)
    assert experiment.model_input_channels(c) == 9  # 4 latents + mask + 4 masked latents
    st = stage.build_stage(c)
    assert st.inpainting and st.factor == 2 and st.image_shape == (8, 8, 3)
    source = data_lib.make_source(**stage.data_fields(c, st))
    batch = next(data_lib.make_iterator(source, batch_size=4, seed=0))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["mask"].shape == (4, 8, 8, 1)
    out = st.prepare(st.params, dict(batch), jax.random.key(0))

    vae = st.vae.module

    def encode(x):
        mean, _ = vae.apply({"params": st.params["vae"]}, x, method=vae.encode)
        return autoencoder_kl.to_latents(mean, vae.scaling_factor, vae.shift_factor or 0.0)

    masked = batch["image"] * (batch["mask"] < 0.5)
    assert out["concat"].shape == (4, 4, 4, 5)
    np.testing.assert_allclose(out["image"], encode(batch["image"]), atol=1e-5)
    np.testing.assert_allclose(out["concat"][..., 1:], encode(masked), atol=1e-5)
    np.testing.assert_array_equal(out["concat"][..., :1], batch["mask"][:, ::2, ::2])
    # What sampling builds (experiment.inpaint_concat with the VAE's encode) is the same.
    same = experiment.inpaint_concat(c, batch["image"], batch["mask"], encode=encode, factor=2)
    np.testing.assert_allclose(same, out["concat"], atol=1e-6)

    # The train step feeds the 9-channel model through the stage (shapes only).
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    parts = rundir.build_components(c, mesh, prepare=st.prepare)
    state = jax.eval_shape(lambda k: parts.init(k, unbox=True), jax.random.key(0))
    assert state.params["conv_in"]["kernel"].shape == (3, 3, 9, 16)
    _, metrics = jax.eval_shape(parts.train_step, state, batch, st.params)
    assert metrics["loss"].shape == ()


# ----------------------------------------------------------------------------- SD inpainting


@pytest.fixture(scope="module")
def sd_inpaint(tmp_path_factory):
    """tiny-sd as a StableDiffusionInpaintPipeline: its U-Net's conv_in widened to 9 input
    channels (latents, mask, masked-image latents)."""
    d = tmp_path_factory.mktemp("sd") / "tiny-sd-inpaint"
    shutil.copytree(SD, d)
    index = json.load(open(d / "model_index.json"))
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (d / "model_index.json").write_text(json.dumps(index))
    cfg = json.load(open(d / "unet" / "config.json"))
    cfg["in_channels"] = 9
    (d / "unet" / "config.json").write_text(json.dumps(cfg))
    path = str(d / "unet" / "diffusion_pytorch_model.safetensors")
    tensors = safetensors_io.read_tensors(path)
    w = tensors["conv_in.weight"]  # [out, 4, 3, 3]
    extra = np.random.default_rng(0).normal(0, 0.02, (w.shape[0], 5, *w.shape[2:]))
    tensors["conv_in.weight"] = np.concatenate([w, extra.astype(np.float32)], axis=1)
    safetensors_io.write_tensors(tensors, path)
    return str(d)


def test_sd_inpainting_pipeline_fine_tunes_as_an_inpainting_run(sd_inpaint, rgb_dir):
    from configs.sd_finetune import get_config as sd_config

    c = sd_config("quick")
    c.pretrained = sd_inpaint
    c.data.data_dir = rgb_dir
    c.data.image_size = 4
    c.model.remat_policy = "none"
    c.sample.num_images = 0
    c = stage.apply_pretrained(c)
    assert experiment.is_inpainting(c) and c.data.channels == 4
    assert c.model.kwargs.in_channels == 9 and experiment.model_input_channels(c) == 9
    assert stage.apply_pretrained(c).to_dict() == c.to_dict()  # idempotent
    experiment.check_config(c)
    st = stage.build_stage(c)
    assert st.inpainting and st.factor == 2
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    parts = rundir.build_components(
        c,
        mesh,
        prepare=st.prepare,
        null_context=st.null_context,
        text_params=st.params["text_encoder"],
    )
    # The pipeline's 9-channel U-Net is the start of the fine-tune.
    start = stage.initial_params(c, parts.model_shapes)
    assert start["conv_in"]["kernel"].shape[2] == 9
    source = data_lib.make_source(**stage.data_fields(c, st))
    batch = next(data_lib.make_iterator(source, batch_size=2, seed=0))
    assert batch["mask"].shape == (2, 8, 8, 1)
    state = jax.eval_shape(lambda k: parts.init(k, unbox=True), jax.random.key(0))
    _, metrics = jax.eval_shape(parts.train_step, state, batch, st.params)
    assert metrics["loss"].shape == ()

    # A LoRA over the inpainting U-Net trains through the same 9-channel input.
    lora = sd_config("quick")
    lora.pretrained, lora.data.data_dir, lora.data.image_size = sd_inpaint, rgb_dir, 4
    lora.sample.num_images, lora.lora.rank = 0, 2
    lora = stage.apply_pretrained(lora)
    experiment.check_config(lora)
    parts = rundir.build_components(lora, mesh, prepare=st.prepare, null_context=st.null_context)
    state = jax.eval_shape(lambda k: parts.init(k, unbox=True), jax.random.key(0))
    frozen = {**st.params, "base": parts.model_shapes}
    _, metrics = jax.eval_shape(parts.train_step, state, batch, frozen)
    assert metrics["loss"].shape == () and "conv_in" in parts.model_shapes

    # A text-to-image pipeline with inpainting.enabled is refused, naming the fix.
    plain = sd_config("quick")
    plain.pretrained, plain.data.data_dir = SD, rgb_dir
    plain.inpainting.enabled = True
    with pytest.raises(ValueError, match="is a text-to-image one"):
        stage.apply_pretrained(plain)


# ----------------------------------------------------------------------------- refusals


def test_bad_inpainting_configs_are_refused_by_name(rgb_dir):
    def refused(match, **changes):
        c = get_config("quick")
        for dotted, value in changes.items():
            node = c
            *path, last = dotted.split("__")
            for k in path:
                node = node[k]
            node[last] = value
        with pytest.raises(ValueError, match=match):
            experiment.check_config(c)

    refused("unknown mask kind 'ring'", inpainting__masks="box,ring")
    refused("out_channels=3", model__kwargs__out_channels=3)
    refused("data.source='latents' holds", data__source="latents")
    refused("apply only to inpainting models", inpainting__enabled=False, inpainting__max_strokes=2)
    c = get_config("quick")
    c.controlnet.control = "edges"
    c.base_workdir = "/nonexistent"
    with pytest.raises(ValueError, match="ControlNet of an inpainting model"):
        experiment.check_config(c)
    with pytest.raises(ValueError, match="data.source='latents' holds latents of whole"):
        data_lib.make_source(
            "latents", image_size=4, channels=4, data_dir=rgb_dir, masks=experiment.mask_options(c)
        )
    c = get_config("quick")
    with pytest.raises(ValueError, match="A latent inpainting model samples with concat="):
        c.latent.vae = VAE
        experiment.sampling_condition(c, np.arange(2))
    with pytest.raises(ValueError, match=r"concat must be \[N, h, w, 1 \+ C\]"):
        experiment.sampling_condition(
            get_config("quick"), np.arange(2), concat=np.zeros((2, 8, 8, 3))
        )
