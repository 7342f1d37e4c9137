"""SDControlNet: parity with diffusers' ControlNetModel and StableDiffusionControlNetPipeline,
from_unet, directory IO, errors.

The fixtures (tests/fixtures/controlnet, written by make_controlnet.py) are ControlNets
that diffusers built `from_unet` on the tiny SD pipeline's U-Net, with every parameter
perturbed (the zero convs too), their raw residuals on fixed inputs, and the pipeline's
images. Bounds: residuals within 1e-4 x the largest reference value (measured <= 9e-7
relative, 2.3e-6 absolute); images within 2/255 per pixel (measured 0.50/255: uint8
rounding).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from diffjax.models import sd_controlnet
from diffjax.models.sd_controlnet import SDControlNet, from_diffusers_config
from diffjax.models.unet import UNet
from diffjax.pretrained import controlnet as cn_io
from diffjax.pretrained import convert, pipeline, safetensors_io

HERE = os.path.dirname(__file__)
ROOT = os.path.join(HERE, "fixtures", "controlnet")
SD = os.path.join(HERE, "fixtures", "pipelines", "tiny-sd")
RGB = os.path.join(ROOT, "tiny-controlnet")
GRAY = os.path.join(ROOT, "tiny-controlnet-gray")
RTOL = 1e-4


@functools.cache
def _apply(module):
    """One jitted apply per module (from_unet's equals the loaded one: compiled once)."""

    def run(params, x, t, context, control):
        return module.apply({"params": params}, x, t, context=context, control=control)

    return jax.jit(run)


@pytest.fixture(scope="module")
def refs():
    with open(os.path.join(ROOT, "reference.json")) as f:
        meta = json.load(f)
    return meta, dict(np.load(os.path.join(ROOT, "reference.npz")))


@pytest.fixture(scope="module")
def rgb():
    return cn_io.load_controlnet(RGB)


@pytest.fixture(scope="module")
def sd_pipe():
    return pipeline.load_pipeline(SD)


def _inputs(arrays, name):
    p = f"module_{name}_"
    return arrays[p + "x"], arrays[p + "t"], arrays[p + "context"], arrays[p + "control"]


def _reference(arrays, name):
    p = f"module_{name}_"
    n = len([k for k in arrays if k.startswith(p + "down_")])
    return tuple(arrays[f"{p}down_{i}"] for i in range(n)), arrays[p + "mid"]


def _assert_residuals_close(got, want, rtol=RTOL):
    (gd, gm), (wd, wm) = got, want
    assert len(gd) == len(wd)
    for i, (g, w) in enumerate([*zip(gd, wd, strict=True), (gm, wm)]):
        g = np.asarray(g)
        assert g.shape == w.shape and g.dtype == np.float32, (i, g.shape, w.shape)
        err, scale = np.abs(g - w).max(), np.abs(w).max()
        assert scale > 0.1  # the perturbed zero convs make every residual non-trivial
        assert err <= rtol * scale, f"residual {i}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", ["rgb", "gray", "variant"])
def test_residuals_match_diffusers(refs, name):
    meta, arrays = refs
    cfg = safetensors_io.read_config(os.path.join(ROOT, meta["module"][name]["dir"]))
    cfg.update(meta["module"][name].get("config", {}))  # variant: bgr + global pooling
    comp = cn_io.load_controlnet(os.path.join(ROOT, meta["module"][name]["dir"]))
    module = from_diffusers_config(cfg)
    got = _apply(module)(comp.params, *_inputs(arrays, name))
    _assert_residuals_close(got, _reference(arrays, name))
    if name == "variant":
        assert module.controlnet_conditioning_channel_order == "bgr"
        assert all(r.shape[1:3] == (1, 1) for r in (*got[0], got[1]))


