"""LoRA files against diffusers: a peft LoRA on tiny-sd, its kohya twin, diffusers' images.

The fixtures (tests/fixtures/lora, made by tests/fixtures/make_lora.py) hold a rank-2,
alpha-4 LoRA of tiny-sd's U-Net and text encoder attention saved by diffusers'
`save_lora_weights` (alpha in the peft config of the safetensors header), the same weights
in kohya-ss' layout, and the images diffusers drew with `load_lora_weights` at LoRA scale
1 and 0.5; diffjax must reproduce them within 2/255 per pixel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from diffjax.finetune import lora
from diffjax.pretrained import lora_files, pipeline, safetensors_io

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SD = os.path.join(FIXTURES, "pipelines", "tiny-sd")
LORA_DIR = os.path.join(FIXTURES, "lora")
PEFT = os.path.join(LORA_DIR, "peft")
KOHYA = os.path.join(LORA_DIR, "kohya.safetensors")
TOL = 2.0 / 255.0


@pytest.fixture(scope="module")
def sd_pipe():
    return pipeline.load_pipeline(SD)


@pytest.fixture(scope="module")
def kernels(sd_pipe):
    return {
        "unet": lora.kernel_modules(sd_pipe.denoiser.params),
        "text_encoder": lora.kernel_modules(sd_pipe.text_encoder.params),
    }


@pytest.fixture(scope="module")
def refs():
    with open(os.path.join(LORA_DIR, "reference.json")) as f:
        meta = json.load(f)
    return meta, np.load(os.path.join(LORA_DIR, "reference.npz"))


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _hashes(*roots):
    out = {}
    for root in roots:
        for d, _, names in os.walk(root):
            for n in names:
                path = os.path.join(d, n)
                with open(path, "rb") as f:
                    out[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def _images(pipe, meta, noise):
    gen = pipeline.PretrainedGenerator(
        pipe, num_steps=meta["steps"], guidance=meta["guidance"], height=16, width=16
    )
    images, _ = gen.generate(len(noise), prompts=meta["prompts"], noise=noise, batch_size=2)
    return images.astype(np.float64) / 255.0


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_peft_file_matches_diffusers(sd_pipe, refs, scale):
    meta, arrays = refs
    styled = lora_files.apply_lora_files(sd_pipe, [(PEFT, scale)])
    got = _images(styled, meta, arrays["noise"])
    assert np.abs(got - arrays[f"images_scale_{scale:g}"]).max() <= TOL
    if scale == 1.0:
        # The same prompts and latents without the LoRA (diffusers' base images, which
        # test_pretrained_pipeline reproduces): the LoRA really moved the images.
        with open(os.path.join(FIXTURES, "pipelines", "reference.json")) as f:
            base_case = json.load(f)["sd_ddim_cfg"]
        base = np.load(os.path.join(FIXTURES, "pipelines", "reference.npz"))
        np.testing.assert_array_equal(base["sd_ddim_cfg_noise"], arrays["noise"])
        assert (base_case["steps"], base_case["guidance"]) == (meta["steps"], meta["guidance"])
        assert np.abs(got - base["sd_ddim_cfg_images"]).max() > 0.2


def test_read_peft_file(kernels):
    got = lora_files.read_lora(PEFT, kernels)
    assert sorted(got) == ["text_encoder", "unet"]
    targets = {m for m in kernels["unet"] if re.search(lora.DEFAULT_TARGETS["sd_unet"], m)}
    assert set(got["unet"]) == targets and len(targets) == 32
    assert set(got["text_encoder"]) == {
        f"text_model.encoder.layers.{i}.self_attn.{p}"
        for i in range(2)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    # alpha 4 / rank 2 from the peft config in the safetensors header.
    for comp in got.values():
        for down, up, scale in comp.values():
            assert down.shape[0] == up.shape[1] == 2 and scale == 2.0


def test_kohya_file_merges_like_peft(sd_pipe, kernels):
    peft = lora_files.read_lora(PEFT, kernels)
    kohya = lora_files.read_lora(KOHYA, kernels)
    assert {c: sorted(m) for c, m in peft.items()} == {c: sorted(m) for c, m in kohya.items()}
    a = lora_files.apply_lora_files(sd_pipe, [(PEFT, 0.7)])
    b = lora_files.apply_lora_files(sd_pipe, [(KOHYA, 0.7)])
    base = _flat(sd_pipe.denoiser.params)
    fa, fb = _flat(a.denoiser.params), _flat(b.denoiser.params)
    changed = {".".join(k[:-1]) for k in base if not np.array_equal(base[k], fa[k])}
    assert changed == set(peft["unet"])  # exactly the LoRA's kernels moved
    for k in base:
        np.testing.assert_allclose(fa[k], fb[k], rtol=0, atol=1e-6)
    ta, tb = _flat(a.text_encoder.params), _flat(b.text_encoder.params)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=0, atol=1e-6)


def test_stacked_files_add(sd_pipe):
    one = lora_files.apply_lora_files(sd_pipe, [(PEFT, 0.75)])
    two = lora_files.apply_lora_files(sd_pipe, [(PEFT, 0.5), (KOHYA, 0.25)])
    for x, y in ((one.denoiser, two.denoiser), (one.text_encoder, two.text_encoder)):
        fx, fy = _flat(x.params), _flat(y.params)
        for k in fx:
            np.testing.assert_allclose(fx[k], fy[k], rtol=0, atol=1e-6)


def _old_diffusers_layout(tensors):
    """The peft file's weights in old diffusers names: attention processors, `.lora.*`, alphas."""
    out = {}
    for key, value in tensors.items():
        comp, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        half = "down" if part.startswith("A") else "up"
        if comp == "unet":
            attn, proj = (
                module.rsplit(".", 1) if "to_out" not in module else (module[:-9], "to_out")
            )
            new = f"unet.{attn}.processor.{proj}_lora.{half}.weight"
            out[f"unet.{attn}.processor.{proj}_lora.alpha"] = np.float32(4.0)
        else:  # text encoder: with text_model., `.lora_linear_layer.` and no prefix
            new = f"text_model.{module}.lora_linear_layer.{half}.weight"
            out[f"text_model.{module}.alpha"] = np.float32(4.0)
        out[new] = value
    return out


