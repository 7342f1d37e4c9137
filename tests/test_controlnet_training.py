"""Training a ControlNet beside a frozen base run (configs/digits_controlnet.py, tiny).

Only the ControlNet is trained and checkpointed; the base is recorded by hash and never
written; at conditioning scale 0 a ControlNet run samples exactly as its base; sample.py
draws from control images or from the run's own transform of ordinary images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.digits import get_config as digits_config
from configs.digits_controlnet import get_config
from diffjax import parallel
from diffjax.data import digits_source
from diffjax.data.control import make_control
from diffjax.generate import Generator
from diffjax.images import to_uint8
from diffjax.pretrained.frozen import tree_sha256
from diffjax.rundir import load_state, load_workdir_config
from diffjax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cn") / "base")
    c = digits_config("quick")
    c.sample.num_images = 0
    c.model.kwargs.update(channel_mult=(1,), attention_resolutions=(8,), mid_attention=False)
    train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cn") / "run")
    c = get_config("quick")
    c.base_workdir = base
    c.sample.num_images = 4  # the grid draws with the first training records' edges
    train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def held_out():
    src = digits_source("half1")
    return np.stack([to_uint8(src[i]["image"]) for i in range(8)])


def test_only_the_controlnet_is_trained_and_the_base_recorded(base, run):
    config = load_workdir_config(run)
    n = config.controlnet
    assert (n.control, n.control_downsample, n.conditioning_channels) == ("edges", 1, 1)
    state, step, parts = load_state(config, run, parallel.make_mesh(-1, 1))
    assert step == 4 and parts.controlnet
    names = set(state.params)
    assert {"controlnet_cond_embedding", "controlnet_mid", "down0_res0", "time_embed"} <= names
    assert not any(k.startswith("up") or k in ("conv_out", "norm_out") for k in names)
    with open(os.path.join(run, "frozen.json")) as f:
        frozen = json.load(f)
    base_state, _, _ = load_state(load_workdir_config(base), base, parallel.make_mesh(-1, 1))
    assert frozen["base"]["sha256"] == tree_sha256(base_state.ema_params)
    assert os.path.isfile(os.path.join(run, "samples", "step_00000004.png"))


def test_scale_zero_samples_as_the_base(base, run, held_out):
    cfg = load_workdir_config(run)
    cfg.controlnet.conditioning_scale = 0.0
    off = Generator.from_workdir(run, config=cfg)
    kw = dict(labels="none", seed=3, batch_size=8)
    x_off, labels = off.generate(8, control=held_out, **kw)
    assert np.all(labels == 10)  # the null class
    x_base, _ = Generator.from_workdir(base).generate(8, **kw)
    assert np.abs(x_off.astype(int) - x_base.astype(int)).max() <= 1
    x_on, _ = Generator.from_workdir(run).generate(8, control=held_out, **kw)
    assert x_on.shape == (8, 8, 8, 1) and np.any(x_on != x_off)
    with pytest.raises(ValueError, match=r"\[H, W, C\] = \[8, 8, 1\]"):
        next(Generator.from_workdir(run).batches(2, control=held_out[:, :4]))


def test_sample_cli_control_source_and_errors(base, run, held_out, tmp_path):
    imgs = tmp_path / "held.npz"
    np.savez(imgs, images=held_out)
    out = tmp_path / "s.npz"
    cmd = [sys.executable, "launch/sample.py", f"--workdir={run}", "--num_samples=8"]
    proc = subprocess.run(
        [*cmd, f"--control_source={imgs}", "--labels=none", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(out)["images"]
    # --control_source = the run's transform, then --control_image of its result.
    edges = (make_control(held_out, "edges", channels=1) * 255).astype(np.uint8)
    want, _ = Generator.from_workdir(run).generate(
        8, control=edges, labels="none", seed=0, batch_size=256
    )
    np.testing.assert_array_equal(got, want)
    proc = subprocess.run(
        [
            sys.executable,
            "launch/sample.py",
            f"--workdir={base}",
            f"--control_image={imgs}",
            f"--out={tmp_path / 'x.npz'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "this run has no ControlNet" in proc.stderr
