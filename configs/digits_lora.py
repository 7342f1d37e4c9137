"""A LoRA on a trained digits model: low-rank deltas of its attention, the base frozen.

    python launch/train.py --config=configs/digits.py --workdir=runs/digits
    python launch/train.py --config=configs/digits_lora.py --workdir=runs/digits_lora \
        --config.base_workdir=runs/digits [--config.lora.rank=4 --config.data.source=folder ...]
    python launch/sample.py --workdir=runs/digits_lora --num_samples=100 --out=/tmp/l.npz

The base run's model, diffusion and data shape are taken (`base_workdir`); only the
LoRA (`lora.rank`, `lora.alpha`, `lora.targets`: default the attention q/k/v/out) is
trained, checkpointed and in the optimizer; the base's EMA params are recorded by hash
in WORKDIR/frozen.json and a resume with a changed base is refused. Exports are the
merged model. `arg` may be `quick` (a few steps, for tests).
"""

import os

import ml_collections
from ml_collections import config_dict

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "digits.py"), arg)
    c.base_workdir = config_dict.placeholder(str)  # required: --config.base_workdir=RUN
    c.lora.rank = 4
    c.lora.alpha = 4.0
    # Also the convolutions of the res blocks: the digits U-Net has little attention.
    c.lora.targets = r"(\.attn\.(query|key|value|out)|_res\d\.(conv1|conv2))$"
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 50
    c.train.num_steps = 500
    c.train.ema_decay = 0.99
    if arg == "quick":
        c.train.num_steps = 4
        c.train.warmup_steps = 1
    return c