def test_old_diffusers_layouts_read_alike(kernels, tmp_path):
    peft = lora_files.read_lora(PEFT, kernels)
    tensors = safetensors_io.read_tensors(os.path.join(PEFT, lora_files.WEIGHT_NAME))
    old = _old_diffusers_layout(tensors)
    assert any(".processor.to_out_lora.down.weight" in k for k in old)
    safetensors_io.write_tensors(old, str(tmp_path / "old.safetensors"))
    got = lora_files.read_lora(str(tmp_path / "old.safetensors"), kernels)
    assert {c: sorted(m) for c, m in got.items()} == {c: sorted(m) for c, m in peft.items()}
    for comp, modules in peft.items():
        for m, (down, up, scale) in modules.items():
            d2, u2, s2 = got[comp][m]
            np.testing.assert_array_equal(down, d2)
            np.testing.assert_array_equal(up, u2)
            assert s2 == scale == 2.0


def test_write_read_round_trip(sd_pipe, kernels, tmp_path):
    # A diffjax LoRA (non-zero B) -> diffusers' layout -> read back: the same merged params.
    trees = {}
    for i, (comp, part) in enumerate((("unet", sd_pipe.denoiser), ("text_encoder", None))):
        params = part.params if part else sd_pipe.text_encoder.params
        model = "sd_unet" if comp == "unet" else "clip_text"
        targets = lora.select_targets(params, lora.DEFAULT_TARGETS[model])
        tree = lora.init_lora(jax.random.key(i), params, targets, rank=3)
        rng = np.random.default_rng(i)
        trees[comp] = {
            m: {"A": e["A"], "B": rng.normal(size=e["B"].shape).astype(np.float32)}
            for m, e in tree.items()
        }
    path = lora_files.write_lora(str(tmp_path / "out"), trees, scale=0.7)
    assert path == str(tmp_path / "out" / lora_files.WEIGHT_NAME)
    keys = set(safetensors_io.read_tensors(path))
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in keys
    assert "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight" in keys
    back = lora_files.read_lora(str(tmp_path / "out"), kernels)
    assert {c: sorted(m) for c, m in back.items()} == {c: sorted(t) for c, t in trees.items()}
    merged = lora_files.apply_lora_files(sd_pipe, [(str(tmp_path / "out"), 1.0)])
    for comp, component, got in (
        ("unet", sd_pipe.denoiser, merged.denoiser),
        ("text_encoder", sd_pipe.text_encoder, merged.text_encoder),
    ):
        assert all(s == 1.0 for _, _, s in back[comp].values())  # scale folded into up
        want = _flat(lora.merge(component.params, trees[comp], 0.7))
        have = _flat(got.params)
        for k in want:
            np.testing.assert_allclose(have[k], want[k], rtol=0, atol=1e-5)
    # The peft file (alpha 4, r 2) written back by diffjax: the same deltas, scale 1.
    peft = lora_files.read_lora(PEFT, kernels)
    trees = {c: lora.from_torch(m, kernels[c]) for c, m in peft.items()}
    lora_files.write_lora(str(tmp_path / "again"), trees, scale=1.0)
    again = lora_files.read_lora(str(tmp_path / "again"), kernels)
    for comp, modules in peft.items():
        for m, (down, up, s) in modules.items():
            d2, u2, s2 = again[comp][m]
            np.testing.assert_allclose(s2 * u2 @ d2, s * up @ down, rtol=1e-6, atol=1e-6)


