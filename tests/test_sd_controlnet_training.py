"""A ControlNet trained on a Stable Diffusion pipeline (configs/sd_controlnet.py on tiny-sd).

One quick run (6 steps, float32, Canny edges of a tiny captioned folder, a learning rate
big enough that the zero convs leave zero) shared by the module, then what a user does
with it: the checkpoint and optimizer hold only the ControlNet (the pipeline's U-Net is
the step's frozen base, recorded in frozen.json); the run starts as diffusers'
`from_unet`; `launch/export.py --format=diffusers` writes a ControlNetModel directory
holding the run's EMA ControlNet bit for bit; and `launch/sample.py --pretrained=tiny-sd
--controlnet=OUT` draws the same images as `launch/sample.py --workdir=RUN` from the same
noise, prompts and control images, images that the control visibly changes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from diffjax import experiment, parallel
from diffjax.config import load_config_file
from diffjax.export import ExportError, check_controlnet_exportable, export_controlnet
from diffjax.models import controlnet, sd_controlnet
from diffjax.pretrained import controlnet as cn_io
from diffjax.pretrained import pipeline, safetensors_io
from diffjax.rundir import load_state, load_workdir_config
from diffjax.train.loop import _controlnet_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD = os.path.join(ROOT, "tests", "fixtures", "pipelines", "tiny-sd")
CAPTIONS = ["a red square", "a blue circle", "two green cats"]
PROMPT = "a red square"
STEPS, GUIDANCE = 3, 7.5
STEPS_TRAINED = 6
TOL = 2  # uint8 levels


def _images(root):
    """8 captioned 16x16 images: a bright rectangle on a dark ground (clear Canny edges)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        img = np.full((16, 16, 3), 30, np.uint8)
        y, x = rng.integers(1, 7, 2)
        h, w = rng.integers(5, 9, 2)
        img[y : y + h, x : x + w] = rng.integers(120, 256, 3)
        Image.fromarray(img).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(CAPTIONS[i % 3])
    return str(root)


def _launch(args, log_path):
    """A launcher in the background, its output to a file (never blocked on a full pipe)."""
    env = dict(os.environ)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return proc, log_path


def _finish(proc_log):
    proc, log = proc_log
    proc.wait(timeout=600)
    with open(log) as f:
        text = f.read()
    assert proc.returncode == 0, text[-3000:]
    return text


