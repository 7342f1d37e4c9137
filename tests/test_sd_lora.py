"""A LoRA trained on a Stable Diffusion pipeline (configs/sd_lora.py on tiny-sd), and its exports.

One sd_lora quick run with `lora.text_encoder=True` (4 steps at a learning rate big enough
to move the images), then what a user does with it: `launch/export.py --format=lora`
applied to the base pipeline by `apply_lora_files`, and `--format=diffusers` (the merged
pipeline) loaded by `load_pipeline`, both sample the run's own images; the checkpoint holds
only the LoRA; the base pipeline directory is never written. Diffusers' side of the LoRA
file is tests/test_lora_files.py's `test_lora_trained_by_diffjax_matches_diffusers`.

Everything hangs off the one training run, in one test: pytest-xdist may send the tests
of a module to different workers, and each would train again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from configs.sd_lora import get_config
from diffjax import parallel
from diffjax.generate import Generator, text_stage
from diffjax.pretrained import lora_files, pipeline, safetensors_io
from diffjax.pretrained import scheduler as scheduler_lib
from diffjax.rundir import load_state, load_workdir_config
from diffjax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD = os.path.join(ROOT, "tests", "fixtures", "pipelines", "tiny-sd")
CAPTIONS = ["a red square", "a blue circle", "two green cats"]
PROMPTS = ["a red square", "two green cats"]
STEPS, GUIDANCE = 2, 7.5
TOL = 2  # uint8 levels
TEXT_Q = "encoder.layers.0.self_attn.q_proj.weight"  # with or without "text_model."


def _hashes(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            path = os.path.join(d, n)
            with open(path, "rb") as f:
                out[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def _start_export(workdir, out, fmt):
    """`launch/export.py` in the background (it runs while the test samples); its output
    goes to files, so a child is never blocked on a full pipe."""
    cmd = [sys.executable, "launch/export.py", f"--workdir={workdir}", f"--out={out}"]
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(
            [*cmd, f"--format={fmt}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    return proc, out + ".log"


def _finish(export):
    proc, log = export
    proc.wait(timeout=600)
    with open(log) as f:
        text = f.read()
    assert proc.returncode == 0, text[-3000:]
    return text


def _diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_sd_lora_run_its_exports_and_the_untouched_base(tmp_path):
    before = _hashes(SD)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(CAPTIONS[i % 3])
    c = get_config("quick")
    c.pretrained = SD
    c.data.data_dir = str(images)
    c.lora.text_encoder = True
    c.sample.num_images = 0
    c.train.update(num_steps=4, learning_rate=1e-2, checkpoint_every_steps=4, log_every_steps=4)
    run = str(tmp_path / "run")
    train_and_evaluate(c, run)
    lora_dir, merged_dir = str(tmp_path / "lora"), str(tmp_path / "merged")
    exports = [_start_export(run, lora_dir, "lora"), _start_export(run, merged_dir, "diffusers")]

    # (d) The checkpoint holds only the LoRA of both components, and AdamW's moments of it.
    config = load_workdir_config(run)
    mesh = parallel.make_mesh(-1, 1)
    text = text_stage(config, mesh).params["text_encoder"]
    state, step, parts = load_state(config, run, mesh, text_params=text)
    assert step == 4 and sorted(state.params) == ["denoiser", "text_encoder"]
    for comp, tree in state.params.items():
        assert sorted(tree) == sorted(parts.lora_targets[comp])
        assert all(sorted(entry) == ["A", "B"] for entry in tree.values())
    assert len(state.params["denoiser"]) == 32 and len(state.params["text_encoder"]) == 8
    n_lora = sum(x.size for x in jax.tree.leaves(state.params))
    unet = pipeline.load_sd_unet(os.path.join(SD, "unet")).params
    assert n_lora < 0.2 * sum(x.size for x in jax.tree.leaves(unet))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_lora

    # What the run samples (its merged U-Net and text encoder, diffjax's DDIM, which ends
    # at the clean point): diffusers' DDIM with set_alpha_to_one=True.
    gen = Generator.from_workdir(run, num_steps=STEPS, guidance=GUIDANCE)
    base = pipeline.load_pipeline(SD)
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    scale = base.scheduler.noise_scale(STEPS)
    ours, _ = gen.generate(2, prompts=PROMPTS, noise=z * scale, batch_size=2)
    run_scheduler = {**base.scheduler_config, "set_alpha_to_one": True}

    def sample(pipe, **kwargs):
        if kwargs:
            pipe = dataclasses.replace(pipe, **kwargs)
        pg = pipeline.PretrainedGenerator(pipe, num_steps=STEPS, guidance=GUIDANCE)
        return pg.generate(2, prompts=PROMPTS, noise=z, batch_size=2)[0]

    # (a) --format=lora, applied to the base pipeline: the run's images; not the base's.
    assert "Exported the LoRA of step 4" in _finish(exports[0])
    styled = lora_files.apply_lora_files(base, [(lora_dir, 1.0)])
    like_run = dict(
        scheduler=scheduler_lib.scheduler_from_config(run_scheduler),
        scheduler_config=run_scheduler,
    )
    with_lora = sample(styled, **like_run)
    assert _diff(with_lora, ours) <= TOL
    assert _diff(sample(base, **like_run), ours) > 25

    # (b) --format=diffusers: the merged pipeline, with the run's scheduler, same images.
    assert "in diffusers format" in _finish(exports[1])
    merged = pipeline.load_pipeline(merged_dir)
    assert merged.scheduler_config["set_alpha_to_one"] is True
    assert _diff(sample(merged), ours) <= TOL

    # (c) Training and both exports left the base pipeline's files as they were.
    assert _hashes(SD) == before

    # The text encoder's LoRA trained, and the diffusers export holds the merged CLIP.
    moved = max(
        float(np.abs(np.asarray(e["B"])).max()) for e in state.params["text_encoder"].values()
    )
    tensors = safetensors_io.read_tensors(os.path.join(lora_dir, lora_files.WEIGHT_NAME))
    assert any(k.startswith("text_encoder.") for k in tensors)
    assert moved > 0  # gradients reach the text encoder's LoRA through CLIP
    te = "text_encoder/model.safetensors"
    exported, original = (
        next(
            v
            for k, v in safetensors_io.read_tensors(os.path.join(d, te)).items()
            if k.endswith(TEXT_Q)
        )
        for d in (merged_dir, SD)
    )
    assert np.abs(exported - original).max() > 1e-3
    with open(os.path.join(merged_dir, "diffjax.json")) as f:
        assert json.load(f)["step"] == 4
