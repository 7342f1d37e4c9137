"""DreamBooth on the text-conditioned digits: bind a new variant to an identifier token.

    python launch/train.py --config=configs/digits_text.py --workdir=runs/digits_text \
        --config.train.num_steps=1500
    python launch/train.py --config=configs/digits_dreambooth.py --workdir=runs/digits_db \
        --config.base_workdir=runs/digits_text --config.dreambooth.instance_dir=MIRRORED_THREES
    python launch/sample.py --workdir=runs/digits_db --prompt="a handwritten sks three" ...

The instance images (e.g. a handful of mirrored threes) are captioned
`dreambooth.instance_prompt` ("a handwritten sks three": "sks" is a word the base never
saw); prior preservation trains at the same time on `num_class_images` images the base
generated once for its own class captions ("a handwritten zero" ... "nine"), so the other
classes are not forgotten (`prior_loss_weight=0` turns it off). The whole model is
fine-tuned from the base by default (its word-level text encoder too, so the new word
gets an embedding); `--config.lora.rank=8` trains a LoRA instead.
`benchmarks/dreambooth_digits.py` runs the experiment and measures it. `arg` may be
`quick` (a few steps, for tests).
"""

import os

import ml_collections
from ml_collections import config_dict

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "digits_text.py"), arg)
    c.base_workdir = config_dict.placeholder(str)  # required: a digits_text run
    c.data.source = "dreambooth"
    db = c.dreambooth
    db.instance_dir = config_dict.placeholder(str)  # required: the instance images
    db.instance_prompt = "a handwritten sks three"
    db.class_prompt = ""  # every class caption of the base
    db.num_class_images = 500
    db.prior_loss_weight = 1.0
    c.diffusion.cond_dropout = 0.1
    t = c.train
    t.num_steps = 400
    t.batch_size = 64
    t.learning_rate = 2e-4
    t.warmup_steps = 20
    t.ema_decay = 0.99
    t.checkpoint_every_steps = 200
    t.sample_every_steps = 400
    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 20
    c.sample.guidance = 1.5
    c.sample.num_images = 20
    c.eval.every_steps = 0
    if arg == "quick":
        db.num_class_images = 16
        t.num_steps = 4
        t.batch_size = 16
        t.warmup_steps = 1
        t.checkpoint_every_steps = 2
        c.sample.num_steps = 3
        c.sample.num_images = 0
    return c