def test_param_tree_is_the_diffusers_state_dict(rgb):
    tensors = safetensors_io.read_tensors(RGB)
    flat = traverse_util.flatten_dict(nn.meta.unbox(sd_controlnet.abstract_params(rgb.module)))
    assert {convert.torch_key(p) for p in flat} == set(tensors)
    exported = convert.flax_to_torch(rgb.params)
    assert set(exported) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    tops = {p[0] for p in flat}
    assert {"controlnet_cond_embedding", "controlnet_mid_block", "mid_block"} <= tops
    assert sd_controlnet.count_residuals(rgb.module) == 4
    assert {f"controlnet_down_blocks.{i}" for i in range(4)} <= tops


def test_from_unet_copies_the_base_and_leaves_it_unchanged(refs, sd_pipe, rgb):
    _, arrays = refs
    unet = sd_pipe.denoiser
    module, params = sd_controlnet.from_unet(
        unet.module, unet.params, embedding_channels=(16, 32), key=jax.random.key(1)
    )
    assert module == rgb.module  # diffusers' from_unet config (the fixture's)
    flat, base = traverse_util.flatten_dict(params), traverse_util.flatten_dict(unet.params)
    shared = [p for p in flat if p[0] in sd_controlnet.SHARED_PARAMS or "down_blocks." in p[0]]
    shared = [p for p in shared if not p[0].startswith("controlnet_")]
    assert len(shared) > 20
    for p in shared:
        np.testing.assert_array_equal(flat[p], base[p], err_msg=".".join(p))
    zero = [p for p in flat if p[0].startswith("controlnet_") and "cond_embedding" not in p[0]]
    zero += [p for p in flat if p[:2] == ("controlnet_cond_embedding", "conv_out")]
    assert len(zero) == 2 * 6 and all(not np.any(flat[p]) for p in zero)
    emb = flat[("controlnet_cond_embedding", "conv_in", "kernel")]
    assert np.std(emb) > 0.01  # random, not copied, not zero
    # From a module.init tree (boxed leaves): shared leaves copied inside their boxes.
    boxed = sd_controlnet.init_from_base(unet.params, sd_controlnet.abstract_params(module))
    leaf = boxed["mid_block"]["resnets.0"]["conv1"]["kernel"]
    assert isinstance(leaf, nn.Partitioned)
    np.testing.assert_array_equal(
        leaf.value, unet.params["mid_block"]["resnets.0"]["conv1"]["kernel"]
    )
    assert isinstance(boxed["controlnet_mid_block"]["kernel"].value, jax.ShapeDtypeStruct)

    x, t, ctx, _ = _inputs(arrays, "rgb")
    control = arrays["module_rgb_control"]
    down, mid = _apply(module)(params, x, t, ctx, control)
    assert all(not np.any(np.asarray(r)) for r in (*down, mid))

    def run(p, x, t, ctx, residuals):
        return unet.module.apply({"params": p}, x, t, context=ctx, control_residuals=residuals)

    run = jax.jit(run)
    alone = np.asarray(run(unet.params, x, t, ctx, None))
    controlled = np.asarray(run(unet.params, x, t, ctx, (down, mid)))
    assert np.array_equal(alone, controlled)
    assert np.abs(alone).max() > 0.1


def test_save_load_round_trip_is_bit_exact(tmp_path, rgb):
    out = cn_io.save_controlnet(str(tmp_path / "cn"), rgb.module, rgb.params)
    back = cn_io.load_controlnet(out)
    assert back.module == rgb.module
    assert jax.tree.structure(back.params) == jax.tree.structure(rgb.params)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(rgb.params), strict=True):
        assert np.array_equal(a, b)
    cfg = safetensors_io.read_config(out)
    assert cfg["_class_name"] == "ControlNetModel" and "_diffusers_version" in cfg
    assert cfg["conditioning_embedding_out_channels"] == [16, 32]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cn_io.save_controlnet(out, rgb.module, rgb.params)
    cn_io.save_controlnet(out, rgb.module, rgb.params, overwrite=True)