def _diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`launch/train.py --config=configs/sd_controlnet.py:quick` on tiny-sd."""
    tmp = tmp_path_factory.mktemp("sd_cn")
    images = _images(tmp / "images")
    workdir = str(tmp / "run")
    overrides = dict(
        pretrained=SD,
        data__data_dir=images,
        model__remat_policy="none",
        sample__num_images=0,
        # Step 1 moves the zero convs, step 2 the condition embedding's zero conv_out (its
        # gradient flows through the zero convs); by step 6 at this rate the control
        # changes the samples by tens of levels.
        train__num_steps=STEPS_TRAINED,
        train__learning_rate=0.05,
        train__warmup_steps=0,
        train__checkpoint_every_steps=STEPS_TRAINED,
        train__log_every_steps=STEPS_TRAINED,
    )
    flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    train = _launch(
        ["launch/train.py", "--config=configs/sd_controlnet.py:quick", f"--workdir={workdir}"]
        + flags,
        str(tmp / "train.log"),
    )
    _finish(train)
    return workdir, tmp


@pytest.fixture(scope="module")
def loaded(run):
    workdir, _ = run
    config = load_workdir_config(workdir)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    state, step, parts = load_state(config, workdir, mesh)
    return config, mesh, state, step, parts


@functools.cache
def _unet():
    return pipeline.load_sd_unet(os.path.join(SD, "unet"))


def test_only_the_controlnet_is_trained_and_the_base_is_recorded(run, loaded):
    workdir, _ = run
    config, _, state, step, parts = loaded
    assert step == STEPS_TRAINED and parts.controlnet
    assert (
        config.controlnet.control_downsample == 2 and config.controlnet.conditioning_channels == 3
    )
    net = experiment.build_controlnet(config)
    assert isinstance(net, sd_controlnet.SDControlNet)
    assert net.conditioning_embedding_out_channels == (16, 32)  # the VAE's factor 2
    assert controlnet.embedding_widths((), 8) == (16, 32, 96, 256)  # SD's VAE: diffusers'
    shapes = nn.meta.unbox(sd_controlnet.abstract_params(net))
    assert jax.tree.structure(state.params) == jax.tree.structure(shapes)
    assert {p[0] for p in traverse_util.flatten_dict(state.params)} >= {
        "controlnet_cond_embedding",
        "controlnet_mid_block",
        "conv_in",
        "mid_block",
    }
    assert not any(k.startswith("up_blocks") for k in state.params)  # no U-Net decoder
    n = sum(x.size for x in jax.tree.leaves(state.params))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n  # AdamW's moments of the ControlNet only
    # ema_decay 0: the EMA is the params.
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params), strict=True):
        assert np.array_equal(a, b)
    # The zero convs and the condition embedding's zero conv_out trained: the base's
    # output now depends on the ControlNet and on the control image.
    assert np.abs(np.asarray(state.params["controlnet_mid_block"]["kernel"])).max() > 1e-3
    emb_out = state.params["controlnet_cond_embedding"]["conv_out"]["kernel"]
    assert np.abs(np.asarray(emb_out)).max() > 1e-3
    with open(os.path.join(workdir, "frozen.json")) as f:
        frozen = json.load(f)
    unet_dir = os.path.join(SD, "unet")
    assert frozen["pretrained_unet"] == {
        "path": unet_dir,
        "sha256": safetensors_io.weights_sha256(unet_dir),
    }
    assert {"vae", "text_encoder"} <= set(frozen)


def test_the_run_starts_as_from_unet(loaded):
    """The loop's start (init, then the copy of the frozen U-Net's encoder half) equals
    diffusers' `from_unet` bit for bit, up to the randomly drawn condition embedding."""
    config, _, _, _, parts = loaded
    # The loop's init, drawn with the 'rbg' generator (threefry's draws of 4-D kernels
    # compile slowly on XLA:CPU): the drawn values that survive
    # the copy are checked for being drawn, not for their values.
    init = jax.jit(
        functools.partial(parts.init, unbox=True),
        out_shardings=parts.state_sharding,
    )
    state = init(jax.random.key(config.seed, impl="rbg"))
    unet = _unet()
    base = jax.device_put(unet.params, parts.base_sharding)
    start = traverse_util.flatten_dict(_controlnet_start(config, parts, state, base).params)
    module, ref = sd_controlnet.from_unet(
        unet.module, unet.params, embedding_channels=(16, 32), key=jax.random.key(0)
    )
    assert sd_controlnet.diffusers_config(module) == sd_controlnet.diffusers_config(
        experiment.build_controlnet(config)
    )
    ref = traverse_util.flatten_dict(ref)
    assert set(start) == set(ref)
    drawn = [p for p in ref if p[0] == "controlnet_cond_embedding" and p[1] != "conv_out"]
    assert len(drawn) == 2 * 3
    for p in set(ref) - set(drawn):
        np.testing.assert_array_equal(np.asarray(start[p]), np.asarray(ref[p]), err_msg=str(p))
    assert not np.any(np.asarray(start[("controlnet_mid_block", "kernel")]))