def test_base_directory_untouched(sd_pipe, kernels, tmp_path):
    before = _hashes(SD, LORA_DIR)
    base = _flat(sd_pipe.denoiser.params)
    styled = lora_files.apply_lora_files(sd_pipe, [(PEFT, 1.0), (KOHYA, 0.5)])
    tree = lora.from_torch(lora_files.read_lora(KOHYA, kernels)["unet"], kernels["unet"])
    lora_files.write_lora(str(tmp_path), {"unet": tree}, 1.0)
    assert _hashes(SD, LORA_DIR) == before
    # The loaded pipeline is not changed in place either: apply returns a copy.
    after = _flat(sd_pipe.denoiser.params)
    assert all(np.array_equal(base[k], after[k]) for k in base)
    assert styled.denoiser.params is not sd_pipe.denoiser.params


def _write(path, tensors):
    safetensors_io.write_tensors(
        {k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path)
    )
    return str(path)


def test_refusals_name_the_problem(sd_pipe, kernels, tmp_path):
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = np.ones((2, 8)), np.ones((8, 2))
    # Keys of unsupported LoRA kinds, named one by one.
    bad = _write(
        tmp_path / "bad.safetensors",
        {
            f"unet.{q}.lora_A.weight": a,
            f"unet.{q}.lora_B.weight": b,
            f"unet.{q}.lora_magnitude_vector": np.ones(8),
            f"unet.{q}.lora_B.bias": np.ones(8),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": a,
        },
    )
    with pytest.raises(lora_files.LoRAFileError, match="keys not understood") as e:
        lora_files.read_lora(bad, kernels)
    for key in ("lora_magnitude_vector", "lora_B.bias", "lora_te2_text_model"):
        assert key in str(e.value)
    # Modules the model lacks (diffusers and kohya names), a lone half, a shape misfit.
    missing = _write(
        tmp_path / "missing.safetensors",
        {
            "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
            "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b,
            "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": a,
            "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": b,
            f"unet.{q.replace('to_q', 'to_k')}.lora_A.weight": a,
            f"unet.{q.replace('to_q', 'to_v')}.lora_A.weight": np.ones((2, 5)),
            f"unet.{q.replace('to_q', 'to_v')}.lora_B.weight": b,
        },
    )
    with pytest.raises(lora_files.LoRAFileError) as e:
        lora_files.read_lora(missing, kernels)
    msg = str(e.value)
    assert "modules the model lacks (LDM/SGM block names" in msg
    assert "down_blocks.7.attentions.0" in msg and "input_blocks_1_1_proj_in" in msg
    assert f"without both a down and an up weight: unet.{q.replace('to_q', 'to_k')}" in msg
    # Pickles: a file, and a directory holding only one.
    (tmp_path / "x.bin").write_bytes(b"\x80\x04")
    with pytest.raises(lora_files.LoRAFileError, match=r"x\.bin is a PyTorch pickle"):
        lora_files.read_lora(str(tmp_path / "x.bin"), kernels)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04")
    with pytest.raises(lora_files.LoRAFileError, match=r"pickles \['pytorch_lora_weights.bin'\]"):
        lora_files.read_lora(str(tmp_path / "d"), kernels)
    with pytest.raises(lora_files.LoRAFileError, match="does not exist"):
        lora_files.read_lora(str(tmp_path / "nope.safetensors"), kernels)
    # Only Stable Diffusion pipelines take LoRA files; flags pair files with scales.
    no_text = dataclasses.replace(sd_pipe, text_encoder=None)
    with pytest.raises(lora_files.LoRAFileError, match="Stable Diffusion pipelines"):
        lora_files.apply_lora_files(no_text, [(PEFT, 1.0)])
    assert lora_files.pair_scales(["a", "b"], None) == [("a", 1.0), ("b", 1.0)]
    assert lora_files.pair_scales(["a", "b"], [0.5]) == [("a", 0.5), ("b", 0.5)]
    with pytest.raises(ValueError, match="2 files and 3 scales"):
        lora_files.pair_scales(["a", "b"], [1.0, 2.0, 3.0])