def test_diffusers_loads_what_save_controlnet_writes(tmp_path, refs, rgb):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    meta, arrays = refs
    for name in ("rgb", "variant"):
        module = from_diffusers_config({**rgb.config, **meta["module"][name].get("config", {})})
        out = cn_io.save_controlnet(str(tmp_path / name), module, rgb.params)
        net = diffusers.ControlNetModel.from_pretrained(out).eval()
        x, t, ctx, control = (torch.from_numpy(np.asarray(a)) for a in _inputs(arrays, name))
        with torch.no_grad():
            down, mid = net(
                x.permute(0, 3, 1, 2),
                t,
                encoder_hidden_states=ctx,
                controlnet_cond=control.permute(0, 3, 1, 2),
                return_dict=False,
            )
        got = tuple(d.permute(0, 2, 3, 1).numpy() for d in down), mid.permute(0, 2, 3, 1).numpy()
        _assert_residuals_close(got, _reference(arrays, name))


def test_wrong_control_size_is_refused(refs, rgb):
    _, arrays = refs
    x, t, ctx, control = _inputs(arrays, "rgb")
    init = functools.partial(jax.eval_shape, rgb.module.init, jax.random.key(0))
    with pytest.raises(ValueError, match=r"SDControlNet: control must be .* = \[2, 16, 16, 3\]"):
        init(x, t, context=ctx, control=control[:, :8, :8])
    with pytest.raises(ValueError, match=r"2x the model input's, with 3 channels"):
        init(x, t, context=ctx, control=control[..., :1])
    with pytest.raises(ValueError, match="no class conditioning"):
        init(x, t, labels=np.zeros((2,), np.int32), context=ctx, control=control)


def test_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        cn_io.load_controlnet(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="'UNet2DConditionModel': not a diffusers ControlNetModel"):
        cn_io.load_controlnet(os.path.join(SD, "unet"))
    with pytest.raises(ValueError, match="pipeline directory without a controlnet/"):
        cn_io.load_controlnet(SD)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        cn_io.load_controlnet(str(tmp_path))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(RGB, "config.json"), pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="PyTorch pickles"):
        cn_io.load_controlnet(str(pickled))
    wrong = tmp_path / "wrong"
    shutil.copytree(RGB, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 24}))
    with pytest.raises(convert.ConversionError, match="mis-shaped .*attn2.to_k.weight"):
        cn_io.load_controlnet(str(wrong))
    # A pipeline directory with a controlnet/ component is read through it.
    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    (pipe_dir / "model_index.json").write_text("{}")
    shutil.copytree(RGB, pipe_dir / "controlnet")
    assert cn_io.controlnet_dir(str(pipe_dir)) == str(pipe_dir / "controlnet")


def test_incompatible_base_is_refused(rgb, sd_pipe):
    cn_io.check_compatible(rgb, sd_pipe.denoiser, vae_scale=sd_pipe.vae_scale)
    other = pipeline.load_sd_unet(os.path.join(HERE, "fixtures", "sd_unet", "sd1"))
    with pytest.raises(ValueError, match=r"cross_attention_dim 32 \(the base's: 24\).*block_out"):
        cn_io.check_compatible(rgb, other)
    with pytest.raises(ValueError, match="downsamples by 2 .* VAE by 8"):
        cn_io.check_compatible(rgb, sd_pipe.denoiser, vae_scale=8)
    with pytest.raises(ValueError, match="mis-shaped"):
        sd_controlnet.init_from_base(other.params, rgb.params)
    with pytest.raises(ValueError, match="drives a Stable Diffusion U-Net; .* a UNet"):
        cn_io.check_compatible(rgb, pipeline.Component(UNet(), None, {}))