def test_export_and_sampling_round_trip(run, loaded):
    """export --format=diffusers holds the run's EMA ControlNet bit for bit, and
    `sample.py --pretrained=tiny-sd --controlnet=OUT` draws the run's own images."""
    workdir, tmp = run
    _, _, state, _, _ = loaded
    out = str(tmp / "controlnet")
    export = _launch(
        ["launch/export.py", f"--workdir={workdir}", f"--out={out}", "--format=diffusers"],
        str(tmp / "export.log"),
    )
    refused = _launch(
        ["launch/export.py", f"--workdir={workdir}", f"--out={tmp / 'refused'}"],
        str(tmp / "refused.log"),
    )
    # One prompt and one noise, two control images: the images differ only by the control.
    ctrl = np.zeros((2, 16, 16, 3), np.uint8)
    ctrl[0, 3:13, 3:13] = 255
    ctrl[1, :, 6:10] = 255
    np.savez(tmp / "ctrl.npz", images=ctrl)
    z = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    z = np.repeat(z, 2, axis=0)
    scale = pipeline.load_pipeline(SD).scheduler.noise_scale(STEPS)
    # diffusers' noise convention for --pretrained, diffjax's (sigma(t_0)-scaled) for a run.
    np.save(tmp / "z.npy", z)
    np.save(tmp / "z_run.npy", z * scale)
    common = [
        f"--control_image={tmp / 'ctrl.npz'}",
        f"--prompt={PROMPT}",
        "--num_samples=2",
        f"--steps={STEPS}",
        f"--guidance={GUIDANCE}",
    ]
    ours = _launch(
        ["launch/sample.py", f"--workdir={workdir}", *common]
        + [f"--noise={tmp / 'z_run.npy'}", f"--out={tmp / 'run.npz'}"],
        str(tmp / "run.log"),
    )

    text = _finish(export)
    assert "ControlNetModel" in text
    proc, log = refused
    assert proc.wait(timeout=600) == 1
    with open(log) as f:
        text = f.read()
    assert "--format=diffjax:" in text and "is a ControlNet run" in text, text[-2000:]
    assert "export it with --format=diffusers" in text and not os.path.exists(tmp / "refused")
    theirs = _launch(
        ["launch/sample.py", f"--pretrained={SD}", f"--controlnet={out}", *common]
        + [f"--noise={tmp / 'z.npy'}", f"--out={tmp / 'pretrained.npz'}"],
        str(tmp / "pretrained.log"),
    )
    back = cn_io.load_controlnet(out)
    assert isinstance(back.module, sd_controlnet.SDControlNet)
    cn_io.check_compatible(back, _unet(), vae_scale=2)
    assert jax.tree.structure(back.params) == jax.tree.structure(state.ema_params)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(state.ema_params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with open(os.path.join(out, "diffjax.json")) as f:
        meta = json.load(f)
    assert meta["step"] == STEPS_TRAINED and meta["component"] == "ControlNetModel"
    assert meta["base"]["pretrained"] == SD and meta["control"]["control"] == "edges"

    _finish(ours)
    _finish(theirs)
    a = np.load(tmp / "run.npz")["images"]
    b = np.load(tmp / "pretrained.npz")["images"]
    assert a.shape == b.shape == (2, 16, 16, 3)
    assert _diff(a, b) <= TOL
    assert _diff(a[0], a[1]) > 10 * TOL  # same prompt and noise: the control decides


def test_diffusers_loads_the_export(run, loaded):
    """diffusers' ControlNetModel reads the export and computes the run's residuals."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    workdir, tmp = run
    config, _, state, _, _ = loaded
    out = str(tmp / "controlnet_torch")
    export_controlnet(config, state.ema_params, out, step=STEPS_TRAINED)
    net = diffusers.ControlNetModel.from_pretrained(out).eval()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    t = np.array([500.0], np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    control = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    module = experiment.build_controlnet(config)
    down, mid = module.apply({"params": state.ema_params}, x, t, context=ctx, control=control)
    with torch.no_grad():
        tdown, tmid = net(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(ctx),
            controlnet_cond=torch.from_numpy(control).permute(0, 3, 1, 2),
            return_dict=False,
        )
    for ours, theirs in zip((*down, mid), (*tdown, tmid), strict=True):
        theirs = theirs.permute(0, 2, 3, 1).numpy()
        assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * max(np.abs(theirs).max(), 1e-3)


def test_a_controlnet_of_diffjax_models_has_no_diffusers_export():
    config = load_config_file(os.path.join(ROOT, "configs", "digits_controlnet.py"), "quick")
    assert experiment.is_controlnet(config) and config.model.name == "unet"
    with pytest.raises(ExportError, match="ControlNetModel, which is a copy of Stable Diffusion"):
        check_controlnet_exportable(config)
    config.controlnet.control = ""
    with pytest.raises(ExportError, match="ControlNet runs .* only"):
        check_controlnet_exportable(config)
