"""Whole pipelines against diffusers: a tiny random SD 1.x and DiT saved by diffusers.

The fixtures (tests/fixtures/pipelines, made by tests/fixtures/make_pipelines.py) hold
diffusers' own images from fixed latents; diffjax must reproduce them within 2/255 per
pixel from the same directory, prompts, noise, steps and guidance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffjax.pretrained import pipeline
from diffjax.pretrained import scheduler as scheduler_lib

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "pipelines")
SD = os.path.join(ROOT, "tiny-sd")
DIT = os.path.join(ROOT, "tiny-dit")
TOL = 2.0 / 255.0


@pytest.fixture(scope="module")
def refs():
    with open(os.path.join(ROOT, "reference.json")) as f:
        cases = json.load(f)
    return cases, np.load(os.path.join(ROOT, "reference.npz"))


@pytest.fixture(scope="module")
def sd_pipe():
    return pipeline.load_pipeline(SD)


def _max_diff(images_uint8, ref_float01):
    return float(np.abs(images_uint8.astype(np.float64) / 255.0 - ref_float01).max())


# sd_ddim_cfg runs through launch/sample.py below (test_sample_cli_pretrained).
@pytest.mark.parametrize("case", ["ddim_negative", "ddim_noguide", "dpmpp_cfg"])
def test_stable_diffusion_matches_diffusers(refs, sd_pipe, case):
    cases, arrays = refs
    c = cases[f"sd_{case}"]
    pipe = sd_pipe
    if c["scheduler"] != "ddim":
        cfg = c["scheduler_config"]
        pipe = pipeline.Pipeline(
            **{**pipe.__dict__, "scheduler": scheduler_lib.scheduler_from_config(cfg)}
        )
    gen = pipeline.PretrainedGenerator(
        pipe, num_steps=c["steps"], guidance=c["guidance"], height=16, width=16
    )
    noise = arrays[f"sd_{case}_noise"]
    got, _ = gen.generate(
        len(noise),
        prompts=c["prompts"],
        negative_prompt=c["negative_prompt"] or "",
        noise=noise,
        batch_size=len(noise),
    )
    ref = arrays[f"sd_{case}_images"]
    assert got.shape == ref.shape
    assert _max_diff(got, ref) <= TOL


@pytest.mark.parametrize("case", ["ddim_cfg", "ddim_noguide"])
def test_dit_matches_diffusers(refs, case):
    cases, arrays = refs
    c = cases[f"dit_{case}"]
    pipe = pipeline.load_pipeline(DIT)
    assert pipe.kind == "label" and pipe.num_classes == 1000
    gen = pipeline.PretrainedGenerator(pipe, num_steps=c["steps"], guidance=c["guidance"])
    noise = arrays[f"dit_{case}_noise"]
    got, labels = gen.generate(len(noise), labels=c["labels"], noise=noise, batch_size=len(noise))
    np.testing.assert_array_equal(labels, c["labels"])
    assert _max_diff(got, arrays[f"dit_{case}_images"]) <= TOL
    # --labels=none: the null class (an unconditional sample).
    cond, _, lab = gen._conditions(np.arange(3), "none", None, "")
    np.testing.assert_array_equal(lab, [1000] * 3)


def test_sample_cli_pretrained(refs, tmp_path):
    cases, arrays = refs
    c = cases["sd_ddim_cfg"]
    noise = tmp_path / "noise.npy"
    np.save(noise, arrays["sd_ddim_cfg_noise"])
    out = tmp_path / "s.npz"
    cmd = [
        sys.executable,
        "launch/sample.py",
        f"--pretrained={SD}",
        f"--prompt={c['prompts'][0]}",
        f"--prompt={c['prompts'][1]}",
        "--num_samples=2",
        f"--steps={c['steps']}",
        f"--guidance={c['guidance']}",
        "--height=16",
        "--width=16",
        f"--noise={noise}",
        f"--out={out}",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(out)["images"]
    assert _max_diff(got, arrays["sd_ddim_cfg_images"]) <= TOL
    assert os.path.isfile(tmp_path / "s.png")


def test_clear_errors(tmp_path, sd_pipe):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline.load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="'FluxPipeline' is not supported"):
        pipeline.load_pipeline(str(tmp_path))
    gen = pipeline.PretrainedGenerator(sd_pipe, num_steps=2, guidance=1.0, height=16, width=16)
    with pytest.raises(
        ValueError, match=r"--noise must hold float32 \[N, h, w, c\] = \[1, 8, 8, 4\]"
    ):
        next(gen.batches(1, prompts=["x"], noise=np.zeros((1, 16, 16, 3), np.float32)))
    with pytest.raises(ValueError, match="needs --prompt"):
        next(gen.batches(1))
    with pytest.raises(ValueError, match="multiples of 2 for this VAE, got 16x15"):
        pipeline.PretrainedGenerator(sd_pipe, num_steps=2, height=16, width=15)
    # Non-square output, as diffusers allows.
    wide = pipeline.PretrainedGenerator(sd_pipe, num_steps=2, guidance=1.0, height=16, width=24)
    images, _ = wide.generate(1, prompts=["x"], batch_size=1)
    assert images.shape == (1, 16, 24, 3) and wide.latent_shape == (8, 12, 4)


def test_digits_export_reproduces_diffusers_own_ddim_loop():
    """tests/fixtures/digits_diffusers: the digits model exported by diffjax, and the images
    diffusers' own UNet2DModel + DDIMScheduler loop drew from it (class labels, the null
    class 10, guidance 1 and 3)."""
    root = os.path.join(os.path.dirname(__file__), "fixtures", "digits_diffusers")
    ref = np.load(os.path.join(root, "reference.npz"))
    pipe = pipeline.load_pipeline(os.path.join(root, "pipeline"))
    assert pipe.kind == "label" and pipe.num_classes == 10 and pipe.vae is None
    labels = ref["labels"].tolist()
    for g in (1.0, 3.0):
        gen = pipeline.PretrainedGenerator(pipe, num_steps=int(ref["steps"]), guidance=g)
        got, lab = gen.generate(
            len(labels), labels=labels, noise=ref["noise"], batch_size=len(labels)
        )
        np.testing.assert_array_equal(lab, labels)
        assert _max_diff(got, ref[f"images_guidance_{g:g}"]) <= TOL


def test_evaluate_cli_pretrained(tmp_path):
    """evaluate.py --pretrained: the eval.* and sample.* fields apply, results go to --out."""
    root = os.path.join(os.path.dirname(__file__), "fixtures", "digits_diffusers", "pipeline")
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable,
        "launch/evaluate.py",
        f"--pretrained={root}",
        f"--out={out}",
        "--config.eval.digits_metrics=True",
        "--config.eval.num_samples=40",
        "--config.eval.batch_size=40",
        "--config.sample.num_steps=4",
        "--config.sample.guidance=2.0",
    ]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == 40
    assert metrics["sampler"] == {"method": "ddim", "num_steps": 4, "guidance": 2.0}
    assert 0.0 <= metrics["conditional_accuracy"] <= 1.0 and metrics["frechet_distance"] > 0
    assert metrics["pretrained"] == os.path.abspath(root)