@pytest.mark.parametrize(
    "key,value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("encoder_hid_dim", 512),
        ("num_class_embeds", 10),
        ("controlnet_conditioning_channel_order", "rbg"),
        ("conditioning_embedding_out_channels", None),
        ("layers_per_block", [1, 2]),
        ("mid_block_type", "UNetMidBlock2D"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("some_future_option", 1),
    ],
)
def test_unsupported_config_options_are_refused_by_name(rgb, key, value):
    with pytest.raises(ValueError, match=key):
        from_diffusers_config({**rgb.config, key: value})


def test_diffusers_config_round_trips(rgb):
    cfg = sd_controlnet.diffusers_config(rgb.module)
    assert from_diffusers_config(cfg) == rgb.module
    assert isinstance(rgb.module, SDControlNet)
    # Every key diffusers wrote for the fixture is written (values as diffusers' own).
    ours = {k: v for k, v in cfg.items() if not k.startswith("_")}
    theirs = {k: v for k, v in rgb.config.items() if not k.startswith("_")}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


# ----------------------------------------------------------------------------- pipelines

TOL = 2.0 / 255.0


@pytest.fixture(scope="module")
def nets(refs):
    meta, _ = refs
    return {d: cn_io.load_controlnet(os.path.join(ROOT, d)) for d in meta["controlnets"].values()}


def _generator(meta, sd_pipe, nets, case, **overrides):
    p, c = meta["pipeline"], meta["pipeline"]["cases"][case]
    kwargs = dict(
        num_steps=p["steps"],
        guidance=c["guidance_scale"],
        height=p["height"],
        width=p["width"],
        controlnets=[nets[d] for d in c["controlnets"]],
        controlnet_scale=c["controlnet_conditioning_scale"],
        guess_mode=c["guess_mode"],
        control_guidance=(c["control_guidance_start"], c["control_guidance_end"]),
    )
    return pipeline.PretrainedGenerator(sd_pipe, **{**kwargs, **overrides})


# Each case compiles its own sampler (~7 s of CPU): `cfg` is `multi` with one ControlNet,
# and `cfg` / `scale` (no guidance) are left to the sample.py tests (all five measured
# within 0.51/255 when this was written).
@pytest.mark.parametrize("case", ["guess", "window", "multi"])
def test_pipeline_matches_diffusers_controlnet_pipeline(refs, sd_pipe, nets, case):
    """StableDiffusionControlNetPipeline's images from the same latents, prompts and
    control images (diffjax's uint8 vs diffusers' float: 0.5/255 is rounding)."""
    meta, arrays = refs
    p, c = meta["pipeline"], meta["pipeline"]["cases"][case]
    assert p["scheduler_config"]["set_alpha_to_one"] is False and p["negative_prompt"] is None
    gen = _generator(meta, sd_pipe, nets, case)
    noise = arrays["pipe_noise"]
    controls = [arrays[k] for k in c["controls"]]
    assert all(a.dtype == np.uint8 for a in controls)
    got, _ = gen.generate(
        len(noise), prompts=p["prompts"], noise=noise, batch_size=len(noise), control=controls
    )
    ref = arrays[f"pipe_{case}_images"]
    assert got.shape == ref.shape and got.dtype == np.uint8
    err = float(np.abs(got / 255.0 - ref).max())
    # The control matters far beyond the tolerance: the case cannot pass by ignoring it.
    assert c["max_diff_vs_uncontrolled"] > 10 * TOL
    assert err <= TOL, f"max per-pixel difference {err * 255:.2f}/255"