def test_sample_cli_lora(refs, tmp_path):
    """sample.py --pretrained --lora, two files stacked (0.25 + 0.25 of the same LoRA) =
    diffusers' images at LoRA scale 0.5; the pipeline and LoRA files stay byte-identical."""
    meta, arrays = refs
    noise = tmp_path / "noise.npy"
    np.save(noise, arrays["noise"])
    out = tmp_path / "s.npz"
    before = _hashes(SD, LORA_DIR)
    cmd = [
        sys.executable,
        "launch/sample.py",
        f"--pretrained={SD}",
        f"--lora={PEFT}",
        f"--lora={KOHYA}",
        "--lora_scale=0.25",
        "--lora_scale=0.25",
        *[f"--prompt={p}" for p in meta["prompts"]],
        "--num_samples=2",
        "--batch_size=2",
        f"--steps={meta['steps']}",
        f"--guidance={meta['guidance']}",
        "--height=16",
        "--width=16",
        f"--noise={noise}",
        f"--out={out}",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Merged LoRA peft x0.25, kohya.safetensors x0.25" in proc.stdout
    got = np.load(out)["images"].astype(np.float64) / 255.0
    assert np.abs(got - arrays["images_scale_0.5"]).max() <= TOL
    assert _hashes(SD, LORA_DIR) == before
    # --lora belongs to --pretrained.
    bad = [sys.executable, "launch/sample.py", f"--workdir={tmp_path}", f"--lora={PEFT}"]
    proc = subprocess.run([*bad, f"--out={out}"], cwd=root, capture_output=True, text=True)
    assert proc.returncode != 0 and "apply to --pretrained=SD_DIR only" in proc.stderr


TRAINED = os.path.join(LORA_DIR, "diffjax_trained")


def test_lora_trained_by_diffjax_matches_diffusers(sd_pipe, tmp_path):
    """A LoRA that diffjax trained (configs/sd_lora.py, U-Net + text encoder) and exported
    with --format=lora (tests/fixtures/make_lora_trained.py): diffjax with the file gives
    diffusers' `load_lora_weights` images, with and without its text-encoder part."""
    with open(os.path.join(TRAINED, "meta.json")) as f:
        meta = json.load(f)
    refs = np.load(os.path.join(TRAINED, "reference.npz"))
    noise = np.load(os.path.join(TRAINED, "diffjax.npz"))["noise"]
    path = os.path.join(TRAINED, lora_files.WEIGHT_NAME)
    tensors = safetensors_io.read_tensors(path)
    # Both parts were trained: every B moved from its zero init.
    for comp in ("unet", "text_encoder"):
        ups = [v for k, v in tensors.items() if k.startswith(comp + ".") and "lora_B" in k]
        assert ups and all(np.abs(v).max() > 0 for v in ups), comp
    got = _images(lora_files.apply_lora_files(sd_pipe, [(path, 1.0)]), meta, noise)
    assert np.abs(got - refs["lora"]).max() <= TOL
    assert np.abs(got - refs["base"]).max() > 0.1
    # The U-Net part alone = diffusers with the text encoder's LoRA disabled.
    unet_only = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    safetensors_io.write_tensors(unet_only, str(tmp_path / "unet.safetensors"))
    half = lora_files.apply_lora_files(sd_pipe, [(str(tmp_path / "unet.safetensors"), 1.0)])
    got = _images(half, meta, noise)
    assert np.abs(got - refs["lora_unet_only"]).max() <= TOL
    assert np.abs(refs["lora_unet_only"] - refs["lora"]).max() > 0.1
