"""A ControlNet on a trained digits model: spatial control by the digits' Canny edges.

    python launch/train.py --config=configs/digits.py --workdir=runs/digits
    python launch/train.py --config=configs/digits_controlnet.py --workdir=runs/digits_cn \
        --config.base_workdir=runs/digits [--config.controlnet.control=sobel ...]
    python launch/sample.py --workdir=runs/digits_cn --control_source=HELD_OUT.npz \
        --labels=none --num_samples=100 --out=/tmp/cn.npz

The base run's model, diffusion and data shape are taken (`base_workdir`) and frozen
(recorded by hash in WORKDIR/frozen.json); only the ControlNet (a copy of the base's
encoder half, joined to it through zero convs) is trained, checkpointed and in the
optimizer. Each training digit's control is its Canny edge map (`controlnet.control`,
computed per record) on the digits of `half0` (`half1` is held out); half the labels are dropped to the null class so the ControlNet
learns to draw from the control alone (`--labels=none`). `arg` may be `quick`.
"""

import os

from ml_collections import config_dict

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "digits.py"), arg)
    c.base_workdir = config_dict.placeholder(str)  # required: --config.base_workdir=RUN
    n = c.controlnet
    n.control = "edges"
    n.canny_low = 100
    n.canny_high = 200
    n.embedding_channels = (16, 32)
    c.data.split = "half0"  # half1 stays held out: its edges are the demo's controls
    c.diffusion.cond_dropout = 0.5  # the ControlNet's own run: half the digits unlabelled
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 50
    c.train.num_steps = 800
    c.train.ema_decay = 0.99
    if arg == "quick":
        c.train.num_steps = 4
        c.train.warmup_steps = 1
    return c