def test_generator_control_errors(refs, sd_pipe, nets):
    meta, arrays = refs
    gen = _generator(meta, sd_pipe, nets, "cfg")
    ctrl = arrays["pipe_control_rgb"]
    with pytest.raises(ValueError, match="pass control="):
        next(gen.batches(2, prompts=["x"]))
    with pytest.raises(ValueError, match=r"control 0 must be \[N, 16, 16, 3\]"):
        next(gen.batches(2, prompts=["x"], control=[ctrl[:, :8, :8]]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        next(gen.batches(2, prompts=["x"], control=[ctrl.astype(np.float32)]))
    with pytest.raises(ValueError, match="1 ControlNet.* need 1 control arrays, got 2"):
        next(gen.batches(2, prompts=["x"], control=[ctrl, ctrl]))
    with pytest.raises(ValueError, match="controlnet_scale needs one value or one per"):
        _generator(meta, sd_pipe, nets, "multi", controlnet_scale=[1.0, 2.0, 3.0])
    plain = pipeline.PretrainedGenerator(sd_pipe, num_steps=2, height=16, width=16)
    with pytest.raises(ValueError, match="no ControlNet"):
        next(plain.batches(2, prompts=["x"], control=[ctrl]))


def _sample_cli(args, log_path):
    """launch/sample.py in the background, its output to a file."""
    root = os.path.dirname(HERE)
    env = dict(os.environ)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "launch/sample.py", *args],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, log_path


def _wait(proc_log):
    proc, log = proc_log
    proc.wait(timeout=600)
    with open(log) as f:
        return proc.returncode, f.read()


def test_sample_cli_with_controlnet(tmp_path, refs, sd_pipe):
    """`sample.py --pretrained --controlnet --control_image` = diffusers'
    StableDiffusionControlNetPipeline (the `cfg` case); a ControlNet made for another
    U-Net is refused by name before anything compiles."""
    meta, arrays = refs
    p, c = meta["pipeline"], meta["pipeline"]["cases"]["cfg"]
    np.save(tmp_path / "noise.npy", arrays["pipe_noise"])
    np.savez(tmp_path / "ctrl.npz", images=arrays[c["controls"][0]])
    flags = [
        f"--control_image={tmp_path / 'ctrl.npz'}",
        *(f"--prompt={q}" for q in p["prompts"]),
        f"--num_samples={len(p['prompts'])}",
        f"--steps={p['steps']}",
        f"--guidance={c['guidance_scale']}",
        f"--controlnet_scale={c['controlnet_conditioning_scale'][0]}",
        f"--height={p['height']}",
        f"--width={p['width']}",
        f"--noise={tmp_path / 'noise.npy'}",
    ]
    ok = _sample_cli(
        [f"--pretrained={SD}", f"--controlnet={os.path.join(ROOT, c['controlnets'][0])}"]
        + flags
        + [f"--out={tmp_path / 's.npz'}"],
        str(tmp_path / "ok.log"),
    )
    # A ControlNet of the sd1 fixture U-Net (cross_attention_dim 24, other widths).
    other = pipeline.load_sd_unet(os.path.join(HERE, "fixtures", "sd_unet", "sd1"))
    module, params = sd_controlnet.from_unet(
        other.module, other.params, embedding_channels=(16, 32), key=jax.random.key(0)
    )
    wrong = cn_io.save_controlnet(str(tmp_path / "other_cn"), module, params)
    bad = _sample_cli(
        [f"--pretrained={SD}", f"--controlnet={wrong}"] + flags + [f"--out={tmp_path / 'x.npz'}"],
        str(tmp_path / "bad.log"),
    )
    code, text = _wait(bad)
    assert code == 1 and f"--controlnet={wrong}: This ControlNet does not fit" in text, text[-2000:]
    assert "cross_attention_dim 24 (the base's: 32)" in text
    code, text = _wait(ok)
    assert code == 0, text[-3000:]
    got = np.load(tmp_path / "s.npz")["images"]
    ref = arrays["pipe_cfg_images"]
    assert got.shape == ref.shape and got.dtype == np.uint8
    err = float(np.abs(got / 255.0 - ref).max())
    assert err <= TOL, f"max per-pixel difference {err * 255:.2f}/255"
    assert c["max_diff_vs_uncontrolled"] > 10 * TOL  # the ControlNet changes the images
    assert os.path.isfile(tmp_path / "s.png")
